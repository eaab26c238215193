"""Properties of one engine against itself: a sequence's logits must not depend on what
else is in its batch (batch invariance), nor on the path that fed its prompt (one
prefill, chunks, token by token, a fork), beyond the rounding of the dtype; and a run
repeated, in the same process or in a new one, gives the same logits (determinism).

Each case records the fraction of rows that are bitwise identical (a batch-invariant
engine reads 1.0) and holds the mean KL between the two paths to the corpus limit of
the dtype (``KLD_LIMIT``): a sequence reading another's cache, or a chunk attending
to the wrong prefix, is far outside it (shown below with a planted bug).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conform_mlx.engines import Engine, NotApplicable, load_engine
from conform_mlx.metrics import KLD_LIMIT, compare_logits
from conform_mlx.models import open_model

pytestmark = [pytest.mark.engine_suite, pytest.mark.checkpoint_group("trained")]

DTYPES = ["float32", "float16", "bfloat16"]
PROMPT = 64
# How a prompt reaches the cache besides one prefill: chunks (37 crosses blocks of 16 at
# an odd place; 512 is the whole prompt at once, as one prefill), token by token through
# decode, and through a fork of a parent that holds the first part (at a block edge, 16,
# and inside a block, 21).
PATHS = ["chunks of 1", "chunks of 7", "chunks of 37", "chunks of 512", "decode", "fork at 16",
         "fork at 21"]  # fmt: skip
BATCHES = [2, 8, 32]


def prompt_tokens() -> list[int]:
    return np.random.default_rng(7).integers(3, 512, PROMPT).tolist()


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    return prompt_tokens()


def bitwise_rows(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of rows of ``a`` and ``b`` that are bitwise identical."""
    return float(np.mean([np.array_equal(x, y) for x, y in zip(a, b)]))


def check_close(got: np.ndarray, want: np.ndarray, dtype: str, what: str) -> None:
    diff = compare_logits(got, want)
    if not diff.kl_mean <= KLD_LIMIT[dtype]["kl_mean"]:
        pytest.fail(
            f"{what}: KL mean {diff.kl_mean:.3g} (limit {KLD_LIMIT[dtype]['kl_mean']:g}), "
            f"KL max {diff.kl_max:.3g}, max|dlogit| {diff.max_abs:.3g}"
        )


def fed(engine: Engine, tokens: list[int], path: str) -> np.ndarray:
    """Logits (len(tokens), vocab) of every prompt position, fed by ``path``."""
    cache = engine.new_cache(2 * len(tokens), max_sequences=2)  # a fork's two sequences
    cache.add_sequence(0)
    if path == "one prefill":
        return engine.prefill(cache, 0, tokens)
    if path.startswith("chunks of "):
        return engine.prefill(cache, 0, tokens, chunk_size=int(path.split()[-1]))
    if path == "decode":
        first = engine.prefill(cache, 0, tokens[:1])
        return np.concatenate([first, np.stack([engine.decode(cache, 0, t) for t in tokens[1:]])])
    at = int(path.split()[-1])  # fork at N: a parent holds tokens[:N], its child the rest
    head = engine.prefill(cache, 0, tokens[:at])
    cache.fork(0, 1)
    engine.prefill(cache, 0, [1, 2, 3])  # the parent moves on: the child must not see it
    return np.concatenate([head, engine.prefill(cache, 1, tokens[at:])])


@pytest.mark.conformance("self-consistency {dtype}")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prompt_paths_agree(trained_dir, engine_factory, tokens, dtype, path, metric):
    """Every prompt position's logits, through ``path``, against one prefill."""
    engine = engine_factory(trained_dir, dtype)
    try:
        got = fed(engine, tokens, path)
    except NotApplicable as e:
        pytest.skip(f"engine {engine.name}: {e}")
    want = fed(engine, tokens, "one prefill")
    metric("rows bitwise identical", bitwise_rows(got, want), worst="min")
    check_close(got, want, dtype, f"{path} against one prefill, {dtype}")


