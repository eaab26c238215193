"""The harness around the system under test: the ``conform`` command line, the
validation flow and the metrics it reports."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The committed trained checkpoint (see reference/train_tiny.py): the default model,
# so every command works on a fresh clone without making a checkpoint first.
DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "tiny-gqa"


def machine() -> str:
    """The machine line of every report: platform, MLX and its device, and the BLAS
    MLX's CPU backend multiplies with (conform.blas)."""
    import platform

    import mlx.core as mx

    from conform import blas

    return (
        f"{platform.machine()} {platform.system()}, MLX {mx.__version__} "
        f"{mx.default_device()}, BLAS {blas.describe()}"
    )
