"""Shared fixtures: the engine under test, checkpoints (made once per session), loaded
models and engines, references; the parity and conformance reports.

``--engine NAME`` picks the engine (default ``impl``; see conform.engines). Tests
about impl's internals carry ``@pytest.mark.impl_only(reason)`` or sit in a file
outside ENGINE_SUITES; with another engine they are skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conform import DEFAULT_MODEL
from conform.engines import Engine, EngineError, resolve
from impl.loader import load
from impl.model import Model
from suites import engine_report

# The random shapes every parity case runs on; see reference/checkpoints.py.
TINY_SHAPES = ["tiny-mha", "tiny-gqa4", "tiny-gqa8", "tiny-mqa", "tiny-hd64", "tiny-hd128"]

# Files whose tests go through the engine interface (impl-internal tests in them carry
# the impl_only mark). Every other file is about impl's internals and, with another
# engine, is skipped whole: a new file is never run quietly against the wrong engine.
ENGINE_SUITES = {
    "test_logits_parity.py",
    "test_rope_offsets.py",
    "test_rope_base.py",
    "test_cache_accounting.py",
    "test_memory_math.py",
    "test_tinyllama_slow.py",
}
IMPL_ONLY_FILES = {
    "test_kernels.py": "tests impl's attention kernels (kernels/), not an engine",
    "test_metal_source.py": "checks impl's Metal kernel source, not an engine",
    "test_loader.py": "tests impl's checkpoint loader and its errors",
    "test_api.py": "tests impl's Python API (impl.engine, impl.paged_cache)",
    "test_cli.py": "tests the conform command, which runs impl",
    "test_engines.py": "tests engine selection (the harness), not an engine",
}
_ENGINE = pytest.StashKey[type[Engine]]()


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--engine",
        default="impl",
        help="engine under test: impl, mlx-lm, an entry point of group conform.engines, "
        "or module:Class (default: impl)",
    )


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "impl_only(reason): applies to the impl engine only")
    config.addinivalue_line(
        "markers", "conformance(property): a row of the cross-engine conformance report"
    )
    try:
        config.stash[_ENGINE] = resolve(config.getoption("engine"))
    except EngineError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_collection_modifyitems(config, items) -> None:
    name = config.stash[_ENGINE].name
    if name == "impl":
        return
    for item in items:
        mark = item.get_closest_marker("impl_only")
        if mark:
            reason = mark.args[0]
        elif item.path.name not in ENGINE_SUITES:
            reason = IMPL_ONLY_FILES.get(item.path.name, "tests impl's internals")
        else:
            reason = None
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"engine {name}: {reason}"))


@pytest.fixture(scope="session")
def engine_cls(pytestconfig) -> type[Engine]:
    return pytestconfig.stash[_ENGINE]


@pytest.fixture(scope="session")
def engine_factory(engine_cls) -> Callable[[Path, str], Engine]:
    """Factory: the engine under test loaded on a checkpoint directory in a dtype, once."""
    loaded: dict[tuple[Path, str], Engine] = {}

    def get(path: Path, dtype: str = "float32") -> Engine:
        if (path, dtype) not in loaded:
            loaded[path, dtype] = engine_cls.load(path, dtype)
        return loaded[path, dtype]

    return get


def expect_known_issue(request, engine: Engine, model_dir: Path) -> str | None:
    """Mark the running test a strict expected failure when the engine's version is
    known to get this checkpoint wrong; returns the reason (None: nothing known)."""
    reason = engine.known_issue(model_dir)
    if reason:
        request.applymarker(
            pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason=reason)
        )
    return reason


@pytest.fixture
def metric(request) -> Callable[..., None]:
    """record(label, value, worst="max"): the case's measured number for the report."""

    def record(label: str, value: float | int, worst: str = "max") -> None:
        request.node.stash[_METRIC] = (label, value, worst)

    return record


