"""The reports a test run writes, and the parity report (one row per case, readable
without the test code).

Reports go to ``--report DIR`` (default ``reports/`` at the repo root, git-ignored),
so a test run changes no tracked file; the curated records in ``results/`` are
rewritten only by naming that folder. A run that covers less than the whole
selection (a file, ``-k``, ``--deselect``, ``-x`` stopping early, a lost xdist
worker) is partial: its files are ``<name>.partial.json`` and say why, so they never
replace a complete report.

Under pytest-xdist each worker sends what it recorded to the controller through
``workeroutput``; only the controller (or a serial run's one process) writes and
prints. Every row carries its test's collection index, which is the same in every
worker, so the merged report has the serial run's rows in the serial run's order.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conform_mlx import REPO_ROOT, machine, versions
from conform_mlx.engines import Engine
from suites import engine_report

DEFAULT_DIR = REPO_ROOT / "reports"
SUITES = Path(__file__).resolve().parent
# A complete run is the default selection or the slow one (pyproject's addopts).
FULL_MARKEXPRS = ("not slow", "slow")
REFERENCE = "HF transformers LlamaForCausalLM, float32, eager attention, torch CPU"

# Rows appended by the parity tests (imported from suites.conftest); each run's rows
# are moved out of it, tagged with their test, as that test finishes.
PARITY_ROWS: list[dict] = []
# (label, value, "max"|"min"): the one metric a conformance case records.
METRIC = pytest.StashKey[tuple]()
# The node id before xdist's loadgroup appends "@group", so rows match a serial run's.
NODEID = pytest.StashKey[str]()
# A test deselected because this machine's backend cannot run it (a GPU-only case on the
# CPU, suites.conftest): the selection of a complete run still, not a narrowing of it.
OFF_BACKEND = pytest.StashKey[bool]()
_INDEX = pytest.StashKey[int]()

COLUMNS = [
    "shape",
    "dtype",
    "phase",
    "max|dlogit|",
    "NMSE",
    "cosine",
    "KL mean",
    "KL max",
    "top1",
    "top5",
]


def _rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        if "greedy_first_divergence" in r:
            k = r["greedy_first_divergence"]
            text = "identical for 64 steps" if k is None else f"first differ at step {k}"
            out.append([r["shape"], r["dtype"], "greedy", text, "", "", "", "", "", ""])
            continue
        for phase in ("prefill", "decode"):
            m = r[phase]
            out.append(
                [
                    r["shape"],
                    r["dtype"],
                    phase,
                    *(
                        _fmt(m[key], spec)
                        for key, spec in (
                            ("max_abs", ".2e"),
                            ("nmse", ".2e"),
                            ("cosine", ".8f"),
                            ("kl_mean", ".1e"),
                            ("kl_max", ".1e"),
                            ("top1_agreement", ".0%"),
                            ("top5_overlap", ".0%"),
                        )
                    ),
                ]
            )
    return out


def _fmt(value: float | None, spec: str) -> str:
    """A metric, or "n/a" where non-finite logits left it undefined (None)."""
    return "n/a" if value is None else format(value, spec)


def parity_table(rows: list[dict]) -> str:
    body = _rows(rows)
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _commit() -> str | None:
    """The checkout the run tested; None where there is no git (a copied tree)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def report_path(root: Path, name: str, partial: list[str]) -> Path:
    """root/name, or root/<stem>.partial.json for a partial run."""
    return root / (name.removesuffix(".json") + ".partial.json" if partial else name)


