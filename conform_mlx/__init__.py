"""The harness around the system under test: the ``conform`` command line, the
validation flow and the metrics it reports."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The committed trained checkpoint (see reference/train_tiny.py): the default model,
# so every command works on a fresh clone without making a checkpoint first.
DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "tiny-gqa"


# The releases a run's numbers depend on: every report header names them, `conform
# versions` prints them, and constraints.txt pins them for the asv history.
VERSIONED = ("mlx", "mlx-lm", "torch", "transformers", "tokenizers", "gguf", "safetensors", "asv")


def versions() -> dict[str, str | None]:
    """The installed release of each of VERSIONED, None where absent (read from package
    metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def format_versions(found: dict[str, str | None]) -> str:
    return ", ".join(f"{name} {v or '(not installed)'}" for name, v in found.items())


def machine() -> str:
    """The machine line of every report: platform, MLX and its device, and the BLAS
    MLX's CPU backend multiplies with (conform_mlx.blas)."""
    import platform

    import mlx.core as mx

    from conform_mlx import blas

    return (
        f"{platform.machine()} {platform.system()}, MLX {mx.__version__} "
        f"{mx.default_device()}, BLAS {blas.describe()}"
    )
