"""Shared fixtures: the engine under test, checkpoints (made once per session), loaded
models and engines, references; the options of the run's reports (suites.report).

``--engine NAME`` picks the engine (default ``impl``; see conform_mlx.engines). Each test
file says at its top what it tests (``pytestmark``, docs/suites.md):

- ``pytest.mark.engine_suite``: its tests go through the engine under test and run for
  every engine; a test in it about impl's internals carries ``impl_only(reason)``.
- ``pytest.mark.impl_only(reason)``: impl's internals or the harness; with another engine
  every test in it is skipped with that reason. A file that says neither is skipped too,
  so a new file is never run quietly against the wrong engine.

A test that runs for an engine other than impl must request the engine (``engine_cls`` or
``engine_factory``, directly or through a fixture): one that does not fails at setup
(``engine_not_called``), so the engine's report never counts a test it took no part in.

``pytest.mark.gpu`` marks a case that needs MLX's Metal or CUDA backend; on the CPU
backend those cases are deselected at collection and one line of the summary says how
many and where to run them.

``--report DIR`` (default ``reports/``, git-ignored) is where the parity and
conformance reports go; ``--report results`` rewrites the curated records. Under
``pytest -n N --dist loadgroup`` tests that load the same checkpoint share a worker
(``checkpoint_group``, from a file's or test's ``pytest.mark.checkpoint_group``), so each
model is loaded by one worker, not every one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from conform_mlx import DEFAULT_MODEL
from conform_mlx.engines import Engine, EngineError, NotApplicable, load_engine, resolve
from conform_mlx.impl.kernels.backend import active_backend
from conform_mlx.impl.loader import load
from conform_mlx.impl.model import Model
from conform_mlx.models import open_model
from suites.report import DEFAULT_DIR, METRIC, NODEID, OFF_BACKEND, PARITY_ROWS, RunReports

# Re-exported: the parity tests append their rows here.
__all__ = ["PARITY_ROWS", "TINY_SHAPES", "expect_known_issue"]

# The random shapes every parity case runs on; see reference/checkpoints.py.
TINY_SHAPES = ["tiny-mha", "tiny-gqa4", "tiny-gqa8", "tiny-mqa", "tiny-hd64", "tiny-hd128"]

IMPL = "impl"  # the engine every test runs for
# The fixtures through which a test reaches the engine under test.
ENGINE_FIXTURES = {"engine_cls", "engine_factory"}
# Session fixtures that write or load a checkpoint, a model or the reference; each
# xdist worker is its own session, so each would repeat the work.
CHECKPOINT_FIXTURES = {
    "checkpoint",
    "trained_dir",
    "engine_factory",
    "model_factory",
    "reference_factory",
}
# Where to run the cases a CPU backend deselects.
GPU_HINT = (
    "run them on a machine with Metal or CUDA (Apple silicon; NVIDIA with the cuda "
    "extra): python -m pytest suites/ -m gpu"
)
MARKERS = [
    "engine_suite: the file's tests go through the engine under test (--engine) and run "
    "for every engine",
    "impl_only(reason): applies to the impl engine only; skipped with reason for another",
    "checkpoint_group(name, param=None): the checkpoint the tests load through the session "
    "fixtures (the test's parameter `param` where it has one), for --dist loadgroup",
    "conformance(property): a row of the cross-engine conformance report",
    # Registered by pytest-xdist too; here so a run without xdist does not warn.
    "xdist_group(name): tests that share a worker",
]
_ENGINE = pytest.StashKey[type[Engine]]()
_GPU_DESELECTED = pytest.StashKey[int]()
_NOT_CALLED = pytest.StashKey[str]()


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--engine",
        default="impl",
        help="engine under test: impl, impl-compiled, impl-dequantized, impl-batch-invariant, "
        "mlx-lm, hf, llama.cpp, an entry point of group conform_mlx.engines, or module:Class "
        "(default: impl)",
    )
    parser.addoption(
        "--report",
        default=str(DEFAULT_DIR),
        metavar="DIR",
        help="folder for the parity and conformance reports (default: reports/, "
        "git-ignored; `--report results` rewrites the curated records)",
    )


def pytest_configure(config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    try:
        engine = config.stash[_ENGINE] = resolve(config.getoption("engine"))
    except EngineError as e:
        raise pytest.UsageError(str(e)) from None
    config.pluginmanager.register(RunReports(config, engine), "conform-reports")


def checkpoint_group(item: pytest.Item) -> str | None:
    """The checkpoint a test loads through the session fixtures; None: it loads none.

    From its ``checkpoint_group(name, param=...)`` mark: the value of its parameter
    ``param`` if it has one, else ``name`` where it writes a random checkpoint; tests on
    the trained one alone share "trained". Only scheduling reads this: a wrong group
    costs a repeated load, never a wrong result."""
    if not CHECKPOINT_FIXTURES & set(item.fixturenames):
        return None
    mark = item.get_closest_marker("checkpoint_group")
    params = item.callspec.params if hasattr(item, "callspec") else {}
    param = mark.kwargs.get("param") if mark else None
    if param in params:
        return params[param]
    if "checkpoint" not in item.fixturenames:
        return "trained"
    return mark.args[0] if mark else item.path.name


def engine_skip_reason(item: pytest.Item, engine: str) -> str | None:
    """Why ``item`` does not run for ``engine``; None: it runs (impl runs every test)."""
    if engine == IMPL:
        return None
    mark = item.get_closest_marker("impl_only")
    if mark:
        return mark.args[0]
    if item.get_closest_marker("engine_suite") is None:
        return "its file is not marked engine_suite (tests impl's internals)"
    return None


def engine_not_called(items: Iterable[pytest.Item], engine: str) -> list[str]:
    """The tests that would run, and count, for ``engine`` without requesting it (none
    of ENGINE_FIXTURES in their fixture closure); for an engine but impl, none may."""
    return [
        item.nodeid
        for item in items
        if engine != IMPL
        and engine_skip_reason(item, engine) is None
        and not ENGINE_FIXTURES & set(item.fixturenames)
    ]


# tryfirst: xdist's loadgroup reads the groups (and rewrites node ids) in its own
# collection hook, which must see them.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    gpu_only = []
    if active_backend() == "cpu":
        gpu_only = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_only:
        for item in gpu_only:
            item.stash[OFF_BACKEND] = True  # the run's selection still (suites.report)
        dropped = {id(item) for item in gpu_only}
        items[:] = [item for item in items if id(item) not in dropped]
        config.hook.pytest_deselected(items=gpu_only)
    config.stash[_GPU_DESELECTED] = len(gpu_only)
    for item in items:
        item.stash[NODEID] = item.nodeid
        group = checkpoint_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    select_for_engine(items, config.stash[_ENGINE].name)


def select_for_engine(items: list[pytest.Item], engine: str) -> None:
    """Skip the tests that do not run for ``engine``, with their reason; of those that
    run, mark the ones that do not request it to fail at setup."""
    not_called = set(engine_not_called(items, engine))
    for item in items:
        reason = engine_skip_reason(item, engine)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"engine {engine}: {reason}"))
        elif item.nodeid in not_called:
            item.stash[_NOT_CALLED] = engine


def pytest_runtest_setup(item: pytest.Item) -> None:
    name = item.stash.get(_NOT_CALLED, None)
    if name:
        pytest.fail(
            f"counted for engine {name} but requests none of {sorted(ENGINE_FIXTURES)}: "
            "make it use the engine, or mark it impl_only(reason)",
            pytrace=False,
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: tell the controller
        session.config.workeroutput["gpu_deselected"] = session.config.stash.get(_GPU_DESELECTED, 0)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist, controller: every worker deselects the same cases; keep their count."""
    count = getattr(node, "workeroutput", {}).get("gpu_deselected", 0)
    node.config.stash[_GPU_DESELECTED] = max(node.config.stash.get(_GPU_DESELECTED, 0), count)


