"""RoPE (HF's rotate-half, rounded as HF rounds) of a step's new Q and K, then the K/V write:
on a GPU the kernel ``rope_qkv`` makes rotated Q and the pool rows and one scatter writes them
(docs/kernel-notes.md#rope); elsewhere the ops twin ``rope_and_cache_write_ops``, the oracle."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from conform_mlx.impl.kernels.backend import (
    Backend,
    active_backend,
    kernel_source,
    make_kernel,
    on_first_use,
)

SOURCE = kernel_source("rope")  # kernels/rope.inc

HEAD_DIMS = (64, 128)  # D / 2 threads per group: whole warps
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
INPUTS = ["qkv", "cosines", "sines"]
OUTPUTS = ["q_rot", "kv_out"]
MAX_TOKENS = 65535  # one group per token along the grid's z, which CUDA caps here

_BODY = SOURCE["body"]


def build_kernel(backend: Backend) -> object:
    """The kernel object for ``backend`` (construction compiles nothing)."""
    return make_kernel(backend, "rope_qkv", INPUTS, OUTPUTS, _BODY)


BACKEND: Backend = active_backend()
_kernel = on_first_use(build_kernel, "rope_qkv")


def head_counts(qkv: mx.array, n_kv: int, head_dim: int) -> tuple[int, int]:
    """(n_heads, n_kv_heads) of q | k | v rows ``qkv``, or ValueError if they are not."""
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
    """The kernel: (q_rot (B, T, n_heads, D), kv (B * T, 2, n_kv, D)), ``tokens`` (B, T)."""
    if not supports(qkv, head_dim):
        raise ValueError(f"unsupported qkv {qkv.shape} {qkv.dtype}, head_dim {head_dim}")
    n_q, _ = head_counts(qkv, n_kv, head_dim)
    q_rot, kv = _kernel()(
        inputs=[qkv, cos, sin],
        # kv in the scatter's shape: a reshape would be one more graph node a layer
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


def rope_cos_sin(
    positions: mx.array, inv_freq: mx.array, scale: float = 1.0
) -> tuple[mx.array, mx.array]:
    """cos and sin of ``positions * inv_freq``, times ``scale`` (YaRN's attention factor),
    float32 (B, T, D/2); the one place angles are made, so a fault injected here reaches
    kernel and twin alike."""
    # Broadcast before the cast: a 4-byte array stays in host memory (paged_cache.step_fields).
    wide = mx.broadcast_to(positions[:, :, None], (*positions.shape, inv_freq.shape[0]))
    angles = wide.astype(mx.float32) * inv_freq  # (B, T, D/2)
    if scale == 1.0:
        return mx.cos(angles), mx.sin(angles)
    return mx.cos(angles) * scale, mx.sin(angles) * scale


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


@dataclass(frozen=True)
class RopeStep:
    """What RoPE and the cache write need of a step's new tokens, built once a step."""

    cos: mx.array  # float32 (B, T, D/2): rope_cos_sin of the tokens' positions
    sin: mx.array
    blocks: mx.array  # (B * T,) int32: each new token's pool row is (block, offset)
    offsets: mx.array  # (B * T,) int32
    block_size: int


def rope_step(
    positions: mx.array,
    inv_freq: mx.array,
    blocks: mx.array,
    offsets: mx.array,
    block_size: int,
    scale: float = 1.0,
) -> RopeStep:
    """positions (B, T) int32; inv_freq (D/2,); blocks, offsets (B * T,) from the plan;
    ``scale`` as for ``rope_cos_sin``."""
    cos, sin = rope_cos_sin(positions, inv_freq, scale)
    return RopeStep(cos, sin, blocks, offsets, block_size)


def rope_and_cache_write(
    qkv: mx.array, tokens: tuple[int, int], step: RopeStep, kv_pool: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """Rotate q and k, write k and v; return q_rot (B, T, n_heads, D), kv (B * T, 2, n_kv,
    D) and kv_pool, updated as ``pool[idx] = rows`` updates it. ``tokens`` is (B, T)."""
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
    """(n_kv_heads, head_dim) of a (num_blocks, block_size, 2, n_kv, D) pool, or ValueError."""
    if kv_pool.ndim != 5 or kv_pool.shape[2] != 2:
        raise ValueError(
            f"kv pool {kv_pool.shape} is not (num_blocks, block_size, 2, n_kv_heads, head_dim)"
        )
    return kv_pool.shape[3], kv_pool.shape[4]


def as_words(x: mx.array) -> mx.array:
    """``x``'s buffer with its last axis read as 4-byte words (2 where its rows' bytes ask;
    MLX's CUDA scatter takes no 8-byte ints). MLX's gather and scatter run a thread an
    element, so pool rows move as words (docs/kernel-notes.md#moving-pool-rows)."""
    row_bytes = x.shape[-1] * x.itemsize
    for word in (mx.uint32, mx.uint16):
        if row_bytes % word.size == 0 and word.size >= x.itemsize:
            return x.view(word)
    return x


def write_rows(pool: mx.array, rows: mx.array, step: RopeStep) -> mx.array:
    """Write ``rows`` (B * T, 2, n_kv_heads, D) into ``pool`` at the step's slots, as words;
    returns the new pool. Indexing by (block, offset), not through a reshaped view, lets
    MLX reuse the buffer."""
    if pool.shape[1] != step.block_size:
        raise ValueError(f"pool blocks of {pool.shape[1]} rows, step for {step.block_size}")
    words = as_words(pool)
    words[step.blocks, step.offsets] = as_words(rows.astype(pool.dtype))
    return words.view(pool.dtype)
