"""generate's pipelined loop, on-device sampling and compiled width buckets.

The pipelined, compiled run must be the plain loop (prefill, then one evaluated
eager decode and a host argmax per token) token for token; EOS, seen one step late,
must leave the cache holding exactly P + G - 1 tokens; the nucleus sampler must
draw with the renormalised nucleus probabilities; a long compiled run must trace
about log2(blocks) graphs; and the padding that buys that must never be read.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import conform_mlx.impl.engine
from conform_mlx.impl.engine import (
    CompiledSteps,
    InputError,
    Sampler,
    bucket_width,
    decode,
    decode_lazy,
    generate,
    pad_block_tables,
    prefill,
    to_numpy,
)
from conform_mlx.impl.loader import load
from conform_mlx.impl.paged_cache import PagedKVCache
from suites.tolerances import FP32_SAME_ENGINE_ATOL

pytestmark = [
    pytest.mark.impl_only("tests impl.engine.generate's pipelining, sampler and compiled buckets"),
    pytest.mark.checkpoint_group("trained"),
]

PROMPT = [1, 264, 319, 322, 309]


@pytest.fixture(scope="module")
def model(trained_dir, model_factory):
    return model_factory(trained_dir)


def plain_loop(model, prompt, n, block_size=16, sampler=None):
    """The unpipelined reference: every step evaluated, eager, its token read on the
    host before the next step is built. (tokens, logits of every fed position, cache)."""
    cache = PagedKVCache.for_tokens(model.config, len(prompt) + n, block_size)
    cache.add_sequence(0)
    rows = [to_numpy(prefill(model, cache, 0, prompt))]

    def pick(rows: np.ndarray) -> int:
        if sampler is None:
            return int(np.argmax(rows[-1]))
        return sampler(mx.array(rows[-1:])).item()

    tokens = [pick(rows[-1])]
    while len(tokens) < n:
        rows.append(to_numpy(decode(model, cache, [0], [tokens[-1]])))
        tokens.append(pick(rows[-1]))
    return tokens, np.concatenate(rows), cache


def check_accounting(cache: PagedKVCache, seq, prompt_len: int, gen) -> None:
    """The rule of impl.paged_cache: P + G - 1 tokens, whole blocks, none leaked."""
    want = prompt_len + len(gen.tokens) - 1
    assert cache.tokens(seq) == want, f"{cache.tokens(seq)} cached, the rule says {want}"
    assert cache.blocks_used(seq) == math.ceil(want / cache.block_size)
    assert cache.allocator.num_free == cache.num_blocks - cache.blocks_used(seq)


# -- pipelined == plain ----------------------------------------------------------------------
@pytest.mark.parametrize("compiled", [True, False])
def test_pipelined_generate_equals_the_plain_greedy_loop(model, compiled):
    n = 64
    want, want_logits, want_cache = plain_loop(model, PROMPT, n)
    cache = PagedKVCache.for_tokens(model.config, len(PROMPT) + n, 16)
    steps = CompiledSteps(model) if compiled else None
    gen = generate(model, PROMPT, n, cache=cache, eos_token_ids=[], keep_logits=True, steps=steps)
    assert gen.tokens == want
    assert gen.logits.shape == want_logits.shape == (len(PROMPT) + n - 1, model.config.vocab_size)
    np.testing.assert_allclose(gen.logits, want_logits, atol=FP32_SAME_ENGINE_ATOL, rtol=0)
    assert len(gen.decode_ms) == n - 1 and min(gen.decode_ms) > 0 and gen.prefill_ms > 0
    check_accounting(cache, 0, len(PROMPT), gen)
    assert cache.tokens(0) == want_cache.tokens(0)


def test_generate_compiles_its_decode_steps_through_the_callers_steps(model, monkeypatch):
    calls = []
    real = CompiledSteps.lazy

    def counted(self, tokens, cache, plan):
        calls.append(plan.block_tables.shape)
        return real(self, tokens, cache, plan)

    monkeypatch.setattr(CompiledSteps, "lazy", counted)
    gen = generate(model, PROMPT, 4, eos_token_ids=[], steps=CompiledSteps(model))
    assert len(calls) == len(gen.tokens) - 1 == 3
    generate(model, PROMPT, 4, eos_token_ids=[])  # no steps: eager, no compiled call
    assert len(calls) == 3


# -- EOS, seen one step late ---------------------------------------------------------------
def first_stop(tokens: list[int], k: int) -> tuple[int, list[int]]:
    """tokens[k] as an EOS id, and where a run stopping at it ends (its first use)."""
    eos = tokens[k]
    return eos, tokens[: tokens.index(eos) + 1]


@pytest.mark.parametrize("k", [0, 1, 3, 6, 7])
@pytest.mark.parametrize("compiled", [True, False])
def test_eos_mid_run_rolls_back_the_step_that_fed_it(model, k, compiled):
    """Block size 4: on the committed model, stops k = 3 and 7 land where the
    rolled-back step had taken a fresh block, which must go back to the pool."""
    full, full_logits, _ = plain_loop(model, PROMPT, 24)
    eos, want = first_stop(full, k)
    cache = PagedKVCache.for_tokens(model.config, len(PROMPT) + 24, 4)
    steps = CompiledSteps(model) if compiled else None
    gen = generate(
        model, PROMPT, 24, cache=cache, eos_token_ids=[eos], keep_logits=True, steps=steps
    )
    assert gen.tokens == want and gen.stop_reason == "eos"
    assert len(gen.decode_ms) == len(want) - 1
    fed = len(PROMPT) + len(want) - 1
    np.testing.assert_allclose(gen.logits, full_logits[:fed], atol=FP32_SAME_ENGINE_ATOL, rtol=0)
    check_accounting(cache, 0, len(PROMPT), gen)


def test_accounting_check_catches_a_missing_rollback(model, monkeypatch):
    """Without the trim, the step queued after EOS stays counted: one token too many."""
    full, _, _ = plain_loop(model, PROMPT, 8)
    eos, want = first_stop(full, 2)
    monkeypatch.setattr(PagedKVCache, "trim", lambda self, seq, n: 0)
    cache = PagedKVCache.for_tokens(model.config, len(PROMPT) + 8, 4)
    gen = generate(model, PROMPT, 8, cache=cache, eos_token_ids=[eos])
    assert gen.tokens == want
    with pytest.raises(AssertionError, match="the rule says"):
        check_accounting(cache, 0, len(PROMPT), gen)


def test_eos_on_the_last_token_queues_nothing_to_roll_back(model, monkeypatch):
    """At max_new_tokens no step is queued, so there is nothing to trim (trim would
    raise here, and the exactly sized pool would have refused a step past the end)."""
    full, _, _ = plain_loop(model, PROMPT, 6)
    eos = full[-1]
    if eos in full[:-1]:
        pytest.skip("the last token appears earlier; pick another prompt")

    def no_trim(self, seq, n):
        raise AssertionError("trimmed with no step queued after EOS")

    monkeypatch.setattr(PagedKVCache, "trim", no_trim)
    cache = PagedKVCache.for_tokens(model.config, len(PROMPT) + 6 - 1, 1)  # no spare slot
    gen = generate(model, PROMPT, 6, cache=cache, eos_token_ids=[eos])
    assert gen.tokens == full and gen.stop_reason == "eos"
    check_accounting(cache, 0, len(PROMPT), gen)


# -- on-device sampling ------------------------------------------------------------------------
def test_top_p_sampling_is_fixed_by_its_seed(model):
    def run(seed: int) -> list[int]:
        sampler = Sampler(temperature=1.5, top_p=0.9, seed=seed)
        return generate(model, PROMPT, 32, sampler=sampler, eos_token_ids=[]).tokens

    a, b, c = run(3), run(3), run(4)
    assert a == b
    assert a != c


def test_pipelined_sampling_draws_what_the_plain_loop_draws(model):
    """Keys are split in the same order either way, so the same seed gives the same run."""
    want, _, _ = plain_loop(model, PROMPT, 24, sampler=Sampler(1.5, 0.9, seed=7))
    gen = generate(model, PROMPT, 24, sampler=Sampler(1.5, 0.9, seed=7), eos_token_ids=[])
    assert gen.tokens == want


def nucleus_probs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The nucleus distribution in float64: softmax(logits / T), the smallest most-likely
    set whose mass reaches top_p, renormalised; zero outside it."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    n_keep = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    q = np.zeros_like(p)
    q[order[:n_keep]] = p[order[:n_keep]]
    return q / q.sum()


# chi-square quantiles at 1e-6 for df = 3, 4, 5 (scipy.stats.chi2.isf(1e-6, df)): a fair
# sampler exceeds them once in a million seeds; the seed is fixed, so no flakes.
CHI2_1E6 = {3: 30.66, 4: 33.38, 5: 35.89}


@pytest.mark.parametrize(
    "temperature,top_p",
    [(1.0, 0.75), (0.7, 0.8), (1.3, 0.9)],
)
def test_nucleus_frequencies_match_the_renormalised_nucleus(temperature, top_p):
    probs = np.array([0.02, 0.3, 0.12, 0.08, 0.2, 0.03, 0.15, 0.1])  # shuffled on purpose
    logits = np.log(probs).astype(np.float32)
    q = nucleus_probs(logits, temperature, top_p)
    kept = np.flatnonzero(q)
    assert 3 <= kept.size - 1 <= 5, "pick cases whose df has a quantile above"
    n = 200_000
    draws = Sampler(temperature, top_p, seed=0).sample(mx.array(logits), num_samples=n)
    assert draws.shape == (n,) and draws.dtype == mx.int32
    counts = np.bincount(np.array(draws), minlength=logits.size)
    assert counts[q == 0].sum() == 0, f"drew tokens outside the nucleus: {counts}"
    expected = n * q[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_1E6[kept.size - 1], (chi2, counts / n, q)


def test_sampler_rows_and_greedy():
    logits = mx.array(np.log([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]).astype(np.float32))
    assert Sampler().sample(logits).tolist() == [1, 0]
    assert Sampler(temperature=1.0, top_p=0.5).sample(logits).tolist() == [1, 0]  # one kept
    assert Sampler(1.0, 1.0, seed=1).sample(logits, num_samples=5).shape == (2, 5)


@pytest.mark.parametrize("temperature,top_p", [(-0.1, 1.0), (1.0, 0.0), (1.0, 1.5)])
def test_sampler_refuses_bad_settings(temperature, top_p):
    with pytest.raises(InputError, match="need temperature >= 0 and 0 < top_p <= 1"):
        Sampler(temperature, top_p)


# -- decode_lazy: the host's checks without the token values ---------------------------------
def test_decode_lazy_checks_what_the_host_knows_before_the_cache_changes(model):
    cache = PagedKVCache(model.config, num_blocks=2, block_size=4)
    cache.add_sequence("s")
    prefill(model, cache, "s", PROMPT)
    before = (cache.tokens("s"), cache.block_table("s"), cache.allocator.num_free)
    with pytest.raises(TypeError, match="must be an mx.array"):
        decode_lazy(model, cache, ["s"], [3])
    with pytest.raises(InputError, match="1-D integer mx.array"):
        decode_lazy(model, cache, ["s"], mx.array([3.0]))
    with pytest.raises(InputError, match="1 sequences but 2 tokens"):
        decode_lazy(model, cache, ["s"], mx.array([3, 4]))
    assert (cache.tokens("s"), cache.block_table("s"), cache.allocator.num_free) == before
    lazy = decode_lazy(model, cache, ["s"], mx.array([3]))
    assert cache.tokens("s") == len(PROMPT) + 1
    want = decode(model, _replay(model, PROMPT), ["s"], [3])
    np.testing.assert_allclose(to_numpy(lazy), to_numpy(want), atol=FP32_SAME_ENGINE_ATOL, rtol=0)


def _replay(model, prompt) -> PagedKVCache:
    cache = PagedKVCache(model.config, num_blocks=2, block_size=4)
    cache.add_sequence("s")
    prefill(model, cache, "s", prompt)
    return cache


# -- width buckets -------------------------------------------------------------------------------
def test_bucket_width_is_the_next_power_of_two():
    want = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 16: 16, 17: 32, 19: 32}
    assert {w: bucket_width(w) for w in want} == want


@pytest.mark.parametrize("per_octave", [1, 2, 8])
def test_finer_buckets_pad_less_for_more_traces(per_octave):
    """``per_octave`` widths an octave: a table is padded by less than 1/per_octave of its
    width (past the first octaves) and 1..1024 blocks take at most per_octave traces an
    octave."""
    buckets = {w: bucket_width(w, per_octave) for w in range(1, 1025)}
    assert all(w <= b <= 1 << max(w - 1, 0).bit_length() for w, b in buckets.items())
    assert all(b - w < w / per_octave for w, b in buckets.items() if w > 2 * per_octave)
    assert len(set(buckets.values())) <= per_octave * 11
    assert buckets[544] == {1: 1024, 2: 768, 8: 576}[per_octave]  # 8704 tokens of 16


def test_a_long_compiled_run_traces_about_log2_blocks_graphs(trained_dir, monkeypatch):
    """300 tokens in 16-token blocks: widths 1..19, buckets 1, 2, 4, 8, 16, 32."""
    n, bs = 300, 16
    widest = math.ceil((len(PROMPT) + n - 1) / bs)
    bound = math.ceil(math.log2(widest)) + 1

    def traces() -> int:
        steps = CompiledSteps(load(trained_dir, "float32"))  # no traces yet
        generate(steps.model, PROMPT, n, eos_token_ids=[], block_size=bs, steps=steps)
        return steps.traces

    assert traces() <= bound
    # The counter sees retraces: without the buckets there is one per width.
    monkeypatch.setattr(conform_mlx.impl.engine, "bucket_width", lambda width, per_octave=1: width)
    assert traces() == widest > bound


def test_poisoned_pad_block_is_never_read(model):
    """The pad names block 0; fill it with NaN in every layer while the sequence holds
    other blocks: the compiled step's tables are padded from 3 blocks to 4, and its
    logits stay finite and equal the eager (unpadded) step's. Poisoning a block
    inside the context does reach them."""

    def setup(poison: int) -> PagedKVCache:
        cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
        cache.add_sequence("holder")
        cache.plan(["holder"], 1)  # takes block 0, the pad target
        cache.add_sequence("s")
        prefill(model, cache, "s", [*PROMPT, 7, 8, 9, 10])  # 9 tokens: blocks 1, 2, 3
        hit = mx.arange(cache.num_blocks)[:, None, None, None, None] == poison
        nan = mx.array(float("nan"), dtype=cache.dtype)
        for layer, pool in enumerate(cache.kv):
            cache.update_layer(layer, mx.where(hit, nan, pool))
        return cache

    cache = setup(poison=0)
    width = len(cache.block_table("s"))
    assert width == 3 and pad_block_tables(mx.zeros((1, width), mx.int32)).shape == (1, 4)
    eager = to_numpy(decode(model, setup(poison=0), ["s"], [11]))
    padded = to_numpy(decode(model, cache, ["s"], [11], steps=CompiledSteps(model)))
    assert np.isfinite(padded).all() and np.isfinite(eager).all()
    np.testing.assert_allclose(padded, eager, atol=FP32_SAME_ENGINE_ATOL, rtol=0)
    read = to_numpy(decode(model, setup(poison=1), ["s"], [11], steps=CompiledSteps(model)))
    assert not np.isfinite(read).all()