def pytest_terminal_summary(terminalreporter, config) -> None:
    count = config.stash.get(_GPU_DESELECTED, 0)
    if count:
        terminalreporter.write_line(
            f"{count} GPU-only cases deselected (MLX has no GPU backend here); {GPU_HINT}"
        )


@pytest.fixture(scope="session")
def engine_cls(pytestconfig) -> type[Engine]:
    return pytestconfig.stash[_ENGINE]


@pytest.fixture(scope="session")
def engine_model(engine_cls, tmp_path_factory) -> Callable[[Path], Path]:
    """Factory: what the engine under test loads for a checkpoint: the checkpoint itself,
    or for an engine that reads GGUF only (llama.cpp) the same weights as an F32 GGUF
    file with a byte vocabulary, written once."""
    written: dict[Path, Path] = {}

    def get(path: Path) -> Path:
        if not engine_cls.gguf_only or path.suffix == ".gguf":
            return path
        if "quantization" in json.loads((path / "config.json").read_text()):
            pytest.skip("engine: reads GGUF only; mlx-lm's quantized format has no GGUF form here")
        if path not in written:
            from conform_mlx.reference.gguf_writer import write_gguf

            out = tmp_path_factory.mktemp("gguf") / f"{path.name}.gguf"
            try:
                written[path] = write_gguf(path, out, "F32", vocab=True)
            except ValueError as e:  # a config our writer has no GGUF form for
                pytest.skip(f"engine: reads GGUF only, and {e}")
        return written[path]

    return get


@pytest.fixture(scope="session")
def engine_factory(engine_cls, engine_model) -> Callable[[Path, str], Engine]:
    """Factory: the engine under test loaded on a checkpoint in a dtype, once."""
    loaded: dict[tuple[Path, str], Engine] = {}

    def get(path: Path, dtype: str = "float32") -> Engine:
        """The engine, or a skip with its reason where it cannot load this model or dtype
        (``NotApplicable``: the HF reference runs float32 only)."""
        if (path, dtype) not in loaded:
            model = engine_model(path)
            try:
                checked = open_model(model)
            except ValueError as e:  # the GGUF door refuses this checkpoint's GGUF form
                if model == path:
                    raise
                pytest.skip(f"engine: reads GGUF only, and {e}")
            try:
                loaded[path, dtype] = load_engine(engine_cls, checked, dtype)
            except NotApplicable as e:
                pytest.skip(f"engine: {e}")
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
