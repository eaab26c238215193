"""Tolerances for the suites, one table keyed by dtype. Reasons live beside the
numbers in ``conform_mlx.metrics`` so the CLI and the suites judge by the same table."""

from conform_mlx.metrics import NMSE_LIMIT

# Two MLX float32 paths computing the same logits (batched vs single decode, chunked
# vs whole prefill): same kernels, different shapes, so only reduction order and
# tiling differ. Observed differences are ~1e-6 on logits of scale ~1-10.
FP32_SAME_ENGINE_ATOL = 1e-4

__all__ = ["NMSE_LIMIT", "FP32_SAME_ENGINE_ATOL"]

# Paged decode attention (suites/test_kernels.py): output vs a float64 reference fed
# the same dtype-rounded q/K/V; |output| <= ~4 for N(0, 1) inputs. Measured
# 2026-11-27 on the whole grid, worst atol needed at the rtol below:
#            ops twin (MLX CPU sdpa)   output rounding alone (the kernel's floor)
#  float32   9.5e-7                    0
#  float16   1.4e-3                    3e-8
#  bfloat16  1.1e-2                    0
# The ops twin rounds scores and probabilities to the input dtype; the kernel keeps
# them in float32 and rounds once, at the output, so it sits at the right column.
#  float32: rtol is PyTorch's/vLLM's 1.3e-6; atol 5e-6 is 5x the twin's worst and
#           still 100x under one token dropped from a 2048-token context (~5e-4),
#           so float32 cases catch off-by-one-token bugs the half types cannot.
#  float16: rtol 1e-3 (vLLM) covers half an ulp of the output; atol 4e-3, ~3x the
#           twin's worst.
#  bfloat16: rtol 1.6e-2 (vLLM); atol 3e-2, ~3x the twin's worst.
KERNEL_ATOL = {"float32": 5e-6, "float16": 4e-3, "bfloat16": 3e-2}
KERNEL_RTOL = {"float32": 1.3e-6, "float16": 1e-3, "bfloat16": 1.6e-2}
__all__ += ["KERNEL_ATOL", "KERNEL_RTOL"]

# One row through a projection (impl.kernels.norm_linear, suites/test_fused_kernels.py):
# the kernel against its ops twin (MLX's add, rms_norm and matmul) on the same inputs,
# outputs of scale ~1. Both sum in float32, in other orders, then round to the dtype
# the same way, so a column may land one or two units in the last place apart (gated:
# gate and up each rounded, then their product).
#  float32: no rounding to hide the order: ~sqrt(K) * 6e-8 for K <= 5632 terms,
#           ~5e-6; atol and rtol 1e-5.
#  float16: two units in the last place at |y| < 4 (9.8e-4 each at 1..2): rtol 2e-3,
#           and KERNEL_ATOL's 4e-3.
#  bfloat16: as KERNEL_*: 1.6e-2 is two units in the last place.
ROW_ATOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
ROW_RTOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
__all__ += ["ROW_ATOL", "ROW_RTOL"]
