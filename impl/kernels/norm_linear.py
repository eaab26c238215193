"""One row through a matmul, with the residual add and RMSNorm before it fused in:
``h = x + residual``, ``y = RMSNorm(h) @ W.T``; and the plain ``y = x @ W.T``.

In a batch-1 decode step every projection multiplies one row by a weight matrix, and
each of the two per layer that follow a norm (q/k/v and gate/up) is preceded by a
residual add and an RMSNorm, three launches (add, rms_norm, gemv) where one kernel
can do the lot: the row is short (hidden floats), the matrix long, and the norm is a
few microseconds of work that each thread group can repeat for itself. With
``gated`` the matrix is the fused gate/up projection ``[gate; up]`` and the kernel
also applies the MLP's activation, ``silu(gate) * up``, so that launch goes too.

``norm_linear`` and ``linear_row`` are the kernels; ``norm_linear_ops`` and
``linear_row_ops`` their ops twins and oracles. The model (``impl.model``) asks
``norm_linear_applies`` / ``linear_row_applies`` (the backend's ``USE_*`` flag and
``supports``) and otherwise runs its own ops, which compute what the twins do.

Kernel: thread groups of ``N_WARPS`` warps, one body for CUDA and Metal
(``impl.kernels.backend``). Template constants: T (dtype), KDIM (the row's length, a
multiple of 8), N_OUT (output columns), ROWS (output columns per warp), N_WARPS and
UNROLL (below), and for the fused kernel HAS_RES, GATED and EPS_BITS
(``float_bits``).
1. Each group loads the row into thread-group memory in T. The fused kernel first
   forms ``h = round_T(x + residual)``, sums ``h * h`` in float32 over the group
   (warp sums, then shared memory) and writes ``weight * round_T(h * rsqrt(mean +
   eps))`` rounded to T: MLX's ``rms_norm`` order of rounding, as in
   ``impl.kernels.add_rms_norm``. Group 0 also writes h.
2. Each warp takes ROWS output columns in turn: its lanes read the weight row 8
   elements (16 bytes in half precision) at a time, ``UNROLL`` such loads issued
   before any is used, multiply them by the row from thread-group memory and
   accumulate in float32; a warp sum gives the column, rounded to T (gated: the gate
   and up columns rounded to T, then ``silu(gate) * up`` with each op rounded to T).

The sum runs in another order than MLX's gemv, so a column can differ from it in
its last bit. What the kernels win is launches (a TinyLlama step: 292 -> 181), so
they are judged by whole decode steps against MLX's ops, interleaved with mlx-lm
(results/gpu/row-commit-ab.py), and their GPU time per launch by ncu
(tools/gpu_profile.py); ``tools/gpu_kernels_check.py`` does not time them.
"""

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
)

SOURCE = kernel_source("norm_linear")  # kernels/norm_linear.inc

DTYPES = (mx.float16, mx.bfloat16, mx.float32)
N_WARPS = 8  # warps (output columns at a time) per thread group
LANE_ELEMS = 8  # elements of a weight row one lane loads at once: 16 bytes in half
CHUNK = LANE_ELEMS * WARP  # elements of a row one warp covers per load
# chunks of a weight row a lane loads before it uses the first; gated, half as many
# of each of its two rows (8 of both ran 48.6 against 37.1 us a call, row-kernels-ab.txt)
UNROLL = 8
MAX_GROUPS = 1024  # above this many groups a warp takes more than one column
SHARED_BYTES = 32 * 1024  # Metal's thread-group memory, the smaller of the two

# The warp's loads of one batch: UNROLL chunks of its column's weight row (gated: and
# of the up row ``two_off`` elements on), 16 bytes a lane each. KDIM and UNROLL are
# constants, so the compiler unrolls the loop and issues every load before any use.
_LOAD = SOURCE["load"]

# Names every body shares, and the first batch of the warp's first column loaded at
# once, so that its trip to memory overlaps the row's setup (loading, normalizing).
_PREAMBLE = SOURCE["preamble"] + _LOAD

# Each warp's ROWS columns: the batches of loads (the first already issued), each
# multiplied by the row in thread-group memory and summed in float32, then a warp sum.
_COLUMNS = SOURCE["columns_head"] + _LOAD + SOURCE["columns_tail"]