def write_parity_json(rows: list[dict], path: Path, header: dict) -> Path:
    """header: the run's machine, versions, reference, run and partial fields."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**header, "cases": rows}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


@dataclass
class _Recorded:
    """Rows as (collection index, row); sorted by index they are in serial order."""

    parity: list[tuple[int, dict]] = field(default_factory=list)
    cases: list[tuple[int, dict]] = field(default_factory=list)
    off_selection: int = 0  # tests deselected by anything but the -m expression

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    def merge_json(self, text: str) -> None:
        other = json.loads(text)
        self.parity += [(i, row) for i, row in other["parity"]]
        self.cases += [(i, case) for i, case in other["cases"]]
        # Every worker collects and deselects the same tests.
        self.off_selection = max(self.off_selection, other["off_selection"])


class RunReports:
    """The pytest plugin that records rows, merges xdist workers' and writes reports."""

    def __init__(self, config: pytest.Config, engine: type[Engine]) -> None:
        self.config, self.engine_cls, self.engine = config, engine, engine.name
        self.recorded = _Recorded()
        self.is_worker = hasattr(config, "workerinput")
        self.ran: set[str] = set()
        self.broken: dict[str, None] = {}  # files that failed to collect (xdist: once each)
        self.workers: dict[str, str | None] = {}  # xdist node id -> error, None if clean
        self.summary: list[tuple[str, str]] = []  # (section title, text) to print

    @property
    def slow(self) -> bool:
        return (self.config.option.markexpr or "").strip() == "slow"

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        # A slow test left out of the default run (or a fast one out of -m slow) is the
        # selection, and so is a case this backend cannot run; any other deselection
        # (-k, --deselect, --lf) narrows it.
        wanted = self.slow
        self.recorded.off_selection += sum(
            (item.get_closest_marker("slow") is not None) == wanted
            for item in items
            if not item.stash.get(OFF_BACKEND, False)
        )

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for i, item in enumerate(session.items):
            item.stash[_INDEX] = i

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item):
        start = len(PARITY_ROWS)
        try:
            return (yield)
        finally:
            self.recorded.parity += [(item.stash[_INDEX], r) for r in PARITY_ROWS[start:]]
            del PARITY_ROWS[start:]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        mark = item.get_closest_marker("conformance")
        # One row per case: its call, or the setup that skipped or failed it.
        if mark is None or (report.when != "call" and report.passed) or report.when == "teardown":
            return report
        params = item.callspec.params if hasattr(item, "callspec") else {}
        case = {
            "property": mark.args[0].format(**params),
            "test": item.stash.get(NODEID, item.nodeid),
            "status": _status(report),
            "reason": _reason(report),
            "metric": item.stash.get(METRIC, None),
        }
        self.recorded.cases.append((item.stash[_INDEX], case))
        return report

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.broken[report.nodeid] = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":
            self.ran.add(report.nodeid)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error: object | None) -> None:
        """xdist, controller: a worker is done; take its rows once."""
        name = node.gateway.id
        output = getattr(node, "workeroutput", {}).get("conform_reports")
        if name not in self.workers and output is not None:
            self.recorded.merge_json(output)
            self.workers[name] = None
        elif name not in self.workers:
            self.workers[name] = str(error or "no output")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.is_worker:
            self.config.workeroutput["conform_reports"] = self.recorded.to_json()
            return
        parity = [row for _, row in sorted(self.recorded.parity, key=lambda r: r[0])]
        cases = [case for _, case in sorted(self.recorded.cases, key=lambda r: r[0])]
        if not parity and not cases:
            return
        partial = self.partial_reasons(session.testscollected)
        run = {
            "machine": machine(),
            "versions": versions(),
            "reference": REFERENCE,
            "run": {
                "command": "pytest " + shlex.join(self.config.invocation_params.args),
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "commit": _commit(),
                "xdist_workers": len(self.workers),
                "tests": {"selected": session.testscollected, "ran": len(self.ran)},
            },
            "partial": partial,
        }
        root = self.config.invocation_params.dir / self.config.getoption("report")
        if parity:
            self._write_parity(parity, root, run)
        # The slow run holds parity rows only; its few conformance rows would read as
        # a report of the engine.
        if cases and not self.slow:
            self._write_conformance(cases, root, run)

    def partial_reasons(self, selected: int) -> list[str]:
        """How this run falls short of the whole selection; empty for a complete run."""
        config, why = self.config, []
        if config.args_source == pytest.Config.ArgsSource.ARGS:
            for arg in config.args:
                path = (config.invocation_params.dir / arg.split("::")[0]).resolve()
                if "::" in arg or not (path == SUITES or path in SUITES.parents):
                    why.append(f"only {arg}")
        why += [f"{n} did not collect" for n in self.broken]
        why += [f"--ignore {p}" for p in config.option.ignore or []]
        why += [f"--ignore-glob {p}" for p in config.option.ignore_glob or []]
        markexpr = (config.option.markexpr or "").strip()
        if markexpr not in FULL_MARKEXPRS:
            why.append(f"-m {markexpr!r}")
        elif self.recorded.off_selection:
            by = f" by -k {config.option.keyword!r}" if config.option.keyword else ""
            why.append(f"{self.recorded.off_selection} tests deselected{by}")
        if len(self.ran) < selected:
            why.append(f"{selected - len(self.ran)} of {selected} selected tests did not run")
        why += [f"rows of xdist worker {n} lost: {e}" for n, e in self.workers.items() if e]
        return why

    def _write_parity(self, rows: list[dict], root: Path, run: dict) -> None:
        # The slow (TinyLlama-shape) run and each engine but ours keep their own file.
        stem = "parity-slow" if self.slow else "parity"
        other = self.engine != "impl"
        name = f"{stem}-{engine_report.file_name(self.engine)}" if other else f"{stem}.json"
        path = report_path(root, name, run["partial"])
        write_parity_json(rows, path, run)
        self.summary.append(
            (
                f"parity report ({self.engine} vs HF float32 reference)",
                f"{parity_table(rows)}\n{_written(path, run['partial'])}",
            )
        )

    def _write_conformance(self, cases: list[dict], root: Path, run: dict) -> None:
        summary = engine_report.summarize(cases)
        version = self.engine_cls.version()
        path = report_path(root / "engines", engine_report.file_name(self.engine), run["partial"])
        engine_report.write_engine_json(self.engine, version, summary, path, run)
        self.summary.append(
            (
                f"conformance report ({self.engine}, {version})",
                f"{engine_report.engine_table(summary)}\n{_written(path, run['partial'])}",
            )
        )
        if run["partial"]:
            return  # a partial engine file stays out of the merged table
        merged_path, merged = engine_report.merge_engine_files(root)
        self.summary.append(
            (
                f"conformance across engines ({root}/engines/*.json)",
                f"{engine_report.cross_table(merged)}\nwritten to {merged_path}",
            )
        )

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for title, text in self.summary:
            terminalreporter.section(title)
            terminalreporter.write_line(text)


def _written(path: Path, partial: list[str]) -> str:
    return f"written to {path}" + (f" (partial run: {'; '.join(partial)})" if partial else "")


def _status(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return "xfail" if report.skipped else "xpass"
    return {"passed": "pass", "failed": "fail", "skipped": "skipped"}[report.outcome]


def _reason(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return report.wasxfail
    if report.skipped:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        return (crash.message if crash else str(report.longrepr)).splitlines()[0]
    return ""
