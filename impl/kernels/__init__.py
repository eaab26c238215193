"""The seam between the model and its custom kernels: the model calls only these names. One
module per op: a kernel and its MLX-ops twin. ``add_rms_norm`` and ``paged_attention`` here
are functions shadowing their modules (import a module's other names from the module)."""

from conform_mlx.impl.kernels.add_rms_norm import add_rms_norm
from conform_mlx.impl.kernels.norm_linear import (
    Quantized,
    linear_row,
    linear_row_applies,
    norm_linear,
    norm_linear_applies,
    silu_mul,
)
from conform_mlx.impl.kernels.paged_attention import ContextRows, context_rows, paged_attention
from conform_mlx.impl.kernels.rope import RopeStep, rope_and_cache_write, rope_step

__all__ = [
    "ContextRows",
    "Quantized",
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
    "silu_mul",
]
