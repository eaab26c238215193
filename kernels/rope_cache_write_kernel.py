"""Fused RoPE for the new Q and K: both rotated in one launch, feeding the paged cache write.

Custom-kernel twin of the rotation in ``kernels.rope_cache_write.rope_and_cache_write_ops``;
the K/V rows then go into the pools through MLX's scatter (``write_rows``), which
MLX performs in place when the pool's buffer can be donated, as the cache's can.
One kernel body for CUDA (``mx.fast.cuda_kernel``) and Metal (``mx.fast.metal_kernel``);
``kernels.backend`` supplies the per-backend lines.

Shapes:
  q             (B, T, n_heads, D); k (B, T, n_kv_heads, D); one dtype T
  cos, sin      float32 (B, T, D/2): ``rope_cos_sin`` of the tokens' positions
  returns       (q_rot, k_rot), shaped and typed like q and k

One thread per rotation pair: thread i of group (head, token) owns elements i and
i + D/2; heads below n_heads are Q's, the next n_kv_heads are K's. The arithmetic
follows the twin step by step: cos and sin rounded to T, each product and the sum
rounded to T, so half-precision results match the twin's bit for bit.

Why the write is not in this kernel: MLX custom kernels have no in-place outputs.
A first version wrote the pools through its (const) inputs and ordered readers
with ``mx.depends``; MLX's CUDA backend schedules by the buffers each kernel
declares it writes, so it ran a reader of the pool (the prefill gather)
concurrently with the write, and the suites failed on the H100 (layer 0 attention
off from position 0). Returning fresh pools instead would copy the whole cache
every layer and step.
"""

from __future__ import annotations

import mlx.core as mx

from kernels.backend import Backend, active_backend, make_kernel

HEAD_DIMS = (64, 128)  # D / 2 threads per group: whole warps
DTYPES = (mx.float16, mx.bfloat16, mx.float32)

INPUTS = ["q", "k", "cosines", "sines"]
MAX_TOKENS = 65535  # one group per token along the grid's z, which CUDA caps here

# Template constants: T (dtype), HEAD_DIM.
_BODY = """
  constexpr int HALF = HEAD_DIM / 2;
  const int n_tok = q_shape[0] * q_shape[1];
  const int n_q = q_shape[2];
  const int n_kv = k_shape[2];
  const int i = tid;
  const int h = group_y;
  const int n = group_z;
  if (i >= HALF || h >= n_q + n_kv || n >= n_tok) return;
  // The twin rounds cos/sin to T and every product and sum to T; so does this.
  const float c = kload(kstore<T>(cosines[n * HALF + i]));
  const float s = kload(kstore<T>(sines[n * HALF + i]));
  const bool is_q = h < n_q;
  const int heads = is_q ? n_q : n_kv;
  const size_t at = (static_cast<size_t>(n) * heads + (is_q ? h : h - n_q)) * HEAD_DIM + i;
  const float x = kload(is_q ? q[at] : k[at]);
  const float y = kload(is_q ? q[at + HALF] : k[at + HALF]);
  const T first = kstore<T>(kload(kstore<T>(x * c)) + kload(kstore<T>(-y * s)));
  const T second = kstore<T>(kload(kstore<T>(y * c)) + kload(kstore<T>(x * s)));
  if (is_q) {
    q_rot[at] = first;
    q_rot[at + HALF] = second;
  } else {
    k_rot[at] = first;
    k_rot[at + HALF] = second;
  }
"""


def build_kernel(backend: Backend) -> object:
    """The kernel object for ``backend`` (construction compiles nothing)."""
    return make_kernel(backend, "rope_qk", INPUTS, ["q_rot", "k_rot"], _BODY)


BACKEND: Backend = active_backend()
_KERNEL = build_kernel(BACKEND) if BACKEND != "cpu" else None


def supports(q: mx.array, k: mx.array) -> bool:
    """Whether the kernel takes these shapes and dtypes (the dispatcher falls back if not)."""
    return (
        q.shape[-1] in HEAD_DIMS
        and q.dtype in DTYPES
        and k.dtype == q.dtype
        and k.shape[:2] == q.shape[:2]
        and k.shape[-1] == q.shape[-1]
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


def rope_qk(q: mx.array, k: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, mx.array]:
    """(q_rot, k_rot): q and k rotated at the angles of ``cos``/``sin``; see the module doc."""
    if _KERNEL is None:
        raise RuntimeError("rope_qk needs a GPU backend (Metal or CUDA)")
    if not supports(q, k):
        raise ValueError(f"unsupported q {q.shape} {q.dtype} / k {k.shape} {k.dtype}")
    q_rot, k_rot = _KERNEL(
        inputs=[q, k, cos, sin],
        output_shapes=[q.shape, k.shape],
        output_dtypes=[q.dtype, k.dtype],
        **call_args(q, k),
    )
    return q_rot, k_rot
