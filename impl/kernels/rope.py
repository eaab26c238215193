"""Rotary embedding of the new Q/K at their absolute positions, then the K/V write
into the paged pool through a slot mapping.

The attention's projection makes one row per token, q | k | v (``qkv``, (B * T,
(n_heads + 2 * n_kv_heads) * D)). A layer's pool holds K and V together, (num_blocks,
block_size, 2, n_kv_heads, D): one pool row is a token's K heads then its V heads,
the same order as the tail of its qkv row. ``rope_and_cache_write`` dispatches: on
a GPU backend (CUDA or Metal) one custom kernel (``rope_qkv``) reads those rows and
writes rotated Q (B, T, n_heads, D) and the new pool rows, rotated K with V, (B * T,
2, n_kv_heads, D), already in the shape the scatter takes; one MLX scatter
(``write_rows``) writes them into the pool, in place (the cache's pools can be
donated). On the CPU backend, or for shapes the kernel does not take, the ops twin
(``rope_and_cache_write_ops``) splits the rows with slices and runs. The twin is also
the kernel's oracle. Reading the rows in the kernel saves the six slice and reshape
nodes a layer the split costs, and one pool for K and V saves a scatter a layer: each
a host cost in every launch-bound decode step.

What depends only on the step, not the layer (cos and sin of the tokens' angles,
their pool rows), is computed once per step by ``rope_step`` and passed to every
layer's call as a ``RopeStep``; kernel and twin both take it, so a fault injected
into ``rope_cos_sin`` (the suites shift decode positions this way) reaches both.

Ops twin. The rotation is HF's rotate-half convention: the two halves of each head
form the (x, y) pairs, ``x' = x cos - y sin``, ``y' = y cos + x sin`` with angle
``position * inv_freq[i]``. Angles, cos and sin are taken in float32 and cast to
the activation dtype, as HF does; the products and the sum are rounded to that
dtype, as HF's element-wise ops do.

Kernel. One body for CUDA (``mx.fast.cuda_kernel``) and Metal
(``mx.fast.metal_kernel``); ``impl.kernels.backend`` supplies the per-backend lines.
  qkv           (B * T, (N_Q + 2 * N_KV) * D) rows of one dtype T
  cos, sin      float32 (B, T, D/2): ``rope_cos_sin`` of the tokens' positions
  returns       q_rot (B, T, N_Q, D) and kv (B * T, 2, N_KV, D), of dtype T
One thread per rotation pair: thread i of group (head, token) owns elements i and
i + D/2; heads below N_Q are Q's, the next N_KV are K's, the last N_KV V's (copied).
A token's K and V heads are its kv row in the qkv row's order, so head h >= N_Q
lands at kv head h - N_Q.
The arithmetic follows the twin step by step: cos and sin rounded to T, each
product and the sum rounded to T, so half-precision results match the twin's bit
for bit.

Why the write is not in the kernel: MLX custom kernels have no in-place outputs.
A first version wrote the pools through its (const) inputs and ordered readers
with ``mx.depends``; MLX's CUDA backend schedules by the buffers each kernel
declares it writes, so it ran a reader of the pool (the prefill gather)
concurrently with the write, and the suites failed on the H100 (layer 0 attention
off from position 0). Returning fresh pools instead would copy the whole cache
every layer and step.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from conform_mlx.impl.kernels.backend import Backend, active_backend, kernel_source, make_kernel

SOURCE = kernel_source("rope")  # kernels/rope.inc

HEAD_DIMS = (64, 128)  # D / 2 threads per group: whole warps
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
INPUTS = ["qkv", "cosines", "sines"]
OUTPUTS = ["q_rot", "kv_out"]
MAX_TOKENS = 65535  # one group per token along the grid's z, which CUDA caps here

# Template constants: T (dtype), HEAD_DIM, N_Q, N_KV.
_BODY = SOURCE["body"]


def build_kernel(backend: Backend) -> object:
    """The kernel object for ``backend`` (construction compiles nothing)."""
    return make_kernel(backend, "rope_qkv", INPUTS, OUTPUTS, _BODY)


BACKEND: Backend = active_backend()
# Built once at import, and only for the backend that can run it.
_KERNEL = build_kernel(BACKEND) if BACKEND != "cpu" else None


def head_counts(qkv: mx.array, n_kv: int, head_dim: int) -> tuple[int, int]:
    """(n_heads, n_kv_heads) of q | k | v rows ``qkv``, or ValueError when its width
    is not a whole number of heads with room for Q."""
    heads, rest = divmod(qkv.shape[-1], head_dim)
    n_q = heads - 2 * n_kv
    if qkv.ndim != 2 or rest or n_q < 1:
        raise ValueError(
            f"qkv {qkv.shape} is not (tokens, (n_heads + 2 * {n_kv}) * {head_dim}) rows"
        )
    return n_q, n_kv


def supports(qkv: mx.array, head_dim: int) -> bool:
    """Whether the kernel takes these rows (the dispatcher falls back if not)."""
    return head_dim in HEAD_DIMS and qkv.dtype in DTYPES and qkv.shape[0] <= MAX_TOKENS


def call_args(qkv: mx.array, n_kv: int, head_dim: int) -> dict:
    """Template, grid and thread group of one launch (also used by the Metal check)."""
    n_q, _ = head_counts(qkv, n_kv, head_dim)
    return {
        "template": [("T", qkv.dtype), ("HEAD_DIM", head_dim), ("N_Q", n_q), ("N_KV", n_kv)],
        "grid": (head_dim // 2, n_q + 2 * n_kv, qkv.shape[0]),  # in threads
        "threadgroup": (head_dim // 2, 1, 1),
    }


def rope_qkv(
    qkv: mx.array, tokens: tuple[int, int], n_kv: int, head_dim: int, cos: mx.array, sin: mx.array
) -> tuple[mx.array, mx.array]:
    """The custom kernel: (q_rot (B, T, n_heads, D), kv (B * T, 2, n_kv, D)) of the rows
    ``qkv``, q and k rotated at the angles of ``cos``/``sin``; ``tokens`` is (B, T)."""
    if _KERNEL is None:
        raise RuntimeError("rope_qkv needs a GPU backend (Metal or CUDA)")
    if not supports(qkv, head_dim):
        raise ValueError(f"unsupported qkv {qkv.shape} {qkv.dtype}, head_dim {head_dim}")
    n_q, _ = head_counts(qkv, n_kv, head_dim)
    q_rot, kv = _KERNEL(
        inputs=[qkv, cos, sin],
        # kv as the scatter takes it: a reshape there would be one more graph node a
        # layer, a host cost in every launch-bound decode step.
        output_shapes=[(*tokens, n_q, head_dim), (qkv.shape[0], 2, n_kv, head_dim)],
        output_dtypes=[qkv.dtype] * 2,
        **call_args(qkv, n_kv, head_dim),
    )
    return q_rot, kv


def split_qkv(
    qkv: mx.array, tokens: tuple[int, int], n_kv: int, head_dim: int
) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v of the rows ``qkv`` as (B, T, heads, D) views (the twin's split)."""
    n_q, _ = head_counts(qkv, n_kv, head_dim)
    q_end, k_end = n_q * head_dim, (n_q + n_kv) * head_dim
    return (
        qkv[:, :q_end].reshape(*tokens, n_q, head_dim),
        qkv[:, q_end:k_end].reshape(*tokens, n_kv, head_dim),
        qkv[:, k_end:].reshape(*tokens, n_kv, head_dim),
    )


