"""Logits parity of the MLX engine against the HF float32 reference.

Each case feeds PREFILL_LEN tokens as one prefill, then decodes the rest one token
at a time through the paged cache, and compares every step's logits with one
reference forward pass over the same tokens. A failing case names the first
layer and sub-block whose activations depart from the reference. Every case's
metrics go into the parity report (terminal table, results/parity.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import impl.model
import kernels.rope_cache_write
from conform.localize import first_departure
from conform.metrics import compare_logits, top_k
from impl.engine import decode, generate, prefill, to_numpy
from impl.model import Model
from impl.paged_cache import PagedKVCache
from suites.conftest import PARITY_ROWS, TINY_SHAPES
from suites.tolerances import NMSE_LIMIT

PROMPT_TEXT = "The quick brown fox jumps over the lazy dog .\nOne two three"
PREFILL_LEN = 7
TOTAL_LEN = 40  # crosses several 4-token blocks and two 16-token blocks
SHAPES = ["trained", *TINY_SHAPES, "tiny-llama3-rope"]
DTYPES = ["float32", "float16", "bfloat16"]
BLOCK_SIZES = [4, 16]


def prompt_ids(path: Path, n: int) -> list[int]:
    """Text through the checkpoint's tokenizer where it has one, else seeded ids."""
    tok = path / "tokenizer.json"
    if tok.is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tok)).encode(PROMPT_TEXT * 4).ids
        return [1, *ids][:n]
    return np.random.default_rng(0).integers(0, 512, n).tolist()


@dataclass
class ImplRun:
    steps: list[np.ndarray]  # prefill logits (P, V), then one (1, V) per decoded token
    trace: dict[str, np.ndarray]  # name -> (positions, hidden), all steps joined


def impl_logits(model: Model, tokens: list[int], n_prefill: int, block_size: int) -> ImplRun:
    cache = PagedKVCache.for_tokens(model.config, len(tokens), block_size, _dtype(model))
    cache.add_sequence(0)
    trace: dict[str, list[mx.array]] = {}
    steps = [to_numpy(prefill(model, cache, 0, tokens[:n_prefill], trace=trace))]
    for t in tokens[n_prefill:]:
        steps.append(to_numpy(decode(model, cache, [0], [t], trace=trace)))
    joined = {k: np.concatenate([to_numpy(x[0]) for x in v]) for k, v in trace.items()}
    return ImplRun(steps, joined)


def _dtype(model: Model) -> mx.Dtype:
    return model.model.embed_tokens.weight.dtype


def check_parity(run: ImplRun, ref, dtype: str, num_layers: int) -> dict:
    """Each step within the dtype's NMSE limit; returns the case's metrics.

    On failure the message names the worst steps and where the departure begins.
    """
    limit, start, bad = NMSE_LIMIT[dtype], 0, []
    for i, got in enumerate(run.steps):
        d = compare_logits(got, ref.logits[start : start + len(got)])
        if d.nmse > limit:
            where = "prefill" if i == 0 else f"decode step {i} (position {start})"
            bad.append(f"{where}: NMSE {d.nmse:.3g} > {limit:g}, max|dlogit| {d.max_abs:.3g}")
        start += len(got)
    p = len(run.steps[0])
    whole = np.concatenate(run.steps)
    metrics = {
        "prefill": compare_logits(run.steps[0], ref.logits[:p]).as_dict(),
        "decode": compare_logits(whole[p:], ref.logits[p:]).as_dict(),
    }
    if bad:
        where = first_departure(run.trace, ref.trace, num_layers, limit)
        located = where.describe() if where else "no activation departs beyond tolerance"
        pytest.fail(f"{len(bad)} step(s) out of tolerance: {'; '.join(bad[:3])}. {located}")
    return metrics


