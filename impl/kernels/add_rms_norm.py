"""Residual add fused with RMSNorm: ``h = x + residual``, ``normed = RMSNorm(h)``.

``add_rms_norm`` dispatches: where ``USE_KERNEL`` (off: measured slower than the
two MLX kernels it would replace, see there) on a GPU backend (CUDA or Metal), the
custom kernel (``add_rms_norm_kernel``) reads x and the residual once and writes
both results in one launch; otherwise, or for inputs the kernel does not take, the
ops twin (``add_rms_norm_ops``) runs. The twin is also the kernel's oracle, and the
kernel keeps its grid (suites/test_fused_kernels.py) and its place in the kernel
bench, so a faster MLX or kernel shows up there.

Ops twin: an element-wise add in the activation dtype, then MLX's RMSNorm, which
follows HF: the mean of squares in float32, ``h * rsqrt(mean + eps)`` rounded to
the activation dtype, then multiplied by the weight.

Kernel: one thread group per row, one body for CUDA (``mx.fast.cuda_kernel``) and
Metal (``mx.fast.metal_kernel``); ``impl.kernels.backend`` supplies the per-backend lines.
Shapes: x, residual (..., hidden) in one dtype T; weight (hidden,) in T; returns
(h, normed), both shaped like x. Each thread holds a few elements of the row in
registers (strided by the group size, so loads coalesce): it loads them and their
weights at once, forms ``h = x + residual`` rounded to T, writes it and adds ``h * h``
to a float32 sum. The sums meet through a warp reduction and shared memory; then each
thread writes ``weight * round_T(h * rsqrt(mean + eps))`` from its registers, which
is MLX's and HF's order of rounding.

Whether the kernel beats the two MLX kernels it replaces (add, then rms_norm) is
measured by ``tools/gpu_kernels_check.py`` at 1 and 32 rows and more.
"""

from __future__ import annotations

import mlx.core as mx

from conform_mlx.impl.kernels.backend import (
    WARP,
    Backend,
    active_backend,
    float_bits,
    kernel_source,
    make_kernel,
)

SOURCE = kernel_source("add_rms_norm")  # kernels/add_rms_norm.inc

DTYPES = (mx.float16, mx.bfloat16, mx.float32)
INPUTS = ["x", "residual", "weight"]
MAX_ROWS = 65535  # one group per row along the grid's z, which CUDA caps here
PER_THREAD = 8  # elements of a row per thread, when the row is wide enough
MAX_WARPS = 32  # 1024 threads, the most a CUDA thread group holds
MAX_PER_THREAD = 32  # registers per thread stay bounded: hidden <= 32768

# Template constants: T (dtype), N_WARPS, PER (elements per thread), EPS_BITS
# (``float_bits``). Each thread owns
# elements tid + i * threads of its row. All its loads are issued before any store:
# MLX's kernel arguments are not ``restrict``, so a store to h between two loads
# would make the compiler wait for each load in turn (the first version of this
# kernel did that and was slower than MLX's add and rms_norm together).
_BODY = SOURCE["body"]


def build_kernel(backend: Backend) -> object:
    """The kernel object for ``backend`` (construction compiles nothing)."""
    return make_kernel(backend, "add_rms_norm", INPUTS, ["h", "normed"], _BODY)


# Whether the dispatcher runs the kernel on a GPU. Measured on H200s
# (tools/gpu_kernels_check.py, hidden 2048, float16; results/gpu/kernel-bench.txt):
# inside a compiled chain of calls the kernel took 0.012-0.019 ms a call at 1 to 32
# rows against 0.010-0.015 ms for MLX's add then rms_norm in three runs, although
# its GPU time was lower (ncu: 4.5 us against 2.3 + 3.2 us): MLX encodes a custom
# kernel more slowly than its own two. With eps a template constant instead of an
# input array, a whole batch-1 decode step with the kernel still took 1.05 / 1.06 /
# 1.04 of the time without it at contexts 16 / 512 / 2048 (median step times,
# results/gpu/consts-ab.txt). So
# the ops run; Metal is unmeasured and runs them too.
USE_KERNEL = False

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
        and shape_of_group(x.shape[-1])[1] <= MAX_PER_THREAD
    )


def call_args(x: mx.array, eps: float) -> dict:
    """Template, grid and thread group of one launch (also used by the Metal check);
    eps is a template constant (``impl.kernels.backend.float_bits``)."""
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
    """(warps per group, elements per thread) for rows of ``hidden``: about
    ``PER_THREAD`` elements a thread, in as many warps as that takes (at most
    ``MAX_WARPS``), so one template serves every row count of a model."""
    n_warps = min(MAX_WARPS, max(1, -(-hidden // (PER_THREAD * WARP))))
    return n_warps, -(-hidden // (n_warps * WARP))


def add_rms_norm_kernel(
    x: mx.array, residual: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """The custom kernel: (x + residual, RMSNorm(x + residual) * weight) in one launch."""
    if _KERNEL is None:
        raise RuntimeError("add_rms_norm_kernel needs a GPU backend (Metal or CUDA)")
    if not supports(x, residual, weight):
        raise ValueError(f"unsupported x {x.shape} {x.dtype} / weight {weight.shape}")
    h, normed = _KERNEL(
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
    if USE_KERNEL and BACKEND != "cpu" and supports(x, residual, weight):
        return add_rms_norm_kernel(x, residual, weight, eps)
    return add_rms_norm_ops(x, residual, weight, eps)


def add_rms_norm_ops(
    x: mx.array, residual: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """The ops twin of ``add_rms_norm``."""
    h = x + residual
    return h, mx.fast.rms_norm(h, weight, eps)
