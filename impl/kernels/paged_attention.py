"""Attention of a step's new query tokens over a paged KV cache, GQA-aware. ``paged_attention``
dispatches to the decode kernel, the prefill kernel, ``gathered_attention``, MLX's causal
attention (a first chunk) or the ops twin ``paged_attention_ops``, every path's oracle."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from conform_mlx.impl.kernels import paged_prefill
from conform_mlx.impl.kernels.backend import WARP, Backend, active_backend, float_bits, on_first_use
from conform_mlx.impl.kernels.paged_decode_source import build_kernels
from conform_mlx.impl.kernels.policy import current_policy
from conform_mlx.impl.kernels.rope import as_words

# Launch shape and prefill cut-off, measured: docs/kernel-notes.md#paged-attention
MIN_WARPS = 4
MAX_WARPS = 16  # 32 warps (1024 threads) ran out of registers
THREAD_FLOAT_BUDGET = 56 * 16  # thread_floats x warps of the widest group that ran
SHARED_BYTES = 32 * 1024  # Metal's thread-group memory, for the merge slots
HEAD_DIMS = (64, 128)  # P.V: each lane holds HEAD_DIM / 32 elements of a V row
PREFILL_KERNEL_MAX_CHUNK = 16  # longest chunk over a cache, tokens a sequence, for prefill
DTYPES = (mx.float16, mx.bfloat16, mx.float32)

BACKEND: Backend = active_backend()
_kernels = on_first_use(build_kernels, "paged_decode_attention")


def supports(q: mx.array, kv_pool: mx.array, token_major: bool = False) -> bool:
    """Whether the decode kernel takes these shapes and dtype. q: (B, n_heads, T, D), or
    (B, T, n_heads, D) with ``token_major``; kv_pool: (num_blocks, block_size, 2, n_kv, D)."""
    n_heads, head_dim = q.shape[2 if token_major else 1], q.shape[3]
    return (
        head_dim in HEAD_DIMS
        and q.dtype in DTYPES
        and kv_pool.ndim == 5
        and kv_pool.shape[2] == 2
        and kv_pool.shape[4] == head_dim
        and n_heads % kv_pool.shape[3] == 0
        and 4 * shared_floats(n_heads // kv_pool.shape[3], head_dim, 1) <= SHARED_BYTES
    )


def max_warps(group_size: int, head_dim: int) -> int:
    """The most warps (a power of two) a group may have within registers and shared memory."""
    floats = thread_floats(group_size, head_dim)
    warps = MAX_WARPS
    while warps > 1 and (
        floats * warps > THREAD_FLOAT_BUDGET
        or 4 * shared_floats(group_size, head_dim, warps) > SHARED_BYTES
    ):
        warps //= 2
    return warps


def thread_floats(group_size: int, head_dim: int) -> int:
    """Live float32s a thread keeps: accumulators, 8 V rows loaded ahead, 3 scalars a head."""
    return (group_size + 8) * head_dim // WARP + 3 * group_size


def shared_floats(group_size: int, head_dim: int, n_warps: int) -> int:
    """Thread-group floats: the merge slots (the first holds the queries) and warp maxima."""
    return max(1, n_warps // 2) * (group_size * head_dim + group_size) + n_warps * group_size


def launch_plan(
    batch: int, n_kv_heads: int, max_blocks: int, block_size: int, group_size: int, head_dim: int
) -> tuple[int, int]:
    """(warps per group, context partitions) of a decode launch over tables ``max_blocks``
    wide; the kernel splits each sequence's own blocks, so table padding adds no work."""
    if current_policy().batch_invariant:  # a sequence's sums split alike in any batch
        return max_warps(group_size, head_dim), 1
    tokens = max_blocks * block_size
    policy = current_policy()
    top = max_warps(group_size, head_dim)
    by_occupancy = math.ceil(policy.target_groups / (batch * n_kv_heads))
    by_length = math.ceil(tokens / policy.split_tokens)
    by_head = policy.head_warps // top
    parts = max(1, min(by_occupancy, by_length, by_head, max_blocks))
    warps = min(top, max(MIN_WARPS, math.ceil(tokens / (WARP * parts))))
    return warps, parts


def kernel_call_args(
    q: mx.array, kv_pool: mx.array, scale: float, n_parts: int, n_warps: int = MIN_WARPS
) -> dict:
    """Template, grid and thread group of one launch; q (B, n_heads, 1, D) or (B, 1, n_heads, D)."""
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
    """The decode kernel. q: (B, n_heads, 1, D), or (B, 1, n_heads, D) with ``token_major``;
    ``out_shape``: any shape of the result; ``n_parts``, ``n_warps``: ``launch_plan``'s."""
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
    final, split, combine = _kernels()
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
    """Where a step's context lies in the pool and what each new token may see, once a step."""

    slots: mx.array  # (B, L = width * block_size) int32; past the length token 0's (masked)
    # (B, 1, T, L): 0 where new token t may see context token j, else -inf. None: one
    # sequence's rows, exactly its context, its new tokens last: MLX's causal mask says it.
    mask: mx.array | None


