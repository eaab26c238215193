"""Logits parity of the MLX engine against the HF float32 reference, for the prefill
and for every decode step through the paged cache, across block boundaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kernels.rope_cache_write
from conform.metrics import compare_logits
from impl.engine import decode, generate, prefill, to_numpy
from impl.model import Model
from impl.paged_cache import PagedKVCache
from suites.conftest import TINY_SHAPES
from suites.tolerances import NMSE_LIMIT

PROMPT_TEXT = "The quick brown fox jumps over the lazy dog .\nOne two three"
BLOCK_SIZES = [4, 16]
PREFILL_LEN = 7
TOTAL_LEN = 40  # crosses several 4-token blocks and two 16-token blocks


def prompt_ids(path: Path, n: int) -> list[int]:
    """Text through the checkpoint's tokenizer where it has one, else seeded ids."""
    tok = path / "tokenizer.json"
    if tok.is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tok)).encode(PROMPT_TEXT * 4).ids
        return [1, *ids][:n]
    return np.random.default_rng(0).integers(0, 512, n).tolist()


def impl_logits(
    model: Model, tokens: list[int], n_prefill: int, block_size: int
) -> list[np.ndarray]:
    """[prefill logits (n_prefill, V), then one (1, V) per decoded token]."""
    cache = PagedKVCache.for_tokens(model.config, len(tokens), block_size)
    cache.add_sequence(0)
    steps = [to_numpy(prefill(model, cache, 0, tokens[:n_prefill]))]
    for t in tokens[n_prefill:]:
        steps.append(to_numpy(decode(model, cache, [0], [t])))
    return steps


def check_parity(steps: list[np.ndarray], ref: np.ndarray, dtype: str) -> None:
    """Each step (the prefill, each decode) within the dtype's NMSE limit."""
    limit, start, worst = NMSE_LIMIT[dtype], 0, []
    for i, got in enumerate(steps):
        d = compare_logits(got, ref[start : start + len(got)])
        if d.nmse > limit:
            where = "prefill" if i == 0 else f"decode step {i} (position {start})"
            worst.append(f"{where}: NMSE {d.nmse:.3g} > {limit:g}, max|dlogit| {d.max_abs:.3g}")
        start += len(got)
    assert not worst, f"{len(worst)} step(s) out of tolerance; first: " + "; ".join(worst[:3])


@pytest.fixture(scope="module")
def parity_case(checkpoint, trained_dir, model_factory, reference_factory):
    def make(name: str, block_size: int, dtype: str = "float32"):
        path = trained_dir if name == "trained" else checkpoint(name)
        tokens = prompt_ids(path, TOTAL_LEN)
        ref = reference_factory(path).logits(tokens)
        steps = impl_logits(model_factory(path, dtype), tokens, PREFILL_LEN, block_size)
        return steps, ref

    return make


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", ["trained", *TINY_SHAPES, "tiny-llama3-rope"])
def test_float32_logits_match_reference(parity_case, name, block_size):
    steps, ref = parity_case(name, block_size)
    check_parity(steps, ref, "float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["trained", "tiny-gqa8", "tiny-hd128"])
def test_half_precision_logits_match_reference(parity_case, name, dtype):
    steps, ref = parity_case(name, 16, dtype)
    check_parity(steps, ref, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parity_check_catches_an_off_by_one_decode_offset(parity_case, monkeypatch, dtype):
    """Decode rotating at cached_len + 1 (the length after the append) instead of
    cached_len. A shift applied to every token alike would be invisible: RoPE
    scores depend only on relative positions."""
    real = kernels.rope_cache_write.rope

    def off_by_one_in_decode(x, positions, inv_freq):
        return real(x, positions + 1 if x.shape[1] == 1 else positions, inv_freq)

    monkeypatch.setattr(kernels.rope_cache_write, "rope", off_by_one_in_decode)
    steps, ref = parity_case("tiny-gqa8", 4, dtype)
    with pytest.raises(AssertionError, match="out of tolerance"):
        check_parity(steps, ref, dtype)


def test_float32_greedy_matches_reference_for_64_steps(
    trained_dir, model_factory, reference_factory
):
    prompt = prompt_ids(trained_dir, 5)
    ours = generate(model_factory(trained_dir), prompt, 64, eos_token_ids=[]).tokens
    theirs = reference_factory(trained_dir).greedy(prompt, 64)
    assert len(theirs) == 64, "the reference stopped early at EOS; pick another prompt"
    assert ours == theirs
