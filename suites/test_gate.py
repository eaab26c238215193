"""``conform gate`` never passes by accident: whatever keeps it from measuring exits 2
with the reason, and 1 is kept for a measured regression. (The regression itself is
proven in CI by ``conform gate --prove``, which plants a 2x slowdown.)"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conform_mlx import gate

pytestmark = [
    pytest.mark.skipif(
        shutil.which("git") is None or not (gate.REPO_ROOT / ".git").exists(),
        reason="needs the project's git history (a clone, not an export)",
    ),
    pytest.mark.impl_only("tests the regression gate (the harness), not an engine"),
]
BASE, HEAD = "a" * 40, "b" * 40


def test_unknown_base_ref_is_an_error(capsys):
    assert gate.main(["--base", "nosuchref"]) == 2
    assert "unknown ref 'nosuchref'" in capsys.readouterr().err


def test_unknown_head_ref_is_an_error(capsys):
    assert gate.main(["--head", "nosuchref"]) == 2
    assert "unknown ref 'nosuchref'" in capsys.readouterr().err


def test_no_git_repository_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gate, "REPO_ROOT", tmp_path)
    assert gate.main([]) == 2
    assert "not a git repository" in capsys.readouterr().err
    assert gate.main(["--prove"]) == 2


def test_no_asv_is_an_error(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "asv" else real(name, *a)
    )
    assert gate.main([]) == 2
    assert "asv is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--factor", "1"], ["--factor", "0.5"], ["--rounds", "0"]])
def test_meaningless_settings_are_refused(args):
    with pytest.raises(SystemExit) as e:
        gate.main(args)
    assert e.value.code == 2


def write_results(root: Path, sha: str, values: dict[str, list]) -> None:
    folder = root / "machine"
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"results": {name: [v, [], "version"] for name, v in values.items()}}
    (folder / f"{sha[:8]}-virtualenv-py3.11.json").write_text(json.dumps(doc))


DECODE = "bench_engine.GateDecode.time_decode"


def test_numbers_on_both_sides_are_measured(tmp_path):
    write_results(tmp_path, BASE, {DECODE: [0.01, 0.02]})
    write_results(tmp_path, HEAD, {DECODE: [0.01, 0.03]})
    assert gate.check_measured(tmp_path, {"base": BASE, "head": HEAD}) == 2


@pytest.mark.parametrize(
    ("head_values", "reason"),
    [
        (None, "no results for head"),  # the commit did not build
        ({"bench_engine.SmallDecode.time_decode": [0.01]}, "no benchmark matching"),
        ({DECODE: [0.01, None]}, "failed or skipped"),  # asv's 1, not a regression
        ({DECODE: [0.01, float("nan")]}, "failed or skipped"),  # skipped: asv's 0
    ],
)
def test_what_cannot_be_compared_is_an_error(tmp_path, head_values, reason):
    write_results(tmp_path, BASE, {DECODE: [0.01, 0.02]})
    if head_values is not None:
        write_results(tmp_path, HEAD, head_values)
    with pytest.raises(gate.GateError, match=reason):
        gate.check_measured(tmp_path, {"base": BASE, "head": HEAD})


def test_the_planted_slowdown_still_applies():
    """``conform gate --prove`` plants a second forward pass into impl's decode by
    editing one anchor in the source; a refactor that moves the anchor would make the
    proof fail in CI instead of here. The planted file must still compile."""
    path, old, new = gate.SLOW_DECODE
    text = (gate.REPO_ROOT / path).read_text()
    assert text.count(old) == 1, f"gate anchor {old!r} occurs {text.count(old)} times in {path}"
    planted = text.replace(old, new, 1)
    compile(planted, path, "exec")
    assert "planted: decode twice" in planted.split("def decode(", 1)[1].split("\ndef ", 1)[0]
