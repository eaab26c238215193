"""The seam between the model and its attention/cache kernels.

Each operation lives in its own module with an MLX-ops implementation (the CPU
path, and the oracle every custom kernel is checked against). The model calls
only the names exported here, so a Metal or CUDA kernel can replace an op
without touching ``impl/``.
"""

from kernels.add_rms_norm import add_rms_norm
from kernels.paged_attention import paged_attention
from kernels.rope_cache_write import rope, rope_and_cache_write

__all__ = ["add_rms_norm", "paged_attention", "rope", "rope_and_cache_write"]
