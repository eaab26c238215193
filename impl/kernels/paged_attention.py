"""Attention of new query tokens over a paged KV cache, grouped-query aware.

``paged_attention`` dispatches: on a GPU backend (CUDA or Metal) a decode step
(T == 1) of a shape the custom kernel supports runs it (``paged_decode_attention``,
whose CUDA/Metal source and algorithm are in ``impl.kernels.paged_decode_source``); a
step whose sequences were all empty (a prompt's first chunk) passes its own new
keys and values (``own_kv``), which are the whole context, and runs MLX's fused
causal attention on them without reading the pools; a small chunk over a cache
(at most ``PREFILL_KERNEL_MAX_CHUNK`` query tokens per sequence) runs the paged
prefill kernel (``impl.kernels.paged_prefill``); a longer chunk over a cache on a GPU
gathers each sequence's context rows and runs MLX's fused attention on them with
an additive mask (``gathered_attention``; rows and mask from ``context_rows``,
built once a step); everything else (other head sizes, the CPU backend) runs the
ops twin (``paged_attention_ops``), which is also the oracle the other paths are
tested against.

Ops twin: gathers each sequence's blocks through its block table and calls MLX's
fused attention with K/V at ``num_key_value_heads`` (never tiled to the query
heads; MLX maps each query head to its group). Slots past a sequence's length
are zeroed before use, so garbage (or a NaN poison) in unused pool rows cannot
reach the output.

K and V are taken apart with slices, never ``kv[0]``: MLX indexes a leading axis
with an integer through a gather, a copy of the whole context a layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from conform_mlx.impl.kernels import paged_prefill
from conform_mlx.impl.kernels.backend import WARP, Backend, active_backend, float_bits
from conform_mlx.impl.kernels.paged_decode_source import build_kernels

# Launch shape, from the sweep in tools/gpu_kernels_check.py (H200, TinyLlama's
# heads, block tables padded to the compiled step's width bucket, each shape timed in
# a compiled chain of calls; results/gpu/decode-kernel-variants.txt, section 6):
# about one 32-token chunk of the table's width per warp, split-K only while the
# batch leaves the GPU idle, and at most MAX_PARTS partitions.
MIN_WARPS = 4  # 1 warp at ctx 16 ran 19.3 us a call against 4 warps' 17.7 (section 6a)
MAX_WARPS = 16  # 32 warps (1024 threads) ran out of registers on the H200
# Split-K only when B * n_kv_heads groups would leave the GPU idle: aim for about
# this many groups (an H100 has 132 SMs, an M-series GPU up to 80 cores) ...
TARGET_GROUPS = 128
# ... with at most this many partitions (32 of them, each merged by the combine, ran
# 1.5x slower than 8 wider ones at batch 1, context 2048) ...
MAX_PARTS = 8
# ... and at least this many tokens of the table's width per partition.
MIN_PARTITION_TOKENS = 128
# A thread group's budget: the float32 values a thread keeps in registers
# (``thread_floats``) times its warps, no more than TinyLlama's 8 x 64 heads at 16 warps,
# the widest group run on a GPU (98 registers a thread, ncu); and Metal's 32 KiB of
# thread-group memory for the merge slots.
THREAD_FLOAT_BUDGET = 56 * 16
SHARED_BYTES = 32 * 1024
HEAD_DIMS = (64, 128)  # P.V: each lane holds HEAD_DIM / 32 elements of a V row
# The prefill kernel runs chunks of at most this many query tokens per sequence over
# a cache; longer ones go to gathered_attention, whose fused attention (cuDNN on CUDA)
# beats the kernel's scalar arithmetic there. Measured per call (H200, TinyLlama heads,
# tools/gpu_kernels_check.py, results/gpu/README.md), kernel / gathered ms: 7 tokens
# after 1000, 0.024 / 0.037; 8 x 16 after 2000, 0.186 / 0.182; 64 after 1000,
# 0.064 / 0.037; 4 x 64 after 500, 0.117 / 0.052; 512 after 1000, 0.426 / 0.092.
PREFILL_KERNEL_MAX_CHUNK = 16
DTYPES = (mx.float16, mx.bfloat16, mx.float32)

BACKEND: Backend = active_backend()
# Built once at import, and only for the backend that can run them.
_KERNELS = build_kernels(BACKEND) if BACKEND != "cpu" else None


def supports(q: mx.array, kv_pool: mx.array, token_major: bool = False) -> bool:
    """Whether the kernel takes these shapes and dtype (the dispatcher falls back if not).
    q: (B, n_heads, T, D), or (B, T, n_heads, D) with ``token_major``; kv_pool:
    (num_blocks, block_size, 2, n_kv_heads, D)."""
    n_heads, head_dim = q.shape[2 if token_major else 1], q.shape[3]
    return (
        head_dim in HEAD_DIMS
        and q.dtype in DTYPES
        and kv_pool.ndim == 5
        and kv_pool.shape[2] == 2
        and kv_pool.shape[4] == head_dim
        and n_heads % kv_pool.shape[3] == 0
        # one warp's thread group must fit in Metal's thread-group memory
        and 4 * shared_floats(n_heads // kv_pool.shape[3], head_dim, 1) <= SHARED_BYTES
    )


def max_warps(group_size: int, head_dim: int) -> int:
    """The most warps a group of this shape may have (a power of two, at least 1):
    registers for the values its threads keep live (``thread_floats``) and shared memory
    for its merge slots (``shared_floats``)."""
    floats = thread_floats(group_size, head_dim)
    warps = MAX_WARPS
    while warps > 1 and (
        floats * warps > THREAD_FLOAT_BUDGET
        or 4 * shared_floats(group_size, head_dim, warps) > SHARED_BYTES
    ):
        warps //= 2
    return warps


def thread_floats(group_size: int, head_dim: int) -> int:
    """The float32 values a kernel thread keeps live: its accumulators (group_size x
    head_dim / 32), the 8 V rows it loads ahead (8 x head_dim / 32), and a score, max
    and denominator per query head."""
    return (group_size + 8) * head_dim // WARP + 3 * group_size


def shared_floats(group_size: int, head_dim: int, n_warps: int) -> int:
    """The kernel's thread-group floats: max(1, n_warps // 2) merge slots of a warp's
    (acc, l), the first of which holds the queries during the walk, and each warp's
    running max."""
    return max(1, n_warps // 2) * (group_size * head_dim + group_size) + n_warps * group_size


def launch_plan(
    batch: int, n_kv_heads: int, max_blocks: int, block_size: int, group_size: int, head_dim: int
) -> tuple[int, int]:
    """(warps per thread group, context partitions) of a decode launch over block tables
    ``max_blocks`` wide. The kernel splits each sequence's own blocks among the
    partitions, so a table padded past the context adds no work to walk."""
    tokens = max_blocks * block_size
    by_occupancy = math.ceil(TARGET_GROUPS / (batch * n_kv_heads))
    by_length = math.ceil(tokens / MIN_PARTITION_TOKENS)
    parts = max(1, min(by_occupancy, by_length, MAX_PARTS, max_blocks))
    top = max_warps(group_size, head_dim)
    warps = min(top, max(MIN_WARPS, math.ceil(tokens / (WARP * parts))))
    return warps, parts


def kernel_call_args(
    q: mx.array, kv_pool: mx.array, scale: float, n_parts: int, n_warps: int = MIN_WARPS
) -> dict:
    """Template, grid and thread group of one launch (also used by the Metal check).
    q: (B, n_heads, 1, D), or (B, 1, n_heads, D): at one token the two are the same bytes.
    The scale is a template constant (``float_bits``), not an input."""
    batch, n_heads, head_dim = q.shape[0], q.shape[1] * q.shape[2], q.shape[3]
    _, block_size, _, n_kv, _ = kv_pool.shape
    return {
        "template": [
            ("T", q.dtype),
            ("HEAD_DIM", head_dim),
            ("GROUP_SIZE", n_heads // n_kv),
            ("KV_BLOCK", block_size),
            ("N_WARPS", n_warps),
            ("SCALE_BITS", float_bits(scale)),
        ],
        # In threads on both backends: exactly one group per (kv head, sequence x part).
        "grid": (n_warps * WARP, n_kv, batch * n_parts),
        "threadgroup": (n_warps * WARP, 1, 1),
    }


def combine_call_args(q: mx.array) -> dict:
    """Template, grid and thread group of the combine launch (q as for ``kernel_call_args``)."""
    batch, n_heads, head_dim = q.shape[0], q.shape[1] * q.shape[2], q.shape[3]
    return {
        "template": [("T", q.dtype), ("HEAD_DIM", head_dim)],
        "grid": (head_dim, n_heads, batch),
        "threadgroup": (head_dim, 1, 1),
    }


def paged_decode_attention(
    q: mx.array,
    kv_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    scale: float,
    n_parts: int | None = None,
    n_warps: int | None = None,
    token_major: bool = False,
    out_shape: tuple[int, ...] | None = None,
) -> mx.array:
    """The custom kernel: attention of one query token per sequence over its cache.

    q: (B, n_heads, 1, D); the rest as for ``paged_attention_ops``. With
    ``token_major``, q and the result are (B, 1, n_heads, D) instead: the same bytes
    at one token, so the model's layout needs no transpose (a graph node on every
    layer of every step) on either side. ``out_shape`` gives the result another
    shape of the same bytes, such as the (B, n_heads * D) rows the output projection
    takes, for the same reason. ``n_parts``, the context partitions per
    (sequence, KV head), and ``n_warps``, the warps per thread group, default to
    ``launch_plan``'s; any counts give the same answer (the suites check it), only
    the speed differs (``tools/gpu_kernels_check.py`` times them).
    """
    if _KERNELS is None:
        raise RuntimeError("paged_decode_attention needs a GPU backend (Metal or CUDA)")
    batch, n_heads, t, head_dim = q.shape
    if token_major:
        n_heads, t = t, n_heads
    if t != 1 or not supports(q, kv_pool, token_major):
        raise ValueError(
            f"unsupported q {q.shape} {q.dtype} / pool {kv_pool.shape}; see supports()"
        )
    out_shape = q.shape if out_shape is None else tuple(out_shape)
    if math.prod(out_shape) != q.size:
        raise ValueError(f"out_shape {out_shape} does not hold the {q.shape} result")
    n_kv, max_blocks = kv_pool.shape[3], block_tables.shape[1]
    shape = (n_heads // n_kv, head_dim)
    plan_warps, plan_parts = launch_plan(batch, n_kv, max_blocks, kv_pool.shape[1], *shape)
    n_parts = plan_parts if n_parts is None else n_parts
    n_warps = plan_warps if n_warps is None else n_warps
    if n_parts < 1:
        raise ValueError(f"n_parts must be at least 1, got {n_parts}")
    if not 1 <= n_warps <= max_warps(*shape):
        raise ValueError(f"n_warps must be in 1..{max_warps(*shape)} at {shape}, got {n_warps}")
    inputs = [
        q,
        kv_pool.astype(q.dtype),
        block_tables.astype(mx.int32),
        context_lens.astype(mx.int32),
    ]
    launch = kernel_call_args(q, kv_pool, scale, n_parts, n_warps)
    final, split, combine = _KERNELS
    if n_parts == 1:
        return final(inputs=inputs, output_shapes=[out_shape], output_dtypes=[q.dtype], **launch)[0]
    part_acc, part_ml = split(
        inputs=inputs,
        output_shapes=[(batch, n_heads, n_parts, head_dim), (batch, n_heads, n_parts, 2)],
        output_dtypes=[mx.float32, mx.float32],
        **launch,
    )
    return combine(
        inputs=[part_acc, part_ml],
        output_shapes=[out_shape],
        output_dtypes=[q.dtype],
        **combine_call_args(q),
    )[0]


@dataclass(frozen=True)
class ContextRows:
    """Where a step's context lies in a pool and what each new token may see: the
    same for every layer, so the model builds it once a step (``context_rows``)."""

    # (B, L) int32: the pool row (block * block_size + offset) of each sequence's
    # context token j, L its block table's width times block_size. Past the
    # sequence's length it is the row of the sequence's token 0, a written row, so a
    # gather never brings in an unwritten (or NaN-poisoned) one; the mask hides it.
    slots: mx.array
    # (B, 1, T, L) in the activations' dtype: 0 where new token t may attend to
    # context token j (j <= its position, j < the sequence's length), -inf elsewhere.
    mask: mx.array


def context_rows(
    block_tables: mx.array,
    context_lens: mx.array,
    positions: mx.array,
    block_size: int,
    dtype: mx.Dtype,
) -> ContextRows:
    """``ContextRows`` of a step; arguments as for ``paged_attention_ops``."""
    batch, width = block_tables.shape
    offsets = mx.arange(block_size, dtype=mx.int32)
    slots = (block_tables[:, :, None] * block_size + offsets).reshape(batch, width * block_size)
    key_pos = mx.arange(width * block_size, dtype=mx.int32)
    in_seq = key_pos[None, :] < context_lens[:, None]  # (B, L)
    slots = mx.where(in_seq, slots, slots[:, :1])
    visible = (key_pos[None, None, :] <= positions[:, :, None]) & in_seq[:, None, :]
    mask = mx.where(visible, mx.array(0, dtype), mx.array(-math.inf, dtype))
    return ContextRows(slots, mask[:, None])


def gathered_attention(q: mx.array, kv_pool: mx.array, rows: ContextRows, scale: float) -> mx.array:
    """``paged_attention_ops``'s attention, for long chunks on a GPU: each sequence's
    context rows gathered by slot (``rows.slots``), no zeroing pass, and MLX's fused
    attention with the additive mask built once a step (``rows.mask``). q:
    (B, n_heads, T, D); returns (B, n_heads, T, D)."""
    num_blocks, block_size, _, n_kv_heads, head_dim = kv_pool.shape
    flat = kv_pool.reshape(num_blocks * block_size, 2, n_kv_heads, head_dim)
    gathered = flat[rows.slots]  # (B, L, 2, n_kv_heads, head_dim)
    k, v = split_kv(gathered.transpose(2, 0, 3, 1, 4))  # each (B, n_kv_heads, L, head_dim)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=rows.mask)


def paged_attention(
    q: mx.array,
    kv_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    positions: mx.array,
    scale: float,
    own_kv: mx.array | None = None,
    rows: ContextRows | None = None,
) -> mx.array:
    """``paged_attention_ops``'s attention in the model's layouts: q is (B, T,
    n_heads, head_dim) as the QKV projection and RoPE make it, the result (B * T,
    n_heads * head_dim) rows as the output projection takes them. The custom kernel
    serves GPU decode, in those layouts directly (no graph node around it); the other
    paths take (B, n_heads, T, head_dim) and are transposed to it and back.

    A decode step's single query sits at ``context_len - 1`` (``PagedKVCache.plan``
    builds it so), which is why the kernel needs no ``positions``. ``own_kv``, the
    step's new keys and values as (B * T, 2, n_kv_heads, head_dim) pool rows,
    promises that every sequence holds exactly those T tokens, at
    positions 0..T-1. ``rows``, the step's ``context_rows`` (built here when
    needed and not given), serves long chunks over a cache on a GPU.
    """
    batch, t, n_heads, head_dim = q.shape
    out_rows = (batch * t, n_heads * head_dim)
    if BACKEND != "cpu" and t == 1 and supports(q, kv_pool, token_major=True):
        return paged_decode_attention(
            q, kv_pool, block_tables, context_lens, scale, token_major=True, out_shape=out_rows
        )
    q = q.transpose(0, 2, 1, 3)  # (B, n_heads, T, head_dim)
    if own_kv is not None:
        out = causal_self_attention(q, own_kv, scale)
    elif BACKEND != "cpu" and uses_prefill_kernel(q, kv_pool):
        out = paged_prefill.paged_prefill_attention(
            q, kv_pool, block_tables, context_lens, positions, scale
        )
    elif BACKEND != "cpu":
        if rows is None:
            rows = context_rows(block_tables, context_lens, positions, kv_pool.shape[1], q.dtype)
        out = gathered_attention(q, kv_pool, rows, scale)
    else:
        out = paged_attention_ops(q, kv_pool, block_tables, context_lens, positions, scale)
    return out.transpose(0, 2, 1, 3).reshape(out_rows)


def uses_prefill_kernel(q: mx.array, kv_pool: mx.array) -> bool:
    """Whether a GPU step of T > 1 tokens over a cache runs the prefill kernel: a
    shape it takes, and a chunk short enough that it beats ``gathered_attention``."""
    t = q.shape[2]
    return paged_prefill.supports(q, kv_pool) and t <= PREFILL_KERNEL_MAX_CHUNK


def causal_self_attention(q: mx.array, kv: mx.array, scale: float) -> mx.array:
    """Causal attention of T queries over the same T tokens' keys and values.

    q: (B, n_heads, T, D); kv: the T tokens' pool rows, (B * T, 2, n_kv_heads, D) or
    (B, T, 2, n_kv_heads, D), K/V heads not repeated.
    """
    kv = kv.reshape(q.shape[0], q.shape[2], *kv.shape[-3:])
    kv = kv.transpose(2, 0, 3, 1, 4)  # (2, B, n_kv_heads, T, D)
    k, v = split_kv(kv)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")


def split_kv(rows: mx.array) -> tuple[mx.array, mx.array]:
    """K and V of rows laid out (2, ...): two views by slicing, no copy."""
    return rows[0:1].squeeze(0), rows[1:2].squeeze(0)


def paged_attention_ops(
    q: mx.array,
    kv_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    positions: mx.array,
    scale: float,
) -> mx.array:
    """Causal attention of ``q`` over the cached keys/values of each sequence.

    q:            (B, n_heads, T, head_dim), already rotated
    kv_pool:      (num_blocks, block_size, 2, n_kv_heads, head_dim): K then V
                  heads of each cached token
    block_tables: (B, max_blocks) int32
    context_lens: (B,) int32, cached tokens per sequence including the new ones
    positions:    (B, T) int32, absolute position of each query token
    returns       (B, n_heads, T, head_dim)
    """
    batch, max_blocks = block_tables.shape
    _, block_size, _, n_kv_heads, head_dim = kv_pool.shape
    length = max_blocks * block_size
    key_pos = mx.arange(length, dtype=mx.int32)
    in_seq = key_pos[None, :] < context_lens[:, None]  # (B, L)
    rows = kv_pool[block_tables].reshape(batch, length, 2, n_kv_heads, head_dim)
    rows = mx.where(in_seq[:, :, None, None, None], rows, mx.zeros((), dtype=kv_pool.dtype))
    rows = rows.transpose(2, 0, 3, 1, 4)  # (2, B, n_kv_heads, L, head_dim)
    k, v = split_kv(rows)
    visible = (key_pos[None, None, :] <= positions[:, :, None]) & in_seq[:, None, :]  # (B, T, L)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible[:, None])