_METRIC = pytest.StashKey[tuple]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    mark = item.get_closest_marker("conformance")
    if mark is None or (report.when != "call" and report.passed) or report.when == "teardown":
        return
    params = item.callspec.params if hasattr(item, "callspec") else {}
    engine_report.CASES.append(
        {
            "property": mark.args[0].format(**params),
            "test": item.nodeid,
            "status": _status(report),
            "reason": _reason(report),
            "metric": item.stash.get(_METRIC, None),
        }
    )


def _status(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xfail" if report.skipped else "xpass"
    return {"passed": "pass", "failed": "fail", "skipped": "skipped"}[report.outcome]


def _reason(report) -> str:
    if hasattr(report, "wasxfail"):
        return report.wasxfail
    if report.skipped:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        return (crash.message if crash else str(report.longrepr)).splitlines()[0]
    return ""


@pytest.fixture(scope="session")
def trained_dir() -> Path:
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.fail(f"the committed trained checkpoint is missing from {DEFAULT_MODEL}")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """Factory: path of a random-weight checkpoint of a named shape, written once."""
    from reference.checkpoints import write_random_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, Path] = {}

    def get(shape: str) -> Path:
        if shape not in made:
            made[shape] = write_random_checkpoint(shape, root / shape, seed=0)
        return made[shape]

    return get


@pytest.fixture(scope="session")
def model_factory() -> Callable[[Path, str], Model]:
    """Factory: impl's MLX model of a checkpoint directory in a dtype, loaded once."""
    loaded: dict[tuple[Path, str], Model] = {}

    def get(path: Path, dtype: str = "float32") -> Model:
        if (path, dtype) not in loaded:
            loaded[path, dtype] = load(path, dtype)
        return loaded[path, dtype]

    return get


@pytest.fixture(scope="session")
def reference_factory():
    """Factory: the HF float32 reference of a checkpoint directory, loaded once."""
    from reference.hf import Reference

    loaded: dict[Path, Reference] = {}

    def get(path: Path) -> Reference:
        if path not in loaded:
            loaded[path] = Reference(path)
        return loaded[path]

    return get


# Rows appended by the parity suite; printed and saved at the end of the session.
PARITY_ROWS: list[dict] = []


def pytest_terminal_summary(terminalreporter, config) -> None:
    slow = (config.option.markexpr or "").strip() == "slow"
    engine = config.stash[_ENGINE].name
    if PARITY_ROWS:
        _parity_summary(terminalreporter, engine, slow)
    if engine_report.CASES and not slow:
        _conformance_summary(terminalreporter, engine)


def _parity_summary(terminalreporter, engine: str, slow: bool) -> None:
    from conform import REPO_ROOT
    from suites.report import parity_table, write_parity_json

    # The slow (TinyLlama-shape) run keeps its own file so neither run erases the
    # other; so does each engine other than ours.
    stem = "parity-slow" if slow else "parity"
    name = f"{stem}.json" if engine == "impl" else f"{stem}-{engine_report.file_name(engine)}"
    terminalreporter.section(f"parity report ({engine} vs HF float32 reference)")
    terminalreporter.write_line(parity_table(PARITY_ROWS))
    path = write_parity_json(PARITY_ROWS, REPO_ROOT / "results" / name)
    terminalreporter.write_line(f"written to {path}")


def _conformance_summary(terminalreporter, engine: str) -> None:
    version = terminalreporter.config.stash[_ENGINE].version()
    summary = engine_report.summarize(engine_report.CASES)
    terminalreporter.section(f"conformance report ({engine}, {version})")
    terminalreporter.write_line(engine_report.engine_table(summary))
    path = engine_report.write_engine_json(engine, version, summary)
    merged_path, merged = engine_report.merge_engine_files()
    terminalreporter.section("conformance across engines (results/engines/*.json)")
    terminalreporter.write_line(engine_report.cross_table(merged))
    terminalreporter.write_line(f"written to {path} and {merged_path}")