def context_rows(
    block_tables: mx.array,
    context_lens: mx.array,
    positions: mx.array,
    block_size: int,
    dtype: mx.Dtype,
    exact: int = 0,
) -> ContextRows:
    """``ContextRows`` of a step; arguments as for ``paged_attention_ops``. ``exact``: the one
    sequence's context length (``StepPlan.chunk_context``), for rows without a mask."""
    batch, width = block_tables.shape
    offsets = mx.arange(block_size, dtype=mx.int32)
    slots = (block_tables[:, :, None] * block_size + offsets).reshape(batch, width * block_size)
    if exact:
        if batch != 1 or exact > width * block_size:
            raise ValueError(f"exact={exact}: one sequence of at most its table's tokens")
        return ContextRows(slots[:, :exact], None)
    key_pos = mx.arange(width * block_size, dtype=mx.int32)
    in_seq = key_pos[None, :] < context_lens[:, None]  # (B, L)
    slots = mx.where(in_seq, slots, slots[:, :1])
    visible = (key_pos[None, None, :] <= positions[:, :, None]) & in_seq[:, None, :]
    mask = mx.where(visible, mx.array(0, dtype), mx.array(-math.inf, dtype))
    return ContextRows(slots, mask[:, None])


def gathered_attention(q: mx.array, kv_pool: mx.array, rows: ContextRows, scale: float) -> mx.array:
    """``paged_attention_ops``'s attention for long chunks on a GPU: rows gathered by
    ``rows.slots`` as words (no zeroing pass), MLX's fused attention with ``rows.mask`` (or
    causal)."""
    num_blocks, block_size, _, n_kv_heads, head_dim = kv_pool.shape
    flat = as_words(kv_pool.reshape(num_blocks * block_size, 2, n_kv_heads, head_dim))
    gathered = flat[rows.slots].view(kv_pool.dtype)  # (B, L, 2, n_kv_heads, head_dim)
    k, v = split_kv(gathered.transpose(2, 0, 3, 1, 4))  # each (B, n_kv_heads, L, head_dim)
    mask = "causal" if rows.mask is None else rows.mask  # causal: the queries are the last T
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


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
    """``paged_attention_ops``'s attention, q (B, T, n_heads, D) in, (B * T, n_heads * D) out.
    ``own_kv``: the new pool rows, promised to be the whole context; ``rows``: ``context_rows``."""
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
    """Whether a GPU chunk over a cache runs the prefill kernel (else gathered attention)."""
    t = q.shape[2]
    return paged_prefill.supports(q, kv_pool) and t <= PREFILL_KERNEL_MAX_CHUNK


def causal_self_attention(q: mx.array, kv: mx.array, scale: float) -> mx.array:
    """Causal attention of T queries over the same T tokens' K/V. q: (B, n_heads, T, D);
    kv: their pool rows, (B * T, 2, n_kv_heads, D) or (B, T, 2, n_kv_heads, D)."""
    kv = kv.reshape(q.shape[0], q.shape[2], *kv.shape[-3:])  # (B, T, 2, n_kv_heads, D)
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
    """Causal attention of rotated q (B, n_heads, T, D) over each sequence's cache, same shape
    out; int32 block_tables (B, W), context_lens (B,) (new tokens in), positions (B, T). Slots
    past a length are zeroed: garbage or NaN there cannot reach the output."""
    batch, max_blocks = block_tables.shape
    _, block_size, _, n_kv_heads, head_dim = kv_pool.shape
    length = max_blocks * block_size
    key_pos = mx.arange(length, dtype=mx.int32)
    in_seq = key_pos[None, :] < context_lens[:, None]  # (B, L)
    rows = kv_pool[block_tables].reshape(batch, length, 2, n_kv_heads, head_dim)  # (B, L, ...)
    rows = mx.where(in_seq[:, :, None, None, None], rows, mx.zeros((), dtype=kv_pool.dtype))
    rows = rows.transpose(2, 0, 3, 1, 4)  # (2, B, n_kv_heads, L, head_dim)
    k, v = split_kv(rows)
    visible = (key_pos[None, None, :] <= positions[:, :, None]) & in_seq[:, None, :]  # (B, T, L)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible[:, None])
