"""Logits parity of the engine under test (``--engine``) against the HF float32 reference.

Each case feeds PREFILL_LEN tokens as one prefill, then decodes the rest one token
at a time through the engine's cache, and compares every step's logits with one
reference forward pass over the same tokens. A failing case names the first
layer and sub-block whose activations depart from the reference. Every case's
metrics go into the parity report (terminal table, results/parity.json for impl,
results/parity-<engine>.json otherwise) and the conformance report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import conform_mlx.impl.kernels.rope
import conform_mlx.impl.model
from conform_mlx.engines import Engine, NotApplicable
from conform_mlx.localize import first_departure
from conform_mlx.metrics import compare_logits, top_k
from suites.conftest import PARITY_ROWS, TINY_SHAPES, expect_known_issue
from suites.tolerances import NMSE_LIMIT

pytestmark = [
    pytest.mark.engine_suite,
    pytest.mark.checkpoint_group("tiny-gqa8", param="name"),  # tiny-gqa8: the fault cases
]

PROMPT_TEXT = "The quick brown fox jumps over the lazy dog .\nOne two three"
PREFILL_LEN = 7
TOTAL_LEN = 40  # crosses several 4-token blocks and two 16-token blocks
SHAPES = ["trained", *TINY_SHAPES, "tiny-llama3-rope", "tiny-linear-rope", "tiny-yarn-rope"]
DTYPES = ["float32", "float16", "bfloat16"]
# Dtypes in which a known RoPE bug is expected to show: on random weights a RoPE error
# sits below bfloat16's tolerance (see conform_mlx/metrics.py), so there it may pass.
KNOWN_ISSUE_DTYPES = ("float32", "float16")


def prompt_ids(path: Path, n: int) -> list[int]:
    """Text through the checkpoint's tokenizer where it has one, else seeded ids."""
    tok = path / "tokenizer.json"
    if tok.is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tok)).encode(PROMPT_TEXT * 4).ids
        return [1, *ids][:n]
    return np.random.default_rng(0).integers(0, 512, n).tolist()


@dataclass
class EngineRun:
    steps: list[np.ndarray]  # prefill logits (P, V), then one (1, V) per decoded token
    trace: dict[str, np.ndarray]  # name -> (positions, hidden), all steps joined
    block_size: int | None  # None: an unpaged cache


def engine_logits(
    engine: Engine, tokens: list[int], n_prefill: int, block_size: int | None = None
) -> EngineRun:
    """Prefill n_prefill tokens, decode the rest; block_size=None: the engine's default."""
    cache = engine.new_cache(len(tokens), block_size=block_size)
    cache.add_sequence(0)
    try:
        used_block_size = cache.block_facts(0).block_size
    except NotApplicable:
        used_block_size = None
    trace: dict[str, list[np.ndarray]] = {}
    steps = [engine.prefill(cache, 0, tokens[:n_prefill], trace=trace)]
    for t in tokens[n_prefill:]:
        steps.append(engine.decode(cache, 0, t, trace=trace)[None])
    return EngineRun(steps, {k: np.concatenate(v) for k, v in trace.items()}, used_block_size)


def parity_metrics(run: EngineRun, ref) -> dict:
    p = len(run.steps[0])
    whole = np.concatenate(run.steps)
    return {
        "prefill": compare_logits(run.steps[0], ref.logits[:p]).as_dict(),
        "decode": compare_logits(whole[p:], ref.logits[p:]).as_dict(),
    }


def worst_nmse(metrics: dict) -> float:
    return max(metrics["prefill"]["nmse"], metrics["decode"]["nmse"])


def check_parity(run: EngineRun, ref, dtype: str, num_layers: int) -> dict:
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
    metrics = parity_metrics(run, ref)
    if bad:
        where = first_departure(run.trace, ref.trace, num_layers, limit)
        located = where.describe() if where else "no activation departs beyond tolerance"
        pytest.fail(f"{len(bad)} step(s) out of tolerance: {'; '.join(bad[:3])}. {located}")
    return metrics


@pytest.fixture
def parity_case(request, checkpoint, trained_dir, engine_factory, reference_factory):
    """make(shape, block_size, dtype) -> (EngineRun, reference run, number of layers).

    Marks the test a strict expected failure where the engine has a known issue
    with the checkpoint and the dtype's tolerance can see it.
    """

    def make(name: str, block_size: int | None, dtype: str = "float32"):
        path = trained_dir if name == "trained" else checkpoint(name)
        engine = engine_factory(path, dtype)
        try:
            run = engine_logits(engine, prompt_ids(path, TOTAL_LEN), PREFILL_LEN, block_size)
        except NotApplicable as e:
            pytest.skip(f"engine {engine.name}: {e}")
        if dtype in KNOWN_ISSUE_DTYPES:
            expect_known_issue(request, engine, path)
        ref = reference_factory(path).run(prompt_ids(path, TOTAL_LEN))
        return run, ref, _num_layers(path)

    return make


