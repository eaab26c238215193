"""Shared fixtures: the engine under test, checkpoints (made once per session), loaded
models and engines, references; the options of the run's reports (suites.report).

``--engine NAME`` picks the engine (default ``impl``; see conform_mlx.engines). Tests
about impl's internals carry ``@pytest.mark.impl_only(reason)`` or sit in a file
outside ENGINE_SUITES; with another engine they are skipped with that reason.

``--report DIR`` (default ``reports/``, git-ignored) is where the parity and
conformance reports go; ``--report results`` rewrites the curated records. Under
``pytest -n N --dist loadgroup`` tests that load the same checkpoint share a worker
(``checkpoint_group``), so each model is loaded by one worker, not every one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conform_mlx import DEFAULT_MODEL
from conform_mlx.engines import Engine, EngineError, load_engine, resolve
from conform_mlx.impl.loader import load
from conform_mlx.impl.model import Model
from conform_mlx.models import open_model
from suites.report import DEFAULT_DIR, METRIC, NODEID, PARITY_ROWS, RunReports

# Re-exported: the parity tests append their rows here.
__all__ = ["PARITY_ROWS", "TINY_SHAPES", "expect_known_issue"]

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
    "test_quantized.py",
}
IMPL_ONLY_FILES = {
    "test_kernels.py": "tests impl's attention kernels (kernels/), not an engine",
    "test_metal_source.py": "checks impl's Metal kernel source, not an engine",
    "test_loader.py": "tests impl's checkpoint loader and its errors",
    "test_api.py": "tests impl's Python API (impl.engine, impl.paged_cache)",
    "test_cli.py": "tests the conform command, which runs impl",
    "test_engines.py": "tests engine selection (the harness), not an engine",
    "test_reports.py": "tests the run's reports (the harness), not an engine",
    "test_history.py": "checks the committed asv history, not an engine",
    "test_layout.py": "checks this repository's import graph, not an engine",
    "test_gate.py": "tests the regression gate (the harness), not an engine",
    "test_bad_input.py": "tests the conform command's input checks, which run impl",
    "test_all_or_nothing.py": "tests impl's paged cache and engine under refused calls",
    "test_fused_kernels.py": "tests impl's fused kernels (kernels/), not an engine",
    "test_kld.py": "tests the corpus metrics and goldens files (the harness); runs impl",
    "test_host_bench.py": "times impl's host-side step work (paged cache, decode, graph)",
    "test_generate.py": "tests impl.engine.generate's pipelining, sampler and compiled buckets",
    "test_fused_linear.py": "tests impl's fused q/k/v and gate/up projections against unfused",
    "test_names.py": "checks this project's import names against installed packages",
    "test_prompt_encoding.py": "tests how the harness encodes prompts, not an engine",
}
# The checkpoint a file's checkpoint tests share: its parameter that names one, if any,
# else the file's shape (tests on trained_dir alone use "trained"). Only scheduling
# reads this: a stale entry costs a repeated load, never a wrong result.
CHECKPOINT_PARAM = {"test_logits_parity.py": "name", "test_loader.py": "shape"}
FILE_CHECKPOINT = {
    "test_logits_parity.py": "tiny-gqa8",  # the fault-injection cases
    "test_cache_accounting.py": "tiny-gqa8",
    "test_memory_math.py": "tiny-gqa8",
    "test_api.py": "tiny-gqa8",
    "test_engines.py": "tiny-gqa8",
    "test_all_or_nothing.py": "tiny-gqa8",
    "test_loader.py": "tiny-gqa4",
    "test_rope_base.py": "tiny-rope-500k",
    "test_quantized.py": "trained",
    "test_host_bench.py": "trained",  # the graph-building cases load checkpoints/tiny-gqa
    "test_generate.py": "trained",
    "test_fused_linear.py": "trained",
}
# Session fixtures that write or load a checkpoint, a model or the reference; each
# xdist worker is its own session, so each would repeat the work.
CHECKPOINT_FIXTURES = {
    "checkpoint",
    "trained_dir",
    "engine_factory",
    "model_factory",
    "reference_factory",
}
_ENGINE = pytest.StashKey[type[Engine]]()


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--engine",
        default="impl",
        help="engine under test: impl, impl-compiled, impl-dequantized, mlx-lm, hf, an entry "
        "point of group conform_mlx.engines, or module:Class (default: impl)",
    )
    parser.addoption(
        "--report",
        default=str(DEFAULT_DIR),
        metavar="DIR",
        help="folder for the parity and conformance reports (default: reports/, "
        "git-ignored; `--report results` rewrites the curated records)",
    )


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "impl_only(reason): applies to the impl engine only")
    config.addinivalue_line(
        "markers", "conformance(property): a row of the cross-engine conformance report"
    )
    # Registered by pytest-xdist too; here so a run without xdist does not warn.
    config.addinivalue_line("markers", "xdist_group(name): tests that share a worker")
    try:
        engine = config.stash[_ENGINE] = resolve(config.getoption("engine"))
    except EngineError as e:
        raise pytest.UsageError(str(e)) from None
    config.pluginmanager.register(RunReports(config, engine), "conform-reports")


def checkpoint_group(item: pytest.Item) -> str | None:
    """The checkpoint a test loads through the session fixtures; None: it loads none."""
    if not CHECKPOINT_FIXTURES & set(item.fixturenames):
        return None
    params = item.callspec.params if hasattr(item, "callspec") else {}
    param = CHECKPOINT_PARAM.get(item.path.name)
    if param in params:
        return params[param]
    if "checkpoint" not in item.fixturenames:
        return "trained"
    return FILE_CHECKPOINT.get(item.path.name, item.path.name)


# tryfirst: xdist's loadgroup reads the groups (and rewrites node ids) in its own
# collection hook, which must see them.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        item.stash[NODEID] = item.nodeid
        group = checkpoint_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
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
            loaded[path, dtype] = load_engine(engine_cls, open_model(path), dtype)
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
        request.node.stash[METRIC] = (label, value, worst)

    return record


@pytest.fixture(scope="session")
def trained_dir() -> Path:
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.fail(f"the committed trained checkpoint is missing from {DEFAULT_MODEL}")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """Factory: path of a random-weight checkpoint of a named shape, written once."""
    from conform_mlx.reference.checkpoints import write_random_checkpoint

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
    from conform_mlx.reference.hf import Reference

    loaded: dict[Path, Reference] = {}

    def get(path: Path) -> Reference:
        if path not in loaded:
            loaded[path] = Reference(path)
        return loaded[path]

    return get
