"""Shared fixtures: checkpoints (made once per session), loaded models, references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conform import DEFAULT_MODEL
from impl.loader import load
from impl.model import Model

# The random shapes every parity case runs on; see reference/checkpoints.py.
TINY_SHAPES = ["tiny-mha", "tiny-gqa4", "tiny-gqa8", "tiny-mqa", "tiny-hd64", "tiny-hd128"]


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
    """Factory: the MLX model of a checkpoint directory in a dtype, loaded once."""
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
    if not PARITY_ROWS:
        return
    from conform import REPO_ROOT
    from suites.report import parity_table, write_parity_json

    # The slow (TinyLlama-shape) run keeps its own file so neither run erases the other.
    name = "parity-slow.json" if (config.option.markexpr or "").strip() == "slow" else "parity.json"
    terminalreporter.section("parity report (impl vs HF float32 reference)")
    terminalreporter.write_line(parity_table(PARITY_ROWS))
    path = write_parity_json(PARITY_ROWS, REPO_ROOT / "results" / name)
    terminalreporter.write_line(f"written to {path}")
