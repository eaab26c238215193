"""Rotary embedding of the new Q/K at their absolute positions, then the K/V write
into the paged pools through a slot mapping.

Ops twin. The rotation is HF's rotate-half convention: the two halves of each head
form the (x, y) pairs, ``x' = x cos - y sin``, ``y' = y cos + x sin`` with angle
``position * inv_freq[i]``. Angles, cos and sin are taken in float32 and cast to
the activation dtype, as HF does.
"""

from __future__ import annotations

import mlx.core as mx


def rope(x: mx.array, positions: mx.array, inv_freq: mx.array) -> mx.array:
    """x: (B, T, H, D); positions: (B, T) int32; inv_freq: (D/2,) float32."""
    angles = positions.astype(mx.float32)[:, :, None] * inv_freq  # (B, T, D/2)
    angles = mx.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, D)
    cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def rope_and_cache_write(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    positions: mx.array,
    inv_freq: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    slots: mx.array,
) -> tuple[mx.array, mx.array, mx.array]:
    """Rotate q and k, write k and v to their slots; return (q_rot, k_pool', v_pool').

    q: (B, T, n_heads, D); k, v: (B, T, n_kv_heads, D); positions: (B, T);
    pools: (num_blocks, block_size, n_kv_heads, D); slots: (B * T,) int32 rows of the
    pools seen as (num_blocks * block_size, n_kv_heads, D). The input pools are not
    modified; the returned ones hold the new rows.
    """
    q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    flat_shape = (-1, *k_pool.shape[2:])
    new_pools = []
    for pool, rows in ((k_pool, k), (v_pool, v)):
        flat = pool.reshape(flat_shape)  # a new array object: the caller's pool is untouched
        flat[slots] = rows.reshape(-1, *rows.shape[2:]).astype(pool.dtype)
        new_pools.append(flat.reshape(pool.shape))
    return q, new_pools[0], new_pools[1]
