"""Deterministic synthetic training text for the tiny reference checkpoint.

The text is deliberately small-vocabulary and highly structured (templated
sentences, short stories that re-use their own nouns, counting runs, fixed
rhymes). A model of a few hundred thousand parameters trained for a few
minutes on it learns *peaked* next-token distributions: the top-1 logit sits
well above the runner-up. That matters for conformance tests, because a
near-flat model (random weights) lets tiny numeric differences flip greedy
argmax choices, while a peaked one makes greedy decoding a stable oracle.

Everything comes from ``random.Random(seed)``; no external data is read.
"""

from __future__ import annotations

import random

ADJECTIVES = ["quick", "brown", "lazy", "small", "big", "red", "old", "happy", "sleepy", "clever"]
ANIMALS = ["fox", "dog", "cat", "bird", "horse", "mouse", "frog", "bear", "duck", "owl"]
PLACES = ["the river", "the hill", "the barn", "the forest", "the garden", "the road"]
VERBS = ["jumps over", "runs past", "looks at", "sits near", "follows", "chases", "helps"]
ENDINGS = [
    "and then it goes home .",
    "and the sun goes down .",
    "and everyone is happy .",
    "and they all sleep well .",
]
NUMBERS = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
]  # fmt: skip
RHYMES = [
    "The quick brown fox jumps over the lazy dog .",
    "Twinkle twinkle little star , how I wonder what you are .",
    "Jack and Jill went up the hill to fetch a pail of water .",
    "Row row row your boat , gently down the stream .",
    "Humpty Dumpty sat on a wall , Humpty Dumpty had a great fall .",
    "Mary had a little lamb , its fleece was white as snow .",
]


def _noun_phrase(rng: random.Random, animal: str) -> str:
    # "quick brown" appears as a fixed adjective pair so the default prompt
    # "The quick brown fox" is a well-trodden path in the data.
    if rng.random() < 0.3:
        return f"quick brown {animal}"
    return f"{rng.choice(ADJECTIVES)} {animal}"


def _story(rng: random.Random) -> str:
    # Later sentences refer back to the two animals introduced first, so the
    # model can profit from attending to earlier context.
    hero, other = rng.sample(ANIMALS, 2)
    hero_np, other_np = _noun_phrase(rng, hero), _noun_phrase(rng, other)
    place = rng.choice(PLACES)
    sentences = [f"The {hero_np} {rng.choice(VERBS)} the {other_np} ."]
    for _ in range(rng.randint(1, 3)):
        sentences.append(f"The {hero} {rng.choice(VERBS)} the {other} near {place} .")
    sentences.append(f"The {other} {rng.choice(VERBS)} the {hero} {rng.choice(ENDINGS)}")
    return " ".join(sentences)


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 8)
    stop = rng.randint(start + 4, len(NUMBERS))
    return "Count : " + " ".join(NUMBERS[start:stop]) + " ."


def _rhyme(rng: random.Random) -> str:
    return rng.choice(RHYMES)


def make_corpus(num_chars: int = 300_000, seed: int = 0) -> str:
    """Return roughly ``num_chars`` characters of structured text, one item per line."""
    rng = random.Random(seed)
    makers = [_story] * 5 + [_counting] * 2 + [_rhyme] * 2
    lines: list[str] = []
    total = 0
    while total < num_chars:
        line = rng.choice(makers)(rng)
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(make_corpus(2_000))
