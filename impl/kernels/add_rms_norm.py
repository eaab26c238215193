"""Residual add fused with RMSNorm: ``h = x + residual``, ``normed = RMSNorm(h) * weight``. The
kernel runs where the policy's ``fused_norm`` is on (off by default, measured slower:
docs/kernel-notes.md#add-and-rmsnorm), else the ops twin ``add_rms_norm_ops``, its oracle."""

from __future__ import annotations

import mlx.core as mx

from conform_mlx.impl.kernels.backend import (
    WARP,
    Backend,
    active_backend,
    float_bits,
    kernel_source,
    make_kernel,
    on_first_use,
)
from conform_mlx.impl.kernels.policy import current_policy

SOURCE = kernel_source("add_rms_norm")  # kernels/add_rms_norm.inc

DTYPES = (mx.float16, mx.bfloat16, mx.float32)
INPUTS = ["x", "residual", "weight"]
MAX_ROWS = 65535  # one group per row along the grid's z, which CUDA caps here
PER_THREAD = 8  # elements of a row per thread, when the row is wide enough
MAX_WARPS = 32  # 1024 threads, the most a CUDA thread group holds
MAX_PER_THREAD = 32  # registers per thread stay bounded: hidden <= 32768

_BODY = SOURCE["body"]


def build_kernel(backend: Backend) -> object:
    """The kernel object for ``backend`` (construction compiles nothing)."""
    return make_kernel(backend, "add_rms_norm", INPUTS, ["h", "normed"], _BODY)


BACKEND: Backend = active_backend()
_kernel = on_first_use(build_kernel, "add_rms_norm_kernel")


def supports(x: mx.array, residual: mx.array, weight: mx.array) -> bool:
    """Whether the kernel takes these inputs (the dispatcher falls back if not)."""
    return (
        x.dtype in DTYPES
        and residual.dtype == weight.dtype == x.dtype
        and residual.shape == x.shape
        and weight.shape == (x.shape[-1],)
        and x.size // x.shape[-1] <= MAX_ROWS
        and shape_of_group(x.shape[-1])[1] <= MAX_PER_THREAD
    )


def call_args(x: mx.array, eps: float) -> dict:
    """Template, grid and thread group of one launch (also used by the Metal check)."""
    rows = x.size // x.shape[-1]
    n_warps, per = shape_of_group(x.shape[-1])
    return {
        "template": [
            ("T", x.dtype),
            ("N_WARPS", n_warps),
            ("PER", per),
            ("EPS_BITS", float_bits(eps)),
        ],
        "grid": (n_warps * WARP, 1, rows),  # in threads: one group per row
        "threadgroup": (n_warps * WARP, 1, 1),
    }


def shape_of_group(hidden: int) -> tuple[int, int]:
    """(warps per group, elements per thread) for rows of ``hidden``; any row count."""
    n_warps = min(MAX_WARPS, max(1, -(-hidden // (PER_THREAD * WARP))))
    return n_warps, -(-hidden // (n_warps * WARP))


def add_rms_norm_kernel(
    x: mx.array, residual: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """The custom kernel: (x + residual, RMSNorm(x + residual) * weight) in one launch."""
    if not supports(x, residual, weight):
        raise ValueError(f"unsupported x {x.shape} {x.dtype} / weight {weight.shape}")
    h, normed = _kernel()(
        inputs=[x, residual, weight],
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, x.dtype],
        **call_args(x, eps),
    )
    return h, normed


def add_rms_norm(
    x: mx.array, residual: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """x, residual: (..., hidden); weight: (hidden,). Returns (x + residual, RMSNorm of it)."""
    if current_policy().fused_norm and BACKEND != "cpu" and supports(x, residual, weight):
        return add_rms_norm_kernel(x, residual, weight, eps)
    return add_rms_norm_ops(x, residual, weight, eps)


def add_rms_norm_ops(
    x: mx.array, residual: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """The ops twin of ``add_rms_norm``."""
    h = x + residual
    return h, mx.fast.rms_norm(h, weight, eps)
