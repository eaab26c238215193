"""Choosing an engine: built-in names, module:Class, entry points, and one clear error
per bad choice; the interface's methods with defaults (trim, decode_batch, fill,
run_prefill / run_decode, greedy's timings and EOS) on every built-in engine. The
user engine here is the README's example."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest

from conform_mlx import REPO_ROOT
from conform_mlx.engines import (
    ENTRY_POINT_GROUP,
    Engine,
    EngineCache,
    EngineError,
    NotApplicable,
    known_engines,
    resolve,
)
from conform_mlx.engines.hf_engine import HfCache
from conform_mlx.engines.impl_engine import ImplCache, ImplCompiledEngine, ImplEngine
from conform_mlx.impl.config import LlamaConfig
from conform_mlx.validate import kv_bytes
from suites.tolerances import FP32_SAME_ENGINE_ATOL

pytestmark = [
    pytest.mark.impl_only("tests engine selection (the harness), not an engine"),
    pytest.mark.checkpoint_group("tiny-gqa8"),
]

BUILTIN = [
    "impl",
    "impl-compiled",
    "impl-dequantized",
    "impl-batch-invariant",
    "mlx-lm",
    "hf",
    "llama.cpp",
]
# The engines that read a checkpoint directory (llama.cpp reads GGUF only; its adapter has
# suites/test_llama_cpp.py).
DIR_ENGINES = [n for n in BUILTIN if n != "llama.cpp"]
SHAPE = "tiny-gqa8"
IDS = list(range(3, 24))  # 21 tokens: a partial second block at impl's 16


def readme_engine() -> str:
    """docs/engines.md's example engine (the first python block of "Your own engine")."""
    section = (REPO_ROOT / "docs" / "engines.md").read_text().split("## Your own engine", 1)[1]
    return re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)[0]


