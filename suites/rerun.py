"""The determinism suite's new process (``suites/test_invariance.py``):

    python -m suites.rerun ENGINE MODEL DTYPE OUT

loads ENGINE (a name, or module:Class) on MODEL in DTYPE and saves ``repeatable``'s
logits to OUT (.npy), for the suite to compare bit for bit with its own run."""

from __future__ import annotations

import sys

import numpy as np

from conform_mlx.engines import load_engine
from conform_mlx.models import open_model
from suites.test_invariance import prompt_tokens, repeatable


def main(argv: list[str]) -> int:
    spec, model, dtype, out = argv
    engine = load_engine(spec, open_model(model), dtype)
    np.save(out, repeatable(engine, prompt_tokens()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
