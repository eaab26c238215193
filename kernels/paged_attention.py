"""Attention of new query tokens over a paged KV cache, grouped-query aware.

``paged_attention`` dispatches: on a GPU backend (CUDA or Metal) a decode step
(T == 1) of a shape the custom kernel supports runs it
(``kernels.paged_decode_attention``); a step whose sequences were all empty (a
prompt's first chunk) passes its own new keys and values (``own_kv``), which are
the whole context, and runs MLX's fused causal attention on them without reading
the pools; everything else (chunked prefill after the first chunk, other head
sizes, the CPU backend) runs the ops twin below, which is also the oracle the
kernel is tested against.

Ops twin: gathers each sequence's blocks through its block table and calls MLX's
fused attention with K/V at ``num_key_value_heads`` (never tiled to the query
heads; MLX maps each query head to its group). Slots past a sequence's length
are zeroed before use, so garbage (or a NaN poison) in unused pool rows cannot
reach the output.
"""

from __future__ import annotations

import mlx.core as mx

from kernels.paged_decode_attention import BACKEND, paged_decode_attention, supports


def paged_attention(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    positions: mx.array,
    scale: float,
    own_kv: tuple[mx.array, mx.array] | None = None,
) -> mx.array:
    """Same contract as ``paged_attention_ops``; the custom kernel serves GPU decode.

    A decode step's single query sits at ``context_len - 1`` (``PagedKVCache.plan``
    builds it so), which is why the kernel needs no ``positions``. ``own_kv``, the
    step's new (k, v) as (B, T, n_kv_heads, head_dim), promises that every sequence
    holds exactly those T tokens, at positions 0..T-1.
    """
    if BACKEND != "cpu" and q.shape[2] == 1 and supports(q, k_pool):
        return paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, scale)
    if own_kv is not None:
        return causal_self_attention(q, *own_kv, scale)
    return paged_attention_ops(q, k_pool, v_pool, block_tables, context_lens, positions, scale)


def causal_self_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention of T queries over the same T tokens' keys and values.

    q: (B, n_heads, T, D); k, v: (B, T, n_kv_heads, D), K/V heads not repeated.
    """
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, n_kv_heads, T, D)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")


def paged_attention_ops(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    context_lens: mx.array,
    positions: mx.array,
    scale: float,
) -> mx.array:
    """Causal attention of ``q`` over the cached keys/values of each sequence.

    q:            (B, n_heads, T, head_dim), already rotated
    k_pool/v_pool:(num_blocks, block_size, n_kv_heads, head_dim)
    block_tables: (B, max_blocks) int32
    context_lens: (B,) int32, cached tokens per sequence including the new ones
    positions:    (B, T) int32, absolute position of each query token
    returns       (B, n_heads, T, head_dim)
    """
    batch, max_blocks = block_tables.shape
    _, block_size, n_kv_heads, head_dim = k_pool.shape
    length = max_blocks * block_size
    key_pos = mx.arange(length, dtype=mx.int32)
    in_seq = key_pos[None, :] < context_lens[:, None]  # (B, L)

    def gather(pool: mx.array) -> mx.array:
        rows = pool[block_tables].reshape(batch, length, n_kv_heads, head_dim)
        rows = mx.where(in_seq[:, :, None, None], rows, mx.zeros((), dtype=pool.dtype))
        return rows.transpose(0, 2, 1, 3)  # (B, n_kv_heads, L, head_dim)

    k, v = gather(k_pool), gather(v_pool)
    visible = (key_pos[None, None, :] <= positions[:, :, None]) & in_seq[:, None, :]  # (B, T, L)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=visible[:, None])
