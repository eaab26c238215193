"""The harness around the system under test: the ``conform`` command line, the
validation flow and the metrics it reports."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The committed trained checkpoint (see reference/train_tiny.py): the default model,
# so every command works on a fresh clone without making a checkpoint first.
DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "tiny-gqa"
