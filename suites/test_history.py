"""The committed asv history is whole: every benchmark the README lists publishes data,
and the CPU series has a point for every commit of main since it began, on one BLAS.

asv publish drops, without a word, the results of a benchmark whose version changed
since they were recorded; a history can look fine as files and still show nothing.
So this runs ``asv publish`` for real, into a temporary folder, and reads what it made.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conform_mlx import REPO_ROOT
from conform_mlx.history import CPU_MACHINE, HISTORY_BLAS, asv_config, results_dir

pytestmark = [
    pytest.mark.skipif(
        shutil.which("git") is None or not (REPO_ROOT / ".git").exists(),
        reason="needs the project's git history (a clone, not an export)",
    ),
    pytest.mark.impl_only("checks the committed asv history, not an engine"),
]
# A commit needs a point when it changes what asv installs or runs: the package, the
# benchmarks, their inputs, the build. One that changes only tests, tools, docs or
# results (the results of commit N are committed after it) measures the same code.
NEEDS_POINT = re.compile(
    r"^((impl|kernels|conform_mlx|reference|conform_bench|checkpoints)/"
    r"|pyproject\.toml$|asv\.conf\.json$|constraints\.txt$)"
)


def readme_benchmarks(readme: str) -> list[str]:
    """Benchmark name patterns of the README's table (rows starting with | `bench_x.`)."""
    return re.findall(r"^\| `(bench_\w+\.[^`]+)`", readme, flags=re.M)


