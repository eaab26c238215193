"""Logit comparison metrics and the tolerance table they are judged by.

NMSE follows llama.cpp's test-backend-ops: sum((a - b)^2) / sum(ref^2), so it is
independent of the logit scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Largest NMSE of impl logits (in the given dtype) against the float32 reference.
#  float32: same arithmetic, different summation order; mlx-lm reaches 3e-11 against
#           HF on the TinyLlama shape (FACTS.md), so 1e-10 leaves 3x headroom and
#           still catches any real bug (a wrong RoPE offset gives ~1e-2 and worse).
#  float16: 10-bit mantissa; mlx-lm measured 7e-6 on TinyLlama; 1e-4 allows for
#           deeper contexts while a single-position bug still costs > 1e-3.
#  bfloat16: 7-bit mantissa, 8x coarser than float16, so 64x the squared error.
NMSE_LIMIT = {"float32": 1e-10, "float16": 1e-4, "bfloat16": 5e-3}


@dataclass(frozen=True)
class LogitDiff:
    positions: int
    max_abs: float
    nmse: float
    top1_agreement: float  # fraction of positions whose argmax matches

    def as_dict(self) -> dict:
        return asdict(self)


def compare_logits(got: np.ndarray, ref: np.ndarray) -> LogitDiff:
    """got, ref: (positions, vocab). Raises on shape mismatch rather than broadcasting."""
    if got.shape != ref.shape:
        raise ValueError(f"logit shapes differ: got {got.shape}, reference {ref.shape}")
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    diff = got64 - ref64
    return LogitDiff(
        positions=int(ref.shape[0]),
        max_abs=float(np.abs(diff).max()),
        nmse=float((diff**2).sum() / (ref64**2).sum()),
        top1_agreement=float((got.argmax(-1) == ref.argmax(-1)).mean()),
    )
