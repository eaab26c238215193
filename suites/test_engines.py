"""Choosing an engine: built-in names, module:Class, entry points, and one clear error
per bad choice. The user engine here is the README's example."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from conform import REPO_ROOT
from conform.engines import ENTRY_POINT_GROUP, EngineError, known_engines, resolve
from conform.engines.impl_engine import ImplEngine


def readme_engine() -> str:
    """The README's example engine (the first python block of its Engines section)."""
    section = (REPO_ROOT / "README.md").read_text().split("## Engines", 1)[1]
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
    assert known_engines()[:2] == ["impl", "mlx-lm"]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(EngineError, match=r"unknown engine 'nope'; known: impl, mlx-lm"):
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
        ("user_engines:NotAnEngine", "is not a subclass of conform.engines.Engine"),
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
    assert "unknown engine 'nope'; known: impl, mlx-lm" in out.stderr