def co_tenants(engine: Engine, tokens: list[int], batch: int):
    """A cache holding the target (PROMPT - 1 tokens) and batch - 1 others of other
    lengths and tokens; returns (cache, the others' ids, each one's next token)."""
    cache = engine.new_cache(PROMPT + 64, max_sequences=batch)
    rng = np.random.default_rng(batch)
    cache.add_sequence("target")
    engine.prefill(cache, "target", tokens[:-1])
    others = [f"s{i}" for i in range(batch - 1)]
    for i, s in enumerate(others):
        cache.add_sequence(s)
        engine.prefill(cache, s, rng.integers(3, 512, 1 + (11 * i + 5) % 60).tolist())
    return cache, others, rng.integers(3, 512, batch - 1).tolist()


@pytest.mark.conformance("batch invariance {dtype}")
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_does_not_depend_on_its_batch(
    trained_dir, engine_factory, tokens, dtype, batch, metric
):
    """The target's decode row alone, against the same step at every place in a batch of
    ``batch`` sequences of other lengths (each step rolled back before the next)."""
    engine = engine_factory(trained_dir, dtype)
    cache, others, nxt = co_tenants(engine, tokens, batch)
    try:
        alone = engine.decode_batch(cache, ["target"], [tokens[-1]])[0]
        cache.trim("target", 1)
    except NotApplicable as e:
        pytest.skip(f"engine {engine.name}: {e}")
    rows = []
    for place in range(batch):
        seqs = others[:place] + ["target"] + others[place:]
        ids = nxt[:place] + [tokens[-1]] + nxt[place:]
        rows.append(engine.decode_batch(cache, seqs, ids)[place])
        for s in seqs:
            cache.trim(s, 1)
    rows = np.stack(rows)
    metric("rows bitwise identical", bitwise_rows(rows, np.broadcast_to(alone, rows.shape)),
           worst="min")  # fmt: skip
    check_close(rows, np.broadcast_to(alone, rows.shape), dtype, f"batch of {batch}, {dtype}")


def repeatable(engine: Engine, tokens: list[int]) -> np.ndarray:
    """What the determinism check repeats: every position of one prefill, then one decode
    step of a batch of 8 sequences of other lengths, rows stacked."""
    prompt = fed(engine, tokens, "one prefill")
    cache, others, nxt = co_tenants(engine, tokens, 8)
    step = engine.decode_batch(cache, ["target", *others], [tokens[-1], *nxt])
    return np.concatenate([prompt, step])


def in_a_new_process(engine: Engine, model: Path, dtype: str, out: Path) -> np.ndarray:
    """``repeatable`` run by a fresh Python process (``suites/rerun.py``) on the same model."""
    spec = f"{type(engine).__module__}:{type(engine).__qualname__}"
    cmd = [sys.executable, "-m", "suites.rerun", spec, str(model), dtype, str(out)]
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("the second process did not finish in 600 s")
    if done.returncode != 0:
        pytest.fail(f"the second process failed ({done.returncode}): {done.stderr[-2000:]}")
    return np.load(out)


