"""Residual add fused with RMSNorm: ``h = x + residual``, ``normed = RMSNorm(h)``.

``add_rms_norm`` dispatches: on a GPU backend (CUDA or Metal) the custom kernel
(``add_rms_norm_kernel``) reads x and the residual once and writes both results in
one launch; on the CPU backend, or for inputs the kernel does not take, the ops twin
(``add_rms_norm_ops``) runs. The twin is also the kernel's oracle.

Ops twin: an element-wise add in the activation dtype, then MLX's RMSNorm, which
follows HF: the mean of squares in float32, ``h * rsqrt(mean + eps)`` rounded to
the activation dtype, then multiplied by the weight.

Kernel: one thread group per row, one body for CUDA (``mx.fast.cuda_kernel``) and
Metal (``mx.fast.metal_kernel``); ``kernels.backend`` supplies the per-backend lines.
Shapes: x, residual (..., hidden) in one dtype T; weight (hidden,) in T; returns
(h, normed), both shaped like x. Each thread walks the row with a stride of the group
size (coalesced), forms ``h = x + residual`` rounded to T, writes it and adds
``h * h`` to a float32 sum. The sums meet through a warp reduction and shared memory;
then each thread writes ``weight * round_T(h * rsqrt(mean + eps))``, which is MLX's
and HF's order of rounding, reading back the h values it wrote itself.
"""

from __future__ import annotations

import mlx.core as mx

from kernels.backend import WARP, Backend, active_backend, make_kernel

N_WARPS = 8  # 256 threads: hidden 2048 gives each thread 8 elements
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
INPUTS = ["x", "residual", "weight", "eps"]
MAX_ROWS = 65535  # one group per row along the grid's z, which CUDA caps here

# Template constants: T (dtype), N_WARPS.
_BODY = """
  KSHARED float sm_sum[N_WARPS];
  const int hidden = weight_shape[0];
  const size_t row = static_cast<size_t>(group_z) * hidden;
  float ss = 0.0f;
  for (int j = tid; j < hidden; j += N_WARPS * 32) {
    const T hv = kstore<T>(kload(x[row + j]) + kload(residual[row + j]));
    h[row + j] = hv;
    const float f = kload(hv);
    ss += f * f;
  }
  ss = kwarp_sum(ss);
  if (lane == 0) sm_sum[warp] = ss;
  ksync();
  float total = 0.0f;
  for (int w = 0; w < N_WARPS; ++w) total += sm_sum[w];
  const float inv = krsqrt(total / hidden + eps[0]);
  for (int j = tid; j < hidden; j += N_WARPS * 32) {
    const float n = kload(kstore<T>(kload(h[row + j]) * inv));
    normed[row + j] = kstore<T>(kload(weight[j]) * n);
  }
"""


def build_kernel(backend: Backend) -> object:
    """The kernel object for ``backend`` (construction compiles nothing)."""
    return make_kernel(backend, "add_rms_norm", INPUTS, ["h", "normed"], _BODY)


BACKEND: Backend = active_backend()
# Built once at import, and only for the backend that can run it.
_KERNEL = build_kernel(BACKEND) if BACKEND != "cpu" else None


def supports(x: mx.array, residual: mx.array, weight: mx.array) -> bool:
    """Whether the kernel takes these inputs (the dispatcher falls back if not)."""
    return (
        x.dtype in DTYPES
        and residual.dtype == weight.dtype == x.dtype
        and residual.shape == x.shape
        and weight.shape == (x.shape[-1],)
        and x.size // x.shape[-1] <= MAX_ROWS
    )


def call_args(x: mx.array) -> dict:
    """Template, grid and thread group of one launch (also used by the Metal check)."""
    rows = x.size // x.shape[-1]
    return {
        "template": [("T", x.dtype), ("N_WARPS", N_WARPS)],
        "grid": (N_WARPS * WARP, 1, rows),  # in threads: one group per row
        "threadgroup": (N_WARPS * WARP, 1, 1),
    }


def add_rms_norm_kernel(
    x: mx.array, residual: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """The custom kernel: (x + residual, RMSNorm(x + residual) * weight) in one launch."""
    if _KERNEL is None:
        raise RuntimeError("add_rms_norm_kernel needs a GPU backend (Metal or CUDA)")
    if not supports(x, residual, weight):
        raise ValueError(f"unsupported x {x.shape} {x.dtype} / weight {weight.shape}")
    h, normed = _KERNEL(
        # eps made per call: see paged_decode_attention on mx.compile
        inputs=[x, residual, weight, mx.array([eps], dtype=mx.float32)],
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, x.dtype],
        **call_args(x),
    )
    return h, normed


def add_rms_norm(
    x: mx.array, residual: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """x, residual: (..., hidden); weight: (hidden,). Returns (x + residual, RMSNorm of it)."""
    if BACKEND != "cpu" and supports(x, residual, weight):
        return add_rms_norm_kernel(x, residual, weight, eps)
    return add_rms_norm_ops(x, residual, weight, eps)


def add_rms_norm_ops(
    x: mx.array, residual: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """The ops twin of ``add_rms_norm``."""
    h = x + residual
    return h, mx.fast.rms_norm(h, weight, eps)
