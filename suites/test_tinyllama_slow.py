"""Parity on the real TinyLlama-1.1B shape (22 layers, 32 q / 4 kv heads, vocab 32000).

Marked slow: it writes a 2.2 GB random checkpoint (kept in ~/.cache/conform for
later runs) and needs about 10 GB of memory and a few minutes on 2 CPU cores.
Run with ``python -m pytest suites/ -m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conform_mlx.engines import NotApplicable
from suites.conftest import PARITY_ROWS
from suites.test_logits_parity import check_parity, engine_logits

pytestmark = [
    pytest.mark.slow,
    pytest.mark.engine_suite,
]

# TinyLlama ids for "<s> The quick brown fox" (the seed report's prompt), then four
# more ids so four decode steps run through the paged cache.
TOKENS = [1, 450, 4996, 17354, 1701, 432, 975, 278, 17366]
CACHE_DIR = Path.home() / ".cache" / "conform" / "tinyllama-1.1b-float16-seed0"


@pytest.fixture(scope="module")
def tinyllama() -> Path:
    if not (CACHE_DIR / "model.safetensors").is_file():
        from conform_mlx.reference.checkpoints import write_random_checkpoint

        write_random_checkpoint("tinyllama-1.1b", CACHE_DIR, seed=0, dtype=_torch_fp16())
    return CACHE_DIR


def _torch_fp16():
    import torch

    return torch.float16


@pytest.fixture(scope="module")
def reference_run(tinyllama, reference_factory):
    return reference_factory(tinyllama).run(TOKENS)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tinyllama_logits_match_reference(tinyllama, reference_run, engine_cls, dtype):
    engine = engine_cls.load(tinyllama, dtype)
    try:
        run = engine_logits(engine, TOKENS, n_prefill=5, block_size=4)
    except NotApplicable:  # an unpaged cache: no block size to choose
        run = engine_logits(engine, TOKENS, n_prefill=5)
    metrics = check_parity(run, reference_run, dtype, num_layers=22)
    PARITY_ROWS.append(
        {"shape": "tinyllama-1.1b", "dtype": dtype, "block_size": run.block_size, **metrics}
    )