# -- the rotation's ops ----------------------------------------------------------------
def rope_cos_sin(positions: mx.array, inv_freq: mx.array) -> tuple[mx.array, mx.array]:
    """cos and sin of ``positions * inv_freq``: float32 (B, T, D/2) each.

    The one place angles are computed, for the twin and the kernel alike, so a
    fault injected here (the suites shift decode positions this way) reaches both.
    """
    # Broadcast before the cast, so no (B, T) float32 array is made: at batch 1 it
    # would be a 4-byte array, which MLX's CUDA backend keeps in its small pool of
    # managed memory, mapped for the GPU rather than moved to it: each kernel that
    # reads it waits on the bus (see impl.paged_cache.step_fields).
    wide = mx.broadcast_to(positions[:, :, None], (*positions.shape, inv_freq.shape[0]))
    angles = wide.astype(mx.float32) * inv_freq  # (B, T, D/2)
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


# -- one step: rotate, then write the pools -------------------------------------------
@dataclass(frozen=True)
class RopeStep:
    """What RoPE and the cache write need of one step's new tokens; the same for
    every layer, so the model builds it once a step (``rope_step``) and passes it down."""

    cos: mx.array  # float32 (B, T, D/2): rope_cos_sin of the tokens' positions
    sin: mx.array
    # The pool row of each new token as (block, offset): slot == block * block_size + offset.
    blocks: mx.array  # (B * T,) int32
    offsets: mx.array  # (B * T,) int32
    block_size: int