@pytest.fixture(scope="module")
def parity_case(checkpoint, trained_dir, model_factory, reference_factory):
    def make(name: str, block_size: int, dtype: str = "float32"):
        path = trained_dir if name == "trained" else checkpoint(name)
        tokens = prompt_ids(path, TOTAL_LEN)
        ref = reference_factory(path).run(tokens)
        model = model_factory(path, dtype)
        return impl_logits(model, tokens, PREFILL_LEN, block_size), ref, model.config

    return make


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_reference(parity_case, name, dtype):
    run, ref, cfg = parity_case(name, 16, dtype)
    metrics = check_parity(run, ref, dtype, cfg.num_hidden_layers)
    PARITY_ROWS.append({"shape": name, "dtype": dtype, "block_size": 16, **metrics})


@pytest.mark.parametrize("name", SHAPES)
def test_float32_parity_with_block_size_4(parity_case, name):
    run, ref, cfg = parity_case(name, 4)
    check_parity(run, ref, "float32", cfg.num_hidden_layers)


@pytest.fixture
def inject(monkeypatch):
    def apply(fault: str) -> None:
        if fault == "decode rope off by one":
            # Rotating at cached_len + 1 (the length after the append). A shift of every
            # token alike would be invisible: RoPE scores depend on relative position.
            real = kernels.rope_cache_write.rope

            def shifted(x, positions, inv_freq):
                return real(x, positions + 1 if x.shape[1] == 1 else positions, inv_freq)

            monkeypatch.setattr(kernels.rope_cache_write, "rope", shifted)
        else:
            real_mlp = impl.model.MLP.__call__
            monkeypatch.setattr(
                impl.model.MLP, "__call__", lambda self, x: real_mlp(self, x) * 1.05
            )

    return apply


@pytest.mark.parametrize(
    "fault,dtype,where",
    [
        ("decode rope off by one", "float32", r"layer 0, attention \(layers\.0\.self_attn\)"),
        ("decode rope off by one", "float16", r"layer 0, attention"),
        ("mlp output 5% high", "float32", r"layer 0, MLP \(layers\.0\.mlp\)"),
    ],
)
def test_a_fault_fails_parity_and_is_localized(parity_case, inject, fault, dtype, where):
    inject(fault)
    run, ref, cfg = parity_case("tiny-gqa8", 4, dtype)
    with pytest.raises(pytest.fail.Exception, match=f"out of tolerance.*{where}"):
        check_parity(run, ref, dtype, cfg.num_hidden_layers)


def test_float32_greedy_matches_reference_for_64_steps(
    trained_dir, model_factory, reference_factory
):
    prompt = prompt_ids(trained_dir, 5)
    ours = generate(model_factory(trained_dir), prompt, 64, eos_token_ids=[]).tokens
    theirs = reference_factory(trained_dir).greedy(prompt, 64)
    assert len(theirs) == 64, "the reference stopped early at EOS; pick another prompt"
    assert ours == theirs


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_greedy_diverges_only_between_top5_tokens(
    trained_dir, model_factory, reference_factory, dtype
):
    """vLLM's rule: at the first differing step, each side's token is in the other's
    top 5. The first divergent step (or none) goes into the parity report."""
    prompt, n = prompt_ids(trained_dir, 5), 64
    gen = generate(model_factory(trained_dir, dtype), prompt, n, eos_token_ids=[], keep_logits=True)
    ref = reference_factory(trained_dir)
    theirs = ref.greedy(prompt, n)
    k = next((i for i, (a, b) in enumerate(zip(gen.tokens, theirs)) if a != b), None)
    PARITY_ROWS.append({"shape": "trained", "dtype": dtype, "greedy_first_divergence": k})
    if k is None:
        return
    ours_logits = gen.logits[len(prompt) - 1 + k]
    ref_logits = ref.logits(prompt + gen.tokens[:k])[-1]  # same prefix on both sides
    assert gen.tokens[k] in top_k(ref_logits, 5), f"step {k}: our token not in reference top-5"
    assert theirs[k] in top_k(ours_logits, 5), f"step {k}: reference token not in our top-5"