@pytest.mark.conformance("determinism {dtype}")
@pytest.mark.parametrize("where", ["same process", "new process"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_run_repeats_bitwise(
    trained_dir, engine_factory, engine_model, tokens, dtype, where, metric, tmp_path
):
    """The same prefill and batched decode run again, on a fresh cache: in this process
    after the first run, or in a new process. Reports the fraction of rows bitwise the
    same; a run that differs must still sit within the dtype's KL limit."""
    engine = engine_factory(trained_dir, dtype)
    try:
        first = repeatable(engine, tokens)
    except NotApplicable as e:
        pytest.skip(f"engine {engine.name}: {e}")
    if where == "same process":
        again = repeatable(engine, tokens)
    else:
        again = in_a_new_process(engine, engine_model(trained_dir), dtype, tmp_path / "run.npy")
    metric("rows bitwise identical", bitwise_rows(again, first), worst="min")
    check_close(again, first, dtype, f"a run repeated in the {where}, {dtype}")


@pytest.mark.impl_only("plants nondeterminism in impl's batched decode")
def test_determinism_check_catches_a_run_that_drifts(trained_dir, engine_factory, engine_model,
                                                     tokens, monkeypatch, tmp_path):  # fmt: skip
    """A batched decode whose rows drift run to run (noise of 0.5 a logit, a new draw each
    call) reads none of the step's rows bitwise the same, and fails the KL limit."""
    engine = engine_factory(trained_dir, "float32")
    real = type(engine).decode_batch
    rng = np.random.default_rng(0)

    def drifting(self, cache, seqs, ids):
        rows = real(self, cache, seqs, ids)
        return rows + rng.normal(0, 0.5, rows.shape).astype(rows.dtype)

    monkeypatch.setattr(type(engine), "decode_batch", drifting)
    seen = {}
    with pytest.raises(pytest.fail.Exception, match="KL mean"):
        test_a_run_repeats_bitwise(
            trained_dir, engine_factory, engine_model, tokens, "float32", "same process",
            lambda label, value, worst: seen.update({label: value}), tmp_path,
        )  # fmt: skip
    assert seen["rows bitwise identical"] == 64 / 72  # the prefill's rows, not the step's


@pytest.mark.impl_only("plants a bug in impl's batched decode")
def test_batch_check_catches_rows_from_another_sequence(trained_dir, engine_factory, tokens,
                                                        monkeypatch):  # fmt: skip
    """The check has teeth: a batched decode that hands each sequence its neighbour's
    row fails it."""
    engine = engine_factory(trained_dir, "float32")
    real = type(engine).decode_batch
    monkeypatch.setattr(
        type(engine), "decode_batch", lambda self, c, s, t: np.roll(real(self, c, s, t), 1, 0)
    )
    with pytest.raises(pytest.fail.Exception, match="KL mean"):
        test_a_row_does_not_depend_on_its_batch(
            trained_dir, engine_factory, tokens, "float32", 2, lambda *a, **k: None
        )


@pytest.mark.impl_only("checks impl's batch-invariant mode, whatever engine the run judges")
@pytest.mark.parametrize("dtype", DTYPES)
def test_impl_batch_invariant_mode_is_bitwise(trained_dir, tokens, dtype):
    """``impl-batch-invariant``: every row bitwise the same alone and at every place in a
    batch of 8, and every prompt path bitwise one prefill. (The default impl in float32
    reads 0 identical rows here: OpenBLAS multiplies one row and many by other kernels.)"""
    engine = load_engine("impl-batch-invariant", open_model(trained_dir), dtype)
    cache, others, nxt = co_tenants(engine, tokens, 8)
    alone = engine.decode_batch(cache, ["target"], [tokens[-1]])[0]
    cache.trim("target", 1)
    for place in range(8):
        seqs = others[:place] + ["target"] + others[place:]
        row = engine.decode_batch(cache, seqs, nxt[:place] + [tokens[-1]] + nxt[place:])[place]
        assert np.array_equal(row, alone), f"{dtype}: place {place} of 8"
        for s in seqs:
            cache.trim(s, 1)
    want = fed(engine, tokens, "one prefill")
    for path in PATHS:
        assert bitwise_rows(fed(engine, tokens, path), want) == 1.0, f"{dtype}: {path}"


@pytest.mark.impl_only("checks impl's batch-invariant mode, whatever engine the run judges")
def test_impl_batch_invariant_mode_refuses_quantized_weights(trained_dir, tmp_path):
    """MLX's quantized matmul takes a batch's rows together, so the mode would not hold."""
    from conform_mlx.reference.gguf_writer import write_gguf

    path = write_gguf(trained_dir, tmp_path / "q8.gguf", "Q8_0")
    with pytest.raises(NotApplicable, match="float weights only"):
        load_engine("impl-batch-invariant", open_model(path), "float32")
