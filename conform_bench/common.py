"""Shared inputs for the asv benchmarks (and tools/gpu_bench.py): checkpoints,
engines, token ids.

Only ever append here: changing an existing input changes what the history measures.
Checkpoints are random-weight (reference.checkpoints), written once into
~/.cache/conform/bench and reused by every later run and commit. Engines are
reached through conform_mlx.engines only and loaded once per benchmark process (asv
calls ``setup`` for every parameter set).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from conform_mlx.engines import Engine, EngineCache, NotApplicable, resolve

CACHE_ROOT = Path.home() / ".cache" / "conform" / "bench"
PRESETS = {
    "small": "bench-small",
    "tinyllama": "tinyllama-1.1b",
    "smollm2": "smollm2-135m",
    "llama2-7b": "llama-2-7b",
    "llama3-8b": "llama-3-8b",
}
# The quick preset: TinyLlama's head layout (GQA 8:1, head_dim 64) at a size whose
# decode step is milliseconds on a 2-core CPU. Defined here, not in the project, so
# every commit in the history is measured on the same shape.
BENCH_SMALL = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=1,
    vocab_size=4096,
    max_position_embeddings=2048,
)
DTYPES = {"float32": mx.float32, "float16": mx.float16}
BLOCK_SIZE = 16
# Mixed lengths for the batched decode case: short, block-aligned, odd and long.
BATCH_CONTEXTS = [16, 100, 257, 700]
# MLX CPU matmul measured 0.73 s per TinyLlama prefill token in float32 (2-core
# x86-64, 2026-11-27): a 512-token prefill is ~6 minutes a sample. Those points run
# on a GPU backend only.
CPU_MAX_TINYLLAMA_PREFILL = 128


def checkpoint(preset: str) -> Path:
    """The preset's checkpoint directory, written on first use (float16 weights)."""
    from conform_mlx.reference.checkpoints import SHAPES, write_random_checkpoint

    SHAPES.setdefault("bench-small", BENCH_SMALL)
    shape = PRESETS[preset]
    path = CACHE_ROOT / f"{shape}-float16-seed0"
    if not (path / "model.safetensors").is_file():
        import torch

        write_random_checkpoint(shape, path, seed=0, dtype=torch.float16, progress=False)
    return path


def tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def skip_if_too_slow_on_cpu(preset: str, prompt_len: int) -> None:
    """asv reports a benchmark whose setup raises NotImplementedError as skipped."""
    if preset == "tinyllama" and prompt_len > CPU_MAX_TINYLLAMA_PREFILL:
        if mx.default_device() == mx.cpu:
            raise NotImplementedError("TinyLlama prefill > 128 tokens is GPU-only (see common.py)")


# The engines a run measures: CONFORM_ENGINE, comma-separated names as
# conform_mlx.engines.resolve takes them. The default holds the peers, so each history
# point has our ratio to them from one run; impl-compiled is left to GPU runs, where
# it matters (on the CPU each new shape compiles C++ with g++). The gate's classes
# measure impl only. asv's benchmark subprocesses inherit it; keep the list run to run.
DEFAULT_ENGINES = "impl,mlx-lm,hf"
ENGINES = [
    e.strip() for e in os.environ.get("CONFORM_ENGINE", DEFAULT_ENGINES).split(",") if e.strip()
]


@functools.cache
def engine(name: str, preset: str, dtype: str) -> Engine:
    """The engine ``name`` on the preset's checkpoint in ``dtype``, loaded once per process.

    Raises NotApplicable for a dtype the engine does not run (hf: float32 only).
    """
    return resolve(name).load(checkpoint(preset), dtype)


def new_cache(engine: Engine, max_tokens: int, max_sequences: int = 1) -> EngineCache:
    """A cache with BLOCK_SIZE blocks where it is paged, so the history does not follow
    an engine's default block size; an unpaged one as the engine makes it."""
    try:
        return engine.new_cache(max_tokens, max_sequences, block_size=BLOCK_SIZE)
    except NotApplicable:
        return engine.new_cache(max_tokens, max_sequences)


def vocab_size(preset: str) -> int:
    return json.loads((checkpoint(preset) / "config.json").read_text())["vocab_size"]
