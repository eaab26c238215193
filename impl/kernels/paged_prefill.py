"""Paged prefill attention, T >= 1 new tokens a sequence over a paged KV cache, with exactly
``paged_attention_ops``' contract (its twin and oracle); for short chunks over a cache."""

from __future__ import annotations

import mlx.core as mx

from conform_mlx.impl.kernels.backend import WARP, Backend, active_backend, float_bits, on_first_use
from conform_mlx.impl.kernels.paged_prefill_source import build_kernels

N_WARPS = 4  # 128 threads per group, as the decode kernel
HEAD_DIMS = (64, 128)  # P.V: each lane holds HEAD_DIM / 32 elements of a V row
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
# Query rows (GROUP_SIZE * Q_TILE) a group aims for: a row costs HEAD_DIM / 32 registers a lane
TARGET_ROWS = {64: 32, 128: 16}
SHARED_BYTES = 32 * 1024  # Metal's thread-group memory (CUDA's static limit is 48 KiB)
MAX_GROUPS_Z = 65535  # one group per (sequence, query tile) along z, which CUDA caps here

BACKEND: Backend = active_backend()
_kernel = on_first_use(build_kernels, "paged_prefill_attention")


def q_tile(group_size: int, head_dim: int) -> int:
    """Query tokens per thread group: ROWS = group_size * Q_TILE near TARGET_ROWS."""
    return max(1, TARGET_ROWS[head_dim] // group_size)


def _tiling(q: mx.array, kv_pool: mx.array) -> tuple[int, int, int]:
    """(GROUP_SIZE, Q_TILE, query tiles per sequence) of a launch."""
    n_heads, t, head_dim = q.shape[1:]
    group = n_heads // kv_pool.shape[3]
    tile = q_tile(group, head_dim)
    return group, tile, -(-t // tile)


def supports(q: mx.array, kv_pool: mx.array) -> bool:
    """Whether the kernel takes these shapes and dtype."""
    if q.ndim != 4 or kv_pool.ndim != 5 or kv_pool.shape[2] != 2:
        return False
    batch, n_heads, t, head_dim = q.shape
    if not (
        head_dim in HEAD_DIMS
        and q.dtype in DTYPES
        and kv_pool.shape[4] == head_dim
        and n_heads % kv_pool.shape[3] == 0
        and t >= 1
    ):
        return False
    group, tile, n_tiles = _tiling(q, kv_pool)
    rows = group * tile
    shared = 4 * (rows * head_dim + 2 * N_WARPS * rows)  # float32 sm_buf, sm_m, sm_l
    return shared <= SHARED_BYTES and batch * n_tiles <= MAX_GROUPS_Z


def call_args(q: mx.array, kv_pool: mx.array, scale: float) -> dict:
    """Template, grid and thread group of one launch (also used by the Metal check)."""
    batch, head_dim = q.shape[0], q.shape[3]
    _, block_size, _, n_kv, _ = kv_pool.shape
    group, tile, n_tiles = _tiling(q, kv_pool)
    return {
        "template": [
            ("T", q.dtype),
            ("HEAD_DIM", head_dim),
            ("GROUP_SIZE", group),
            ("KV_BLOCK", block_size),
            ("Q_TILE", tile),
            ("N_WARPS", N_WARPS),
            ("SCALE_BITS", float_bits(scale)),
        ],
        # In threads on both backends: one group per (kv head, sequence x query tile).
        "grid": (N_WARPS * WARP, n_kv, batch * n_tiles),
        "threadgroup": (N_WARPS * WARP, 1, 1),
    }


def paged_prefill_attention(
    q: mx.array,
    kv_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    positions: mx.array,
    scale: float,
) -> mx.array:
    """The kernel: ``paged_attention_ops``' attention, q (B, n_heads, T, D) rotated, over a
    pool already holding the new tokens; returns (B, n_heads, T, D) in q's dtype."""
    if not supports(q, kv_pool) or positions.shape != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"unsupported q {q.shape} {q.dtype} / pool {kv_pool.shape} / positions "
            f"{positions.shape}; see supports()"
        )
    inputs = [
        q,
        kv_pool.astype(q.dtype),
        block_tables.astype(mx.int32),
        context_lens.astype(mx.int32),
        positions.astype(mx.int32),
    ]
    return _kernel()(
        inputs=inputs,
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
        **call_args(q, kv_pool, scale),
    )[0]
