"""Rotary embedding of the new Q/K at their absolute positions, then the K/V write
into the paged pools through a slot mapping.

``rope_and_cache_write`` dispatches: on a GPU backend (CUDA or Metal) the fused
kernel (``kernels.rope_cache_write_kernel``) rotates Q and K and writes K/V into
their pool rows in one launch; on the CPU backend, or for shapes the kernel does
not take, the ops twin below runs. The twin is also the kernel's oracle.

Ops twin. The rotation is HF's rotate-half convention: the two halves of each head
form the (x, y) pairs, ``x' = x cos - y sin``, ``y' = y cos + x sin`` with angle
``position * inv_freq[i]``. Angles, cos and sin are taken in float32 and cast to
the activation dtype, as HF does; the products and the sum are rounded to that
dtype, as HF's element-wise ops do.
"""

from __future__ import annotations

import mlx.core as mx

from kernels import rope_cache_write_kernel as fused


def rope_cos_sin(positions: mx.array, inv_freq: mx.array) -> tuple[mx.array, mx.array]:
    """cos and sin of ``positions * inv_freq``: float32 (B, T, D/2) each.

    The one place angles are computed, for the twin and the kernel alike, so a
    fault injected here (the suites shift decode positions this way) reaches both.
    """
    angles = positions.astype(mx.float32)[:, :, None] * inv_freq  # (B, T, D/2)
    return mx.cos(angles), mx.sin(angles)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x: (B, T, H, D); cos, sin: float32 (B, T, D/2) from ``rope_cos_sin``."""
    cos = mx.concatenate([cos, cos], axis=-1)[:, :, None, :].astype(x.dtype)  # (B, T, 1, D)
    sin = mx.concatenate([sin, sin], axis=-1)[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def rope(x: mx.array, positions: mx.array, inv_freq: mx.array) -> mx.array:
    """x: (B, T, H, D); positions: (B, T) int32; inv_freq: (D/2,) float32."""
    return apply_rope(x, *rope_cos_sin(positions, inv_freq))


# The model calls the seam once per layer with the same positions array; the kernel
# path computes cos/sin once per step and reuses them for the other layers.
_last_angles: list = []  # [positions, inv_freq, (cos, sin)] of the latest call


def _step_cos_sin(positions: mx.array, inv_freq: mx.array) -> tuple[mx.array, mx.array]:
    if not (_last_angles and _last_angles[0] is positions and _last_angles[1] is inv_freq):
        _last_angles[:] = [positions, inv_freq, rope_cos_sin(positions, inv_freq)]
    return _last_angles[2]


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
    pools seen as (num_blocks * block_size, n_kv_heads, D).

    Callers must use the returned pools from here on and treat the ones passed in
    as consumed: the twin leaves them unchanged, the kernel writes into them.
    """
    if fused.BACKEND != "cpu" and fused.supports(q, k, v, k_pool, v_pool):
        cos, sin = _step_cos_sin(positions, inv_freq)
        return fused.rope_cache_write(q, k, v, cos, sin, k_pool, v_pool, slots)
    return rope_and_cache_write_ops(q, k, v, positions, inv_freq, k_pool, v_pool, slots)


def rope_and_cache_write_ops(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    positions: mx.array,
    inv_freq: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    slots: mx.array,
) -> tuple[mx.array, mx.array, mx.array]:
    """The ops twin of ``rope_and_cache_write``; the input pools are not modified."""
    q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    flat_shape = (-1, *k_pool.shape[2:])
    new_pools = []
    for pool, rows in ((k_pool, k), (v_pool, v)):
        flat = pool.reshape(flat_shape)  # a new array object: the caller's pool is untouched
        flat[slots] = rows.reshape(-1, *rows.shape[2:]).astype(pool.dtype)
        new_pools.append(flat.reshape(pool.shape))
    return q, new_pools[0], new_pools[1]
