"""The seam between the model and its attention/cache kernels.

One module per operation: ``add_rms_norm``, ``norm_linear`` (a decode row's
projections, the add and RMSNorm before them fused in), ``rope`` (RoPE of Q and K,
then the paged cache write) and ``paged_attention`` (whose decode kernel's CUDA/Metal source
is in ``paged_decode_source``, and which hands small chunks over a cache to
``paged_prefill``). Each holds the custom kernel, built once at import, and an
MLX-ops twin (the CPU path, and the oracle the kernel is checked against). A kernel
is dispatched only where tools/gpu_kernels_check.py measured it faster than what it
replaces.
The model calls only the names exported here, so a Metal or CUDA kernel can replace
an op without touching ``impl/``.

The exported functions ``add_rms_norm`` and ``paged_attention`` shadow their modules
as attributes of this package (``import impl.kernels.paged_attention as m`` gives the
function): reach a module's other names with ``from impl.kernels.paged_attention import ...``.
"""

from conform_mlx.impl.kernels.add_rms_norm import add_rms_norm
from conform_mlx.impl.kernels.norm_linear import (
    linear_row,
    linear_row_applies,
    norm_linear,
    norm_linear_applies,
)
from conform_mlx.impl.kernels.paged_attention import ContextRows, context_rows, paged_attention
from conform_mlx.impl.kernels.rope import RopeStep, rope_and_cache_write, rope_step

__all__ = [
    "ContextRows",
    "RopeStep",
    "add_rms_norm",
    "context_rows",
    "linear_row",
    "linear_row_applies",
    "norm_linear",
    "norm_linear_applies",
    "paged_attention",
    "rope_and_cache_write",
    "rope_step",
]