def _num_layers(path: Path) -> int:
    from conform_mlx.impl.config import LlamaConfig

    return LlamaConfig.from_dir(path).num_hidden_layers


@pytest.mark.conformance("logits parity {dtype}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_reference(parity_case, metric, name, dtype):
    run, ref, layers = parity_case(name, None, dtype)
    metrics = parity_metrics(run, ref)
    metric("NMSE", worst_nmse(metrics))
    check_parity(run, ref, dtype, layers)
    PARITY_ROWS.append({"shape": name, "dtype": dtype, "block_size": run.block_size, **metrics})


@pytest.mark.conformance("logits parity float32, block size 4")
@pytest.mark.parametrize("name", SHAPES)
def test_float32_parity_with_block_size_4(parity_case, metric, name):
    run, ref, layers = parity_case(name, 4)
    metric("NMSE", worst_nmse(parity_metrics(run, ref)))
    check_parity(run, ref, "float32", layers)


@pytest.fixture
def inject(monkeypatch):
    """Faults in impl's code (so the tests using it are impl_only)."""

    def apply(fault: str) -> None:
        if fault == "decode rope off by one":
            # Rotating at cached_len + 1 (the length after the append). A shift of every
            # token alike would be invisible: RoPE scores depend on relative position.
            # Injected where the angles are made: the twin and the GPU kernel both see it.
            real = conform_mlx.impl.kernels.rope.rope_cos_sin

            def shifted(positions, inv_freq, scale=1.0):
                decode = positions.shape[1] == 1
                return real(positions + 1 if decode else positions, inv_freq, scale)

            monkeypatch.setattr(conform_mlx.impl.kernels.rope, "rope_cos_sin", shifted)
        else:
            # The down projection is linear: 5% more input, 5% more output.
            real = conform_mlx.impl.model.MLP.activate
            monkeypatch.setattr(
                conform_mlx.impl.model.MLP, "activate", lambda self, x: real(self, x) * 1.05
            )

    return apply


@pytest.mark.impl_only("injects faults into impl's RoPE kernel and MLP")
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
    run, ref, layers = parity_case("tiny-gqa8", 4, dtype)
    with pytest.raises(pytest.fail.Exception, match=f"out of tolerance.*{where}"):
        check_parity(run, ref, dtype, layers)


def _identical_steps(ours: list[int], theirs: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))


@pytest.mark.conformance("greedy match float32, 64 steps")
def test_float32_greedy_matches_reference_for_64_steps(
    trained_dir, engine_factory, reference_factory, metric
):
    prompt = prompt_ids(trained_dir, 5)
    ours = engine_factory(trained_dir).greedy(prompt, 64).tokens
    theirs = reference_factory(trained_dir).greedy(prompt, 64)
    assert len(theirs) == 64, "the reference stopped early at EOS; pick another prompt"
    metric("identical steps", _identical_steps(ours, theirs), "min")
    assert ours == theirs


@pytest.mark.conformance("greedy top-5 rule {dtype}")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_greedy_diverges_only_between_top5_tokens(
    trained_dir, engine_factory, reference_factory, metric, dtype
):
    """vLLM's rule: at the first differing step, each side's token is in the other's
    top 5. The first divergent step (or none) goes into the parity report."""
    prompt, n = prompt_ids(trained_dir, 5), 64
    gen = engine_factory(trained_dir, dtype).greedy(prompt, n)
    ref = reference_factory(trained_dir)
    theirs = ref.greedy(prompt, n)
    k = next((i for i, (a, b) in enumerate(zip(gen.tokens, theirs)) if a != b), None)
    PARITY_ROWS.append({"shape": "trained", "dtype": dtype, "greedy_first_divergence": k})
    metric("identical steps", n if k is None else k, "min")
    if k is None:
        return
    ours_logits = gen.logits[k]
    ref_logits = ref.logits(prompt + gen.tokens[:k])[-1]  # same prefix on both sides
    assert gen.tokens[k] in top_k(ref_logits, 5), f"step {k}: our token not in reference top-5"
    assert theirs[k] in top_k(ours_logits, 5), f"step {k}: reference token not in our top-5"
