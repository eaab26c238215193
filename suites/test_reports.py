"""The run's reports (suites/report.py): written only to --report DIR, marked partial
when the run covers less than the whole selection, and the same under pytest-xdist
as in one process.

A small subset of the suites (parity rows and conformance rows, one cheap shape) runs
in a subprocess once serially and once through xdist on two ``--tx
popen//python=...`` gateways: ``-n 2`` is shorthand for ``--tx 2*popen``, and
``--tx ssh=host//python=...`` takes the same path to other machines. With
``--dist loadgroup`` the subset's two checkpoint groups go one to each worker, so
both send rows. The controller must print the tables and write reports holding
exactly the serial run's rows; workers write nothing. (Each run starts Python,
MLX and torch afresh, so the subset is kept to the cheapest tests.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conform_mlx import REPO_ROOT
from suites import engine_report
from suites.report import report_path

# tiny-mqa parity in every dtype (parity and conformance rows), cache accounting
# through the engine (conformance rows only); ~10 s serially on 2 cores.
SUBSET = ["suites/test_logits_parity.py", "suites/test_cache_accounting.py"]
KEYWORD = "tiny-mqa or fork_continues or blocks_used_after"
FILES = {"parity.partial.json", "engines/impl.partial.json"}
# One worker for the file under --dist loadgroup, so the serial run is made once.
pytestmark = [
    pytest.mark.xdist_group("test_reports"),
    pytest.mark.impl_only("tests the run's reports (the harness), not an engine"),
]
XDIST = ["--dist", "loadgroup", "--tx", f"2*popen//python={sys.executable}"]


def run_subset(report: Path, *extra: str) -> str:
    """Run SUBSET into `report`; returns the output. The run must pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    cmd = [sys.executable, "-m", "pytest", *SUBSET, "-k", KEYWORD, "-p", "no:cacheprovider"]
    out = subprocess.run(
        [*cmd, "--report", str(report), *extra],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def written(report: Path) -> dict[str, dict]:
    return {
        p.relative_to(report).as_posix(): json.loads(p.read_text()) for p in report.rglob("*.json")
    }


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> dict[str, dict]:
    report = tmp_path_factory.mktemp("serial")
    run_subset(report)
    return written(report)


def test_a_partial_run_says_so_and_writes_only_partial_files(serial):
    assert set(serial) == FILES
    for doc in serial.values():
        assert doc["partial"][:2] == [f"only {f}" for f in SUBSET]
        assert doc["run"]["tests"] == {"selected": 10, "ran": 10}
        assert doc["run"]["xdist_workers"] == 0
    parity = serial["parity.partial.json"]["cases"]
    assert [(r["shape"], r["dtype"]) for r in parity] == [
        ("tiny-mqa", d) for d in ("float32", "float16", "bfloat16")
    ]
    cases = serial["engines/impl.partial.json"]["properties"]
    assert sum(len(p["cases"]) for p in cases.values()) == 10


def test_xdist_controller_merges_the_serial_rows(serial, tmp_path):
    out = run_subset(tmp_path, *XDIST)
    got = written(tmp_path)
    assert set(got) == FILES  # the controller's two files; workers write none
    assert "parity report" in out and "conformance report" in out
    for name, doc in got.items():
        assert doc["run"]["xdist_workers"] == 2
        assert doc["run"]["tests"] == serial[name]["run"]["tests"]
        assert doc["partial"] == serial[name]["partial"]
    assert got["parity.partial.json"]["cases"] == serial["parity.partial.json"]["cases"]
    engines = "engines/impl.partial.json"
    assert got[engines]["properties"] == serial[engines]["properties"]


def test_partial_engine_files_stay_out_of_the_merged_table(tmp_path):
    header = {"machine": "m", "reference": "r", "run": {}, "partial": []}
    summary = engine_report.summarize(
        [{"property": "p", "test": "t", "status": "pass", "reason": "", "metric": None}]
    )
    for engine, partial in [("impl", []), ("other", ["only one file"])]:
        path = report_path(tmp_path / "engines", engine_report.file_name(engine), partial)
        engine_report.write_engine_json(engine, "1", summary, path, header)
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == [
        "impl.json",
        "other.partial.json",
    ]
    _, merged = engine_report.merge_engine_files(tmp_path)
    assert merged["engines"] == ["impl"]
