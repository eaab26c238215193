"""Residual add fused with RMSNorm: ``h = x + residual``, ``normed = RMSNorm(h)``.

``add_rms_norm`` dispatches: on a GPU backend (CUDA or Metal) the fused kernel
(``kernels.add_rms_norm_kernel``) reads x and the residual once and writes both
results in one launch; on the CPU backend, or for inputs the kernel does not take,
the ops twin below runs. The twin is also the kernel's oracle.

Ops twin: an element-wise add in the activation dtype, then MLX's RMSNorm, which
follows HF: the mean of squares in float32, ``h * rsqrt(mean + eps)`` rounded to
the activation dtype, then multiplied by the weight.
"""

from __future__ import annotations

import mlx.core as mx

from kernels import add_rms_norm_kernel as fused


def add_rms_norm(
    x: mx.array, residual: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """x, residual: (..., hidden); weight: (hidden,). Returns (x + residual, RMSNorm of it)."""
    if fused.BACKEND != "cpu" and fused.supports(x, residual, weight):
        return fused.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_ops(x, residual, weight, eps)


def add_rms_norm_ops(
    x: mx.array, residual: mx.array, weight: mx.array, eps: float
) -> tuple[mx.array, mx.array]:
    """The ops twin of ``add_rms_norm``."""
    h = x + residual
    return h, mx.fast.rms_norm(h, weight, eps)
