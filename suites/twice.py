"""Run-to-run determinism of the custom kernels: each GPU grid case runs its kernel twice
on the same inputs and needs every output bitwise the same. A race, or a read of memory
nobody wrote, shows up as a difference between the two runs (issue 30)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

_UINT = {2: mx.uint16, 4: mx.uint32, 8: mx.uint64}
T = TypeVar("T")


def bits(a: mx.array) -> np.ndarray:
    """The raw bits of ``a`` (a NaN equals the same NaN; -0.0 differs from 0.0)."""
    return np.array(a.view(_UINT[a.dtype.size]) if a.dtype.size in _UINT else a)


def twice(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)``, run and evaluated twice; AssertionError naming the first
    output that differs bitwise between the runs. Returns the first run's outputs."""
    first = fn(*args, **kwargs)
    mx.eval(first)
    second = fn(*args, **kwargs)
    mx.eval(second)
    pairs = zip(tree_flatten(first), tree_flatten(second), strict=True)
    for i, ((_, a), (_, b)) in enumerate(pairs):
        differ = int((bits(a) != bits(b)).sum())
        if differ:
            name = getattr(fn, "__name__", repr(fn))
            raise AssertionError(
                f"{name}: output {i} differs in {differ} of {a.size} elements between two "
                "runs on the same inputs"
            )
    return first