def published(tmp_path: Path, results: Path) -> dict[str, int]:
    """asv publish of ``results`` -> {benchmark name: points with a value}, for every
    benchmark asv knows (0 for one that shows nothing)."""
    path = asv_config(tmp_path, results=results)
    html = tmp_path / "html"
    subprocess.run(
        [sys.executable, "-m", "asv", "publish", "--config", str(path)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    points = dict.fromkeys(json.loads((html / "index.json").read_text())["benchmarks"], 0)
    for graph in (html / "graphs").rglob("*.json"):
        if graph.name == "summary.json" or graph.parent.name == "summary":
            continue
        data = json.loads(graph.read_text())
        n = sum(1 for row in data if _has_value(row[1]))
        points[graph.stem] = points.get(graph.stem, 0) + n
    return points


def _has_value(v) -> bool:
    if isinstance(v, list):
        return any(_has_value(x) for x in v)
    return v is not None


def missing_data(patterns: list[str], points: dict[str, int]) -> list[str]:
    """Patterns that match no benchmark, and benchmarks they match that show no data."""
    missing = []
    for pattern in patterns:
        matched = [b for b in points if fnmatch.fnmatch(b, pattern)]
        missing += [b for b in matched if not points[b]] or ([] if matched else [pattern])
    return missing


def test_readme_lists_benchmarks():
    assert len(readme_benchmarks((REPO_ROOT / "README.md").read_text())) >= 3


def test_every_listed_benchmark_publishes_data(tmp_path):
    pytest.importorskip("asv", reason="asv publishes the history (pip install -e '.[test]')")
    patterns = readme_benchmarks((REPO_ROOT / "README.md").read_text())
    points = published(tmp_path, REPO_ROOT / "results" / "asv")
    assert missing_data(patterns, points) == []


def test_a_changed_benchmark_version_is_caught(tmp_path):
    """The bug this guards against: results recorded under another benchmark version
    are dropped by asv publish. Planted by rewriting the recorded versions."""
    pytest.importorskip("asv", reason="asv publishes the history (pip install -e '.[test]')")
    copy = tmp_path / "results"
    shutil.copytree(REPO_ROOT / "results" / "asv", copy)
    for f in (copy / CPU_MACHINE).glob("*.json"):
        if f.name == "machine.json":
            continue
        doc = json.loads(f.read_text())
        column = doc["result_columns"].index("version")
        for row in doc["results"].values():
            row[column] = "planted-old-version"
        f.write_text(json.dumps(doc))
    # Keep only the CPU machine, so nothing else can supply the points.
    for other in copy.iterdir():
        if other.is_dir() and other.name != CPU_MACHINE:
            shutil.rmtree(other)
    patterns = readme_benchmarks((REPO_ROOT / "README.md").read_text())
    assert missing_data(patterns, published(tmp_path, copy)), "planted versions not caught"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout


def cpu_points() -> dict[str, str]:
    """{commit hash: environment name} of the CPU machine's results."""
    out = {}
    for f in results_dir(CPU_MACHINE).glob("*.json"):
        if f.name != "machine.json":
            doc = json.loads(f.read_text())
            out[doc["commit_hash"]] = doc["env_name"]
    return out


def needs_point(commit: str) -> bool:
    files = _git("show", "--format=", "--name-only", commit).split()
    return any(NEEDS_POINT.match(f) for f in files)


def gaps(points: dict[str, str]) -> list[str]:
    """Commits of main's first-parent line, from the oldest with a point to HEAD, that
    have none although they change what asv installs or runs (NEEDS_POINT)."""
    line = _git("rev-list", "--first-parent", "--reverse", "HEAD").split()
    measured = [i for i, c in enumerate(line) if c in points]
    if not measured:
        return line
    missing = []
    for commit in line[measured[0] :]:
        if commit in points:
            continue
        if needs_point(commit):
            missing.append(commit[:8])
    return missing


def test_cpu_series_is_unbroken_on_one_blas():
    points = cpu_points()
    assert points, f"no CPU results in {results_dir(CPU_MACHINE)}"
    assert gaps(points) == []
    assert {env for env in points.values()} == {f"virtualenv-py3.11-CONFORM_BLAS{HISTORY_BLAS}"}


def test_a_missing_commit_is_caught():
    points = cpu_points()
    line = [c for c in _git("rev-list", "--first-parent", "--reverse", "HEAD").split()]
    measured = [c for c in line if c in points and needs_point(c)]
    if len(measured) < 2:
        pytest.skip("a hole needs two points around it; the series has one")
    dropped = measured[-1]  # the newest commit that changes what asv runs
    del points[dropped]
    assert dropped[:8] in gaps(points)


def test_asv_installs_the_committed_constraints(tmp_path):
    """asv runs from the folder of a written config: every install command must name the
    repository's constraints.txt by absolute path (the gate failed to install on
    ``{conf_dir}/constraints.txt`` in its temporary folder)."""
    plain = json.loads((REPO_ROOT / "asv.conf.json").read_text())["install_command"]
    assert any("-c {conf_dir}/constraints.txt" in c for c in plain)
    written = json.loads(asv_config(tmp_path).read_text())["install_command"]
    assert written == [c.replace("{conf_dir}", str(REPO_ROOT)) for c in plain]
    assert all("{conf_dir}" not in c for c in written)
    assert (REPO_ROOT / "constraints.txt").is_file()


def test_constraints_pin_every_release_reports_name():
    """constraints.txt pins (==) each release a report names, within pyproject's ranges."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    from conform_mlx import VERSIONED

    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower()] = req.specifier
    assert set(VERSIONED) <= set(pins), set(VERSIONED) - set(pins)
    for spec in pins.values():
        assert str(spec).startswith("=="), spec
    for text in distribution("conform-mlx").requires or []:
        req = Requirement(text)
        if req.name.lower() in pins and req.specifier:
            version = str(pins[req.name.lower()]).removeprefix("==")
            assert req.specifier.contains(version, prereleases=True), (req, version)


def test_gpu_series_are_named_by_card_and_host():
    """One card on two hosts is two series (a batch-1 step is host-bound); the name keeps
    to letters, digits and dashes, as a folder under results/asv."""
    from conform_mlx.history import gpu_machine

    xeon = gpu_machine("NVIDIA H100 80GB HBM3", "Intel(R) Xeon(R) Processor")
    epyc = gpu_machine("NVIDIA H100 80GB HBM3", "AMD EPYC 9654 96-Core Processor")
    assert xeon == "nvidia-h100-80gb-hbm3-intel-xeon"
    assert epyc == "nvidia-h100-80gb-hbm3-amd-epyc-9654-96-core"
    assert gpu_machine("NVIDIA H200", "Intel(R) Xeon(R) Processor") != xeon
    assert all(re.fullmatch(r"[a-z0-9-]+", name) for name in (xeon, epyc))