NOT_AN_ENGINE = """

class NotAnEngine:
    name = "nope"
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "user_engines.py").write_text(readme_engine() + NOT_AN_ENGINE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_engines"


def test_builtin_names_resolve():
    assert resolve("impl") is ImplEngine
    assert resolve("impl-compiled") is ImplCompiledEngine
    assert known_engines()[: len(BUILTIN)] == BUILTIN


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(EngineError, match=r"unknown engine 'nope'; known: impl, impl-compiled, "):
        resolve("nope")


def test_module_path_engine_runs(user_module, checkpoint):
    cls = resolve(f"{user_module}:SmallBlocks")
    assert cls.name == "impl-bs8"
    engine = cls.load(checkpoint("tiny-gqa8"), "float32")
    cache = engine.new_cache(20)
    cache.add_sequence(0)
    engine.prefill(cache, 0, list(range(3, 23)))
    facts = cache.block_facts(0)
    assert (facts.block_size, facts.blocks_used) == (8, math.ceil(20 / 8))


def test_entry_point_engine_resolves(user_module, tmp_path):
    dist = tmp_path / "user_engines-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-engines\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nsmall-blocks = {user_module}:SmallBlocks\n"
    )
    assert "small-blocks" in known_engines()
    assert resolve("small-blocks").name == "impl-bs8"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("user_engines:NotAnEngine", "is not a subclass of conform_mlx.engines.Engine"),
        ("user_engines:Missing", "has no attribute 'Missing'"),
        ("no_such_module_xyz:Engine", "cannot import no_such_module_xyz"),
    ],
)
def test_bad_module_paths_are_refused(user_module, spec, message):
    with pytest.raises(EngineError, match=message):
        resolve(spec)


def test_bad_dtype_is_refused(checkpoint):
    with pytest.raises(EngineError, match="unsupported dtype 'float8'; choose one of float32"):
        ImplEngine.load(checkpoint("tiny-gqa8"), "float8")


def test_pytest_refuses_an_unknown_engine():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "suites/test_engines.py", "--engine", "nope", "-q"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == pytest.ExitCode.USAGE_ERROR
    known = ", ".join(BUILTIN)
    assert f"unknown engine 'nope'; known: {known}" in out.stderr


# -- the interface's methods with defaults, on every built-in engine ----------------


@pytest.fixture(scope="module")
def builtin(checkpoint):
    """Factory: a built-in engine on the tiny GQA 8:1 checkpoint in float32, loaded once."""
    loaded: dict[str, Engine] = {}

    def get(name: str) -> Engine:
        if name == "mlx-lm":
            pytest.importorskip("mlx_lm", reason="needs the peers extra")
        if name not in loaded:
            loaded[name] = resolve(name).load(checkpoint(SHAPE), "float32")
        return loaded[name]

    return get


def fresh_last(engine: Engine, history: list[int]) -> np.ndarray:
    """Last logits of a prefill of ``history`` into a new cache: what any cached path
    to the same history must give."""
    cache = engine.new_cache(len(history))
    cache.add_sequence(0)
    return engine.prefill(cache, 0, history)[-1]


def check_trim_rolls_back(engine: Engine, cache: EngineCache, seq, history: list[int]) -> None:
    """``seq`` holds ``history`` plus one decoded token; trimming it must leave exactly
    ``history``, so the next token continues it as a fresh prefill does."""
    assert cache.trim(seq, 1) == 1
    assert cache.tokens(seq) == len(history)
    got = engine.decode(cache, seq, 200)
    np.testing.assert_allclose(
        got, fresh_last(engine, [*history, 200]), atol=FP32_SAME_ENGINE_ATOL, rtol=0
    )


@pytest.mark.parametrize("name", DIR_ENGINES)
def test_trim_rolls_back_a_decode(builtin, name):
    engine = builtin(name)
    cache = engine.new_cache(len(IDS) + 1)
    cache.add_sequence(0)
    engine.prefill(cache, 0, IDS)
    engine.decode(cache, 0, 100)
    check_trim_rolls_back(engine, cache, 0, IDS)
    assert cache.trim(0, 1000) == len(IDS) + 1  # no more than it holds
    assert cache.tokens(0) == 0


@pytest.mark.parametrize("name", DIR_ENGINES)
def test_generate_is_greedy(name, trained_dir):
    """The engine's own loop (timed by the GPU bench) gives greedy's tokens, EOS
    included: on the trained model, where greedy is stable."""
    if name == "mlx-lm":
        pytest.importorskip("mlx_lm", reason="needs the peers extra")
    engine = resolve(name).load(trained_dir, "float32")
    prompt = [1, 5, 9, 30]
    full = engine.greedy(prompt, 12).tokens
    assert engine.generate(prompt, 12) == full
    eos = full[5]
    stop = full.index(eos) + 1
    assert engine.generate(prompt, 12, eos_token_ids=[eos]) == full[:stop]


class _TrimReportsButKeeps(ImplCache):
    """A planted bug: trim says it dropped the tokens and drops nothing."""

    def trim(self, seq, n: int) -> int:
        return n


def test_a_trim_that_keeps_the_token_is_caught(builtin):
    engine = builtin("impl")
    cache = _TrimReportsButKeeps(engine.new_cache(len(IDS) + 2).paged)
    cache.add_sequence(0)
    engine.prefill(cache, 0, IDS)
    engine.decode(cache, 0, 100)
    with pytest.raises(AssertionError, match="assert 22 == 21"):
        check_trim_rolls_back(engine, cache, 0, IDS)


def test_a_trim_that_counts_right_but_drops_the_wrong_token_is_caught(builtin):
    """A planted bug the count cannot see: one token too many dropped, and the count
    made good with an arbitrary position (hf's fill appends random K/V)."""
    engine = builtin("hf")

    class TrimsOneTooMany(HfCache):
        def trim(self, seq, n: int) -> int:
            dropped = super().trim(seq, n + 1)
            engine.fill(self, seq, 1)
            return dropped - 1

    cache = TrimsOneTooMany(engine.ref.config)
    cache.add_sequence(0)
    engine.prefill(cache, 0, IDS)
    engine.decode(cache, 0, 100)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check_trim_rolls_back(engine, cache, 0, IDS)


@pytest.mark.parametrize("name", DIR_ENGINES)
def test_decode_batch_equals_each_sequence_alone(builtin, name):
    """Mixed lengths (one a full block at impl's 16), then the same step again after a
    rollback (the benchmarks' loop), then one sequence on its own."""
    engine = builtin(name)
    lengths, new = [3, 16, 21], [100, 101, 102]
    cache = engine.new_cache(max(lengths) + 1, max_sequences=len(lengths))
    for s, n in enumerate(lengths):
        cache.add_sequence(s)
        engine.prefill(cache, s, IDS[:n])
    seqs = list(range(len(lengths)))
    got = engine.decode_batch(cache, seqs, new)
    assert got.shape[0] == len(lengths)
    assert [cache.tokens(s) for s in seqs] == [n + 1 for n in lengths]
    for s, n, t in zip(seqs, lengths, new):
        want = fresh_last(engine, [*IDS[:n], t])
        np.testing.assert_allclose(got[s], want, atol=FP32_SAME_ENGINE_ATOL, rtol=0)
    for s in seqs:
        cache.trim(s, 1)
    again = engine.decode_batch(cache, seqs, new)
    np.testing.assert_allclose(again, got, atol=FP32_SAME_ENGINE_ATOL, rtol=0)
    check_trim_rolls_back(engine, cache, 0, IDS[: lengths[0]])
    assert [cache.tokens(s) for s in seqs] == [n + 1 for n in lengths]


@pytest.mark.parametrize("name", DIR_ENGINES)
def test_fill_grows_the_context_like_tokens_fed(builtin, checkpoint, name):
    """Filled positions count as cached tokens and cost the bytes tokens would."""
    engine = builtin(name)
    cfg = LlamaConfig.from_dir(checkpoint(SHAPE))
    cache = engine.new_cache(41)
    cache.add_sequence(0)
    engine.fill(cache, 0, 40)
    g = cache.granularity
    assert cache.tokens(0) == 40
    assert cache.kv_bytes(0) == kv_bytes(cfg, 4, math.ceil(40 / g) * g)
    assert np.isfinite(engine.decode(cache, 0, 5)).all()
    assert cache.tokens(0) == 41


@pytest.mark.parametrize("name", DIR_ENGINES)
def test_run_steps_feed_what_prefill_and_decode_feed(builtin, name):
    """run_prefill / run_decode return nothing but leave the cache as prefill / decode do."""
    engine = builtin(name)
    cache = engine.new_cache(len(IDS) + 2)
    cache.add_sequence(0)
    engine.run_prefill(cache, 0, IDS)
    engine.run_decode(cache, [0], [100])
    assert cache.tokens(0) == len(IDS) + 1
    got = engine.decode(cache, 0, 200)
    np.testing.assert_allclose(
        got, fresh_last(engine, [*IDS, 100, 200]), atol=FP32_SAME_ENGINE_ATOL, rtol=0
    )


@pytest.mark.parametrize("name", DIR_ENGINES)
def test_greedy_times_each_step_and_stops_at_eos(builtin, name):
    engine = builtin(name)
    gen = engine.greedy(IDS[:5], 4)
    assert len(gen.tokens) == 4 and gen.logits.shape[0] == 4
    assert gen.prefill_ms > 0 and len(gen.decode_ms) == 3 and min(gen.decode_ms) > 0
    stopped = engine.greedy(IDS[:5], 4, eos_token_ids=[gen.tokens[1]])
    assert stopped.tokens == gen.tokens[: gen.tokens.index(gen.tokens[1]) + 1]


def test_hf_engine_is_the_reference_in_float32_only(builtin, checkpoint, reference_factory):
    engine = builtin("hf")
    cache = engine.new_cache(len(IDS))
    cache.add_sequence(0)
    want = reference_factory(checkpoint(SHAPE)).logits(IDS)
    np.testing.assert_allclose(engine.prefill(cache, 0, IDS), want, atol=1e-5, rtol=0)
    with pytest.raises(NotApplicable, match="float32 only"):
        resolve("hf").load(checkpoint(SHAPE), "float16")
