"""Fused RoPE + paged cache write: rotate the new Q and K, write K and V into their
pool rows, in one launch.

Custom-kernel twin of ``kernels.rope_cache_write.rope_and_cache_write_ops``. One
kernel body for CUDA (``mx.fast.cuda_kernel``) and Metal (``mx.fast.metal_kernel``);
``kernels.backend`` supplies the per-backend lines.

Shapes (N = B * T new tokens):
  q             (B, T, n_heads, D); k, v (B, T, n_kv_heads, D); one dtype T
  cos, sin      float32 (B, T, D/2): ``rope_cos_sin`` of the tokens' positions
  k_pool/v_pool (num_blocks, block_size, n_kv_heads, D) in T
  slots         (N,) int32: pool row (block * block_size + offset) of each token
  returns       (q_rot (B, T, n_heads, D), k_pool, v_pool)

One thread per rotation pair: thread i of group (head, token) owns elements i and
i + D/2. Groups with head < n_heads rotate Q into the output; the next n_kv_heads
groups rotate K and copy V into row ``slots[token]`` of the pools. The arithmetic
follows the twin step by step: cos and sin rounded to T, each product and the sum
rounded to T, so half-precision results match the twin's bit for bit.

The pools are written in place. MLX custom kernels have no in-place outputs, and
returning fresh pools would copy the whole cache every layer and step, so the
kernel writes through its (const) pool inputs and the wrapper returns the same
buffers behind ``mx.depends`` on Q's output: whatever reads the returned pools
(attention) runs after the write. This is sound because the cache owns its pools
(nothing else shares their buffers) and they are always row-contiguous (MLX would
otherwise hand the kernel a copy). Callers treat the pools passed in as consumed.
"""

from __future__ import annotations

import mlx.core as mx

from kernels.backend import Backend, active_backend, header, prologue

HEAD_DIMS = (64, 128)  # D / 2 threads per group: whole warps
DTYPES = (mx.float16, mx.bfloat16, mx.float32)

INPUTS = ["q", "k", "v", "cosines", "sines", "slots", "k_pool", "v_pool"]
MAX_TOKENS = 65535  # one group per token along the grid's z, which CUDA caps here

# Template constants: T (dtype), HEAD_DIM.
_BODY = """
  constexpr int HALF = HEAD_DIM / 2;
  const int n_tok = slots_shape[0];
  const int n_q = q_shape[2];
  const int n_kv = k_shape[2];
  const int i = tid;
  const int h = group_y;
  const int n = group_z;
  if (i >= HALF || h >= n_q + n_kv || n >= n_tok) return;
  // The twin rounds cos/sin to T and every product and sum to T; so does this.
  const float c = kload(kstore<T>(cosines[n * HALF + i]));
  const float s = kload(kstore<T>(sines[n * HALF + i]));
  if (h < n_q) {
    const size_t at = (static_cast<size_t>(n) * n_q + h) * HEAD_DIM + i;
    const float x = kload(q[at]);
    const float y = kload(q[at + HALF]);
    const float xc = kload(kstore<T>(x * c));
    const float ys = kload(kstore<T>(-y * s));
    const float yc = kload(kstore<T>(y * c));
    const float xs = kload(kstore<T>(x * s));
    q_rot[at] = kstore<T>(xc + ys);
    q_rot[at + HALF] = kstore<T>(yc + xs);
  } else {
    const int kvh = h - n_q;
    const size_t src = (static_cast<size_t>(n) * n_kv + kvh) * HEAD_DIM + i;
    const size_t dst = (static_cast<size_t>(slots[n]) * n_kv + kvh) * HEAD_DIM + i;
    const float x = kload(k[src]);
    const float y = kload(k[src + HALF]);
    const float xc = kload(kstore<T>(x * c));
    const float ys = kload(kstore<T>(-y * s));
    const float yc = kload(kstore<T>(y * c));
    const float xs = kload(kstore<T>(x * s));
    KDEVICE T* kp = const_cast<KDEVICE T*>(k_pool);
    KDEVICE T* vp = const_cast<KDEVICE T*>(v_pool);
    kp[dst] = kstore<T>(xc + ys);
    kp[dst + HALF] = kstore<T>(yc + xs);
    vp[dst] = v[src];
    vp[dst + HALF] = v[src + HALF];
  }
"""


def source(backend: Backend) -> str:
    return prologue(backend) + _BODY


def build_kernel(backend: Backend) -> object:
    """The kernel object for ``backend`` (construction compiles nothing)."""
    make = {"cuda": mx.fast.cuda_kernel, "metal": mx.fast.metal_kernel}[backend]
    return make(
        name="rope_cache_write",
        input_names=INPUTS,
        output_names=["q_rot"],
        source=source(backend),
        header=header(backend),
    )


BACKEND: Backend = active_backend()
_KERNEL = build_kernel(BACKEND) if BACKEND != "cpu" else None


def supports(q: mx.array, k: mx.array, v: mx.array, k_pool: mx.array, v_pool: mx.array) -> bool:
    """Whether the kernel takes these shapes and dtypes (the dispatcher falls back if not)."""
    head_dim = q.shape[-1]
    return (
        head_dim in HEAD_DIMS
        and q.dtype in DTYPES
        and k.dtype == v.dtype == k_pool.dtype == v_pool.dtype == q.dtype
        and k_pool.shape[2:] == v_pool.shape[2:] == k.shape[2:] == v.shape[2:]
        and q.shape[0] * q.shape[1] <= MAX_TOKENS
    )


def call_args(q: mx.array, k: mx.array) -> dict:
    """Template, grid and thread group of one launch (also used by the Metal check)."""
    batch, t, n_q, head_dim = q.shape
    return {
        "template": [("T", q.dtype), ("HEAD_DIM", head_dim)],
        "grid": (head_dim // 2, n_q + k.shape[2], batch * t),  # in threads
        "threadgroup": (head_dim // 2, 1, 1),
    }


def rope_cache_write(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    cos: mx.array,
    sin: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    slots: mx.array,
) -> tuple[mx.array, mx.array, mx.array]:
    """Rotate q and k, write k and v into the pools in place; see the module doc."""
    if _KERNEL is None:
        raise RuntimeError("rope_cache_write needs a GPU backend (Metal or CUDA)")
    if not supports(q, k, v, k_pool, v_pool):
        raise ValueError(f"unsupported q {q.shape} {q.dtype} / pool {k_pool.shape} {k_pool.dtype}")
    (q_rot,) = _KERNEL(
        inputs=[q, k, v, cos, sin, slots.astype(mx.int32), k_pool, v_pool],
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
        **call_args(q, k),
    )
    k_pool, v_pool = mx.depends([k_pool, v_pool], [q_rot])
    return q_rot, k_pool, v_pool