# The fused kernel's setup: each thread loads its 8-element slices of x, the residual
# and the norm's weight at once (one trip to memory), keeps h = round_T(x + residual)
# and the weights in registers, and after the group's sum of squares writes the
# normalized slice to thread-group memory.
_NORM_BODY = _PREAMBLE + SOURCE["norm"] + _COLUMNS

_PLAIN_BODY = SOURCE["plain_gated"] + _PREAMBLE + SOURCE["plain_row"] + _COLUMNS


def build_kernels(backend: Backend) -> tuple[object, object]:
    """(fused, plain) kernel objects for ``backend`` (construction compiles nothing)."""
    fused = make_kernel(
        backend, "norm_linear", ["x", "residual", "norm_weight", "w"], ["h", "y"], _NORM_BODY
    )
    plain = make_kernel(backend, "linear_row", ["x", "w"], ["y"], _PLAIN_BODY)
    return fused, plain


# Whether the model runs each kernel, per backend. CUDA: measured in
# results/gpu/README.md; Metal is unmeasured (no Apple GPU here) and runs MLX's ops.
USE_NORM_LINEAR = {"cuda": True, "metal": False, "cpu": False}
USE_LINEAR_ROW = {"cuda": True, "metal": False, "cpu": False}

BACKEND: Backend = active_backend()
# Built once at import, and only for the backend that can run them.
_KERNELS = build_kernels(BACKEND) if BACKEND != "cpu" else None


def shared_bytes(hidden: int, dtype: mx.Dtype) -> int:
    """Thread-group memory of one group: the row in T, and the norm's partial sums."""
    return hidden * dtype.size + 4 * N_WARPS


def supports(x: mx.array, weight: mx.array, gated: bool = False) -> bool:
    """Whether the kernels take these inputs (the dispatchers fall back if not): one
    row of a float dtype, a 2-D weight of the same dtype whose rows are as long as x,
    rows a multiple of 8 long and within thread-group memory (``shared_bytes``), and
    for ``gated`` an even number of weight rows ([gate; up]). The kernels load 16
    bytes at a time, so x and the weight must start on 16-byte boundaries, as arrays
    MLX allocates do; a view into the middle of a row may not (copy it first)."""
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
    """(thread groups, output columns per warp) for ``n_out`` columns: one column a
    warp while that keeps to ``MAX_GROUPS`` groups, more past it, so that each group's
    share of the row's setup (loading and normalizing it) stays small against its
    share of the matrix."""
    per_warp = max(1, -(-n_out // (N_WARPS * MAX_GROUPS)))
    return -(-n_out // (N_WARPS * per_warp)), per_warp


def call_args(
    x: mx.array, n_out: int, eps: float | None = None, residual: bool = False, gated: bool = False
) -> dict:
    """Template, grid and thread group of one launch (also used by the Metal check):
    the fused kernel's when ``eps`` is given, else the plain one's."""
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


def _kernels() -> tuple[object, object]:
    if _KERNELS is None:
        raise RuntimeError("the norm/linear kernels need a GPU backend (Metal or CUDA)")
    return _KERNELS


def norm_linear_applies(x: mx.array, weight: mx.array, gated: bool = False) -> bool:
    """Whether the model should run ``norm_linear`` here (rather than MLX's add,
    rms_norm and matmul): the backend's ``USE_NORM_LINEAR`` and ``supports``."""
    return USE_NORM_LINEAR[BACKEND] and supports(x, weight, gated)


def linear_row_applies(x: mx.array, weight: mx.array) -> bool:
    """Whether the model should run ``linear_row`` here rather than MLX's matmul."""
    return USE_LINEAR_ROW[BACKEND] and supports(x, weight)


def norm_linear(
    x: mx.array,
    residual: mx.array | None,
    norm_weight: mx.array,
    eps: float,
    weight: mx.array,
    gated: bool = False,
) -> tuple[mx.array, mx.array]:
    """The fused kernel. x, residual: (1, hidden) (residual None: nothing to add);
    norm_weight: (hidden,); weight: (n, hidden). Returns (h, y): h = x + residual and
    y = RMSNorm(h) @ weight.T, or with ``gated`` silu(gate) * up of that product's
    halves (weight is [gate; up]). ``norm_linear_ops`` is its twin."""
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
    """The plain kernel: ``x @ weight.T`` for one row x (1, hidden) and weight (n,
    hidden). ``linear_row_ops`` is its twin."""
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
    """``silu(gate) * up`` of a fused gate/up projection's output, (rows, 2f) -> (rows, f)."""
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
