"""One row x (1, hidden) times W (n, hidden): ``linear_row`` is ``x @ W.T``; ``norm_linear``
is ``RMSNorm(x + residual) @ W.T`` (``gated``: W = [gate; up], then ``silu(gate) * up``) in
one launch. ``*_ops`` are the twins; a column may differ from MLX's gemv in its last bit."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

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

SOURCE = kernel_source("norm_linear")  # kernels/norm_linear.inc

DTYPES = (mx.float16, mx.bfloat16, mx.float32)
N_WARPS = 8  # warps (output columns at a time) per thread group
LANE_ELEMS = 8  # elements of a weight row one lane loads at once: 16 bytes in half
CHUNK = LANE_ELEMS * WARP  # elements of a row one warp covers per load
UNROLL = 8  # chunks loaded before the first is used; measured: docs/kernel-notes.md#norm-and-linear
MAX_GROUPS = 1024  # above this many groups a warp takes more than one column
SHARED_BYTES = 32 * 1024  # Metal's thread-group memory, the smaller of the two

# The preamble's loads overlap the row's setup (load, or add and normalize).
_LOAD = SOURCE["load"]
_PREAMBLE = SOURCE["preamble"] + _LOAD
_COLUMNS = SOURCE["columns_head"] + _LOAD + SOURCE["columns_tail"]
_NORM_BODY = _PREAMBLE + SOURCE["norm"] + _COLUMNS

_PLAIN_BODY = SOURCE["plain_gated"] + _PREAMBLE + SOURCE["plain_row"] + _COLUMNS


def build_kernels(backend: Backend) -> tuple[object, object]:
    """(fused, plain) kernel objects for ``backend`` (construction compiles nothing)."""
    fused = make_kernel(
        backend, "norm_linear", ["x", "residual", "norm_weight", "w"], ["h", "y"], _NORM_BODY
    )
    plain = make_kernel(backend, "linear_row", ["x", "w"], ["y"], _PLAIN_BODY)
    return fused, plain


BACKEND: Backend = active_backend()
_kernels = on_first_use(build_kernels, "the norm/linear kernels")


def shared_bytes(hidden: int, dtype: mx.Dtype) -> int:
    """Thread-group memory of one group: the row in T, and the norm's partial sums."""
    return hidden * dtype.size + 4 * N_WARPS


def supports(x: mx.array, weight: mx.array, gated: bool = False) -> bool:
    """Whether the kernels take these inputs; x and the weight must start 16-byte aligned, as
    MLX's arrays do (a view into a row may not)."""
    if x.ndim != 2 or weight.ndim != 2 or x.dtype not in DTYPES or weight.dtype != x.dtype:
        return False
    rows, hidden = x.shape
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    return (
        rows == 1
        and weight.shape[1] == hidden
        and hidden % LANE_ELEMS == 0
        and shared_bytes(hidden, x.dtype) <= SHARED_BYTES
        and n_out >= 1
        and (not gated or weight.shape[0] % 2 == 0)
    )


def groups(n_out: int) -> tuple[int, int]:
    """(thread groups, output columns per warp): a column a warp up to ``MAX_GROUPS`` groups."""
    per_warp = max(1, -(-n_out // (N_WARPS * MAX_GROUPS)))
    return -(-n_out // (N_WARPS * per_warp)), per_warp


def call_args(
    x: mx.array, n_out: int, eps: float | None = None, residual: bool = False, gated: bool = False
) -> dict:
    """Template, grid and thread group of a launch (the fused kernel's when ``eps`` is given)."""
    n_groups, per_warp = groups(n_out)
    template = [
        ("T", x.dtype),
        ("KDIM", x.shape[-1]),
        ("N_OUT", n_out),
        ("ROWS", per_warp),
        ("N_WARPS", N_WARPS),
        ("UNROLL", UNROLL),
    ]
    if eps is not None:
        template += [("HAS_RES", residual), ("GATED", gated), ("EPS_BITS", float_bits(eps))]
    return {
        "template": template,
        "grid": (N_WARPS * WARP, 1, n_groups),  # in threads: groups along z
        "threadgroup": (N_WARPS * WARP, 1, 1),
    }


def norm_linear_applies(x: mx.array, weight: mx.array, gated: bool = False) -> bool:
    """Whether the model should run ``norm_linear`` here rather than add, rms_norm, matmul."""
    return current_policy().norm_linear and supports(x, weight, gated)


def linear_row_applies(x: mx.array, weight: mx.array) -> bool:
    """Whether the model should run ``linear_row`` here rather than MLX's matmul."""
    return current_policy().linear_row and supports(x, weight)


def norm_linear(
    x: mx.array,
    residual: mx.array | None,
    norm_weight: mx.array,
    eps: float,
    weight: mx.array,
    gated: bool = False,
) -> tuple[mx.array, mx.array]:
    """The fused kernel: (h = x + residual, y (1, n), or (1, n / 2) ``gated``); residual
    None adds nothing; norm_weight (hidden,)."""
    fused, _ = _kernels()
    if not supports(x, weight, gated) or norm_weight.shape != (x.shape[1],):
        raise ValueError(f"unsupported x {x.shape} {x.dtype} / weight {weight.shape}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {residual.shape} {residual.dtype} does not match x")
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    h, y = fused(
        inputs=[x, x if residual is None else residual, norm_weight.astype(x.dtype), weight],
        output_shapes=[x.shape, (1, n_out)],
        output_dtypes=[x.dtype, x.dtype],
        **call_args(x, n_out, eps, residual is not None, gated),
    )
    return (x if residual is None else h), y


def linear_row(x: mx.array, weight: mx.array) -> mx.array:
    """The plain kernel: ``x @ weight.T`` for x (1, hidden), weight (n, hidden)."""
    _, plain = _kernels()
    if not supports(x, weight):
        raise ValueError(f"unsupported x {x.shape} {x.dtype} / weight {weight.shape}")
    (y,) = plain(
        inputs=[x, weight],
        output_shapes=[(1, weight.shape[0])],
        output_dtypes=[x.dtype],
        **call_args(x, weight.shape[0]),
    )
    return y


def silu_mul(gate_up: mx.array) -> mx.array:
    """``silu(gate) * up`` of a fused gate/up projection's output, (rows, 2f) -> (rows, f).
    One Split; one row as a (2, f) view, not strided (docs/kernel-notes.md#model)."""
    f = gate_up.shape[-1] // 2
    if gate_up.shape[0] == 1:
        gate, up = mx.split(gate_up.reshape(2, f), 2, axis=0)
    else:
        gate, up = mx.split(gate_up, 2, axis=-1)
    return nn.silu(gate) * up


def norm_linear_ops(
    x: mx.array,
    residual: mx.array | None,
    norm_weight: mx.array,
    eps: float,
    weight: mx.array,
    gated: bool = False,
) -> tuple[mx.array, mx.array]:
    """The ops twin of ``norm_linear``."""
    h = x if residual is None else x + residual
    y = linear_row_ops(mx.fast.rms_norm(h, norm_weight, eps), weight)
    return h, (silu_mul(y) if gated else y)


def linear_row_ops(x: mx.array, weight: mx.array) -> mx.array:
    """The ops twin of ``linear_row``."""
    return x @ weight.T