def rope_step(
    positions: mx.array, inv_freq: mx.array, blocks: mx.array, offsets: mx.array, block_size: int
) -> RopeStep:
    """positions: (B, T) int32; inv_freq: (D/2,) float32; blocks, offsets: (B * T,)
    int32, each new token's pool row as (block, offset), ``PagedKVCache.plan``'s."""
    cos, sin = rope_cos_sin(positions, inv_freq)
    return RopeStep(cos, sin, blocks, offsets, block_size)


def rope_and_cache_write(
    qkv: mx.array, tokens: tuple[int, int], step: RopeStep, kv_pool: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """Rotate q and k, write k and v to their slots; return (q_rot, kv, kv_pool').

    qkv: (B * T, (n_heads + 2 * n_kv_heads) * D), one q | k | v row per token;
    tokens: (B, T); step: from ``rope_step``; kv_pool: (num_blocks, block_size, 2,
    n_kv_heads, D), which gives n_kv_heads and D. q_rot is (B, T, n_heads, D); kv,
    the new pool rows (rotated K, then V), (B * T, 2, n_kv_heads, D), token-major.

    The pool is written the way MLX's ``pool[idx] = rows`` writes: the array object
    passed in is updated, and returned. MLX reuses its buffer when nothing else
    holds it, so a step costs the new rows, not a copy of the pool.
    """
    n_kv, head_dim = pool_heads(kv_pool)
    head_counts(qkv, n_kv, head_dim)  # a clear error before any kernel sees the rows
    if BACKEND != "cpu" and supports(qkv, head_dim):
        q, kv = rope_qkv(qkv, tokens, n_kv, head_dim, step.cos, step.sin)
        return q, kv, write_rows(kv_pool, kv, step)
    return rope_and_cache_write_ops(qkv, tokens, step, kv_pool)


def rope_and_cache_write_ops(
    qkv: mx.array, tokens: tuple[int, int], step: RopeStep, kv_pool: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """The ops twin of ``rope_and_cache_write``."""
    q, k, v = split_qkv(qkv, tokens, *pool_heads(kv_pool))
    q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
    kv = mx.stack([k, v], axis=2).reshape(-1, 2, *k.shape[2:])  # pool rows (B * T, 2, n_kv, D)
    return q, kv, write_rows(kv_pool, kv, step)


def pool_heads(kv_pool: mx.array) -> tuple[int, int]:
    """(n_kv_heads, head_dim) of a layer's pool, or ValueError if it is not
    (num_blocks, block_size, 2, n_kv_heads, head_dim)."""
    if kv_pool.ndim != 5 or kv_pool.shape[2] != 2:
        raise ValueError(
            f"kv pool {kv_pool.shape} is not (num_blocks, block_size, 2, n_kv_heads, head_dim)"
        )
    return kv_pool.shape[3], kv_pool.shape[4]


def write_rows(pool: mx.array, rows: mx.array, step: RopeStep) -> mx.array:
    """Write ``rows`` (B * T, 2, n_kv_heads, D) into ``pool`` at the step's slots; returns it.

    The scatter indexes the pool itself by (block, offset), not a reshaped view of
    it: MLX then reuses the pool's buffer for the result. Through a view made in
    the same graph it copied the whole pool every layer and step (measured on the
    H100: +2.7 ms a decode step with a 2.9 GB cache).
    """
    if pool.shape[1] != step.block_size:
        raise ValueError(f"pool blocks of {pool.shape[1]} rows, step for {step.block_size}")
    pool[step.blocks, step.offsets] = rows.astype(pool.dtype)
    return pool
