"""One row x (1, hidden) times W (n, hidden): ``linear_row`` is ``x @ W.T``; ``norm_linear``
is ``RMSNorm(x + residual) @ W.T`` (``gated``: W = [gate; up], then ``silu(gate) * up``) in
one launch. W is a float array or ``Quantized`` (affine 4 or 8 bits, de-quantized as it is
read). ``*_ops`` are the twins; a column may differ from MLX's gemv in its last bit."""

from __future__ import annotations

from dataclasses import dataclass

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
QUANT_BITS = (4, 8)  # 8 values of a lane are whole words
QUANT_GROUPS = (32, 64, 128)  # MLX's affine group sizes; a lane's 8 values share one group


@dataclass(frozen=True)
class Quantized:
    """An affine-quantized weight as MLX packs it (``nn.QuantizedLinear``'s arrays): words
    (n, hidden * bits / 32) uint32, scales and biases (n, hidden / group_size)."""

    words: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        rows, words = self.words.shape
        return rows, words * 32 // self.bits

    @classmethod
    def of(cls, module: nn.Module) -> Quantized | None:
        """The weight of an affine ``QuantizedLinear`` or ``QuantizedEmbedding``, else None."""
        if getattr(module, "mode", None) != "affine" or module.get("biases") is None:
            return None
        return cls(module.weight, module.scales, module.biases, module.group_size, module.bits)


Weight = mx.array | Quantized


def _body(fused: bool, quant: bool) -> str:
    """A kernel body: (fused) the norm or (plain) a copy of x into shared memory, then the
    columns; ``quant`` swaps the weight's registers, loads and dot product."""
    regs, load, dot = ("quant_regs", "qload", "qdot") if quant else ("float_regs", "load", "dot")
    # The preamble's loads overlap the row's setup (load, or add and normalize).
    preamble = SOURCE["preamble"] + SOURCE[regs] + SOURCE[load]
    columns = (
        SOURCE["columns_head"]
        + SOURCE[load]
        + SOURCE["columns_tail"]
        + SOURCE[dot]
        + SOURCE["columns_end"]
    )
    if fused:
        return preamble + SOURCE["norm"] + columns
    return SOURCE["plain_gated"] + preamble + SOURCE["plain_row"] + columns


def build_kernels(backend: Backend) -> dict[tuple[bool, bool], object]:
    """Kernel objects by (fused, quantized); construction compiles nothing."""
    kernels = {}
    for quant in (False, True):
        weight = ["w", "scales", "biases"] if quant else ["w"]
        suffix = "_q" if quant else ""
        kernels[True, quant] = make_kernel(
            backend,
            "norm_linear" + suffix,
            ["x", "residual", "norm_weight", *weight],
            ["h", "y"],
            _body(True, quant),
        )
        kernels[False, quant] = make_kernel(
            backend, "linear_row" + suffix, ["x", *weight], ["y"], _body(False, quant)
        )
    return kernels


BACKEND: Backend = active_backend()
_kernels = on_first_use(build_kernels, "the norm/linear kernels")


def shared_bytes(hidden: int, dtype: mx.Dtype) -> int:
    """Thread-group memory of one group: the row in T, and the norm's partial sums."""
    return hidden * dtype.size + 4 * N_WARPS


def supports(x: mx.array, weight: Weight, gated: bool = False) -> bool:
    """Whether the kernels take these inputs; x and the weight must start 16-byte aligned, as
    MLX's arrays do (a view into a row may not)."""
    if x.ndim != 2 or x.dtype not in DTYPES or len(weight.shape) != 2:
        return False
    if isinstance(weight, Quantized):
        fits = (
            weight.bits in QUANT_BITS
            and weight.group_size in QUANT_GROUPS
            and weight.words.dtype == mx.uint32
            and weight.scales.dtype == weight.biases.dtype == x.dtype
            and weight.scales.shape == (weight.shape[0], x.shape[-1] // weight.group_size)
            and weight.biases.shape == weight.scales.shape
            and x.shape[-1] % weight.group_size == 0
        )
    else:
        fits = weight.dtype == x.dtype
    rows, hidden = x.shape
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    return (
        fits
        and rows == 1
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
    x: mx.array,
    weight: Weight,
    eps: float | None = None,
    residual: bool = False,
    gated: bool = False,
) -> dict:
    """Template, grid and thread group of a launch (the fused kernel's when ``eps`` is given)."""
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    n_groups, per_warp = groups(n_out)
    template = [
        ("T", x.dtype),
        ("KDIM", x.shape[-1]),
        ("N_OUT", n_out),
        ("ROWS", per_warp),
        ("N_WARPS", N_WARPS),
        ("UNROLL", UNROLL),
    ]
    if isinstance(weight, Quantized):
        template += [("BITS", weight.bits), ("GS", weight.group_size)]
    if eps is not None:
        template += [("HAS_RES", residual), ("GATED", gated), ("EPS_BITS", float_bits(eps))]
    return {
        "template": template,
        "grid": (N_WARPS * WARP, 1, n_groups),  # in threads: groups along z
        "threadgroup": (N_WARPS * WARP, 1, 1),
    }


def weight_inputs(weight: Weight) -> list[mx.array]:
    """The kernel's weight arrays: the float weight, or words, scales and biases."""
    if isinstance(weight, Quantized):
        return [weight.words, weight.scales, weight.biases]
    return [weight]


def norm_linear_applies(x: mx.array, weight: Weight, gated: bool = False) -> bool:
    """Whether the model should run ``norm_linear`` here rather than add, rms_norm, matmul."""
    return current_policy().norm_linear and supports(x, weight, gated)


def linear_row_applies(x: mx.array, weight: Weight) -> bool:
    """Whether the model should run ``linear_row`` here rather than MLX's matmul."""
    return current_policy().linear_row and supports(x, weight)


def norm_linear(
    x: mx.array,
    residual: mx.array | None,
    norm_weight: mx.array,
    eps: float,
    weight: Weight,
    gated: bool = False,
) -> tuple[mx.array, mx.array]:
    """The fused kernel: (h = x + residual, y (1, n), or (1, n / 2) ``gated``); residual
    None adds nothing; norm_weight (hidden,)."""
    if not supports(x, weight, gated) or norm_weight.shape != (x.shape[1],):
        raise ValueError(f"unsupported x {x.shape} {x.dtype} / weight {_describe(weight)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {residual.shape} {residual.dtype} does not match x")
    kernel = _kernels()[True, isinstance(weight, Quantized)]
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    h, y = kernel(
        inputs=[x, x if residual is None else residual, norm_weight.astype(x.dtype)]
        + weight_inputs(weight),
        output_shapes=[x.shape, (1, n_out)],
        output_dtypes=[x.dtype, x.dtype],
        **call_args(x, weight, eps, residual is not None, gated),
    )
    return (x if residual is None else h), y


def linear_row(x: mx.array, weight: Weight) -> mx.array:
    """The plain kernel: ``x @ weight.T`` for x (1, hidden), weight (n, hidden)."""
    if not supports(x, weight):
        raise ValueError(f"unsupported x {x.shape} {x.dtype} / weight {_describe(weight)}")
    kernel = _kernels()[False, isinstance(weight, Quantized)]
    (y,) = kernel(
        inputs=[x, *weight_inputs(weight)],
        output_shapes=[(1, weight.shape[0])],
        output_dtypes=[x.dtype],
        **call_args(x, weight),
    )
    return y


def _describe(weight: Weight) -> str:
    if isinstance(weight, Quantized):
        q = weight
        return f"{q.shape} {q.bits}-bit, group {q.group_size}, scales {q.scales.dtype}"
    return f"{weight.shape} {weight.dtype}"


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
    weight: Weight,
    gated: bool = False,
) -> tuple[mx.array, mx.array]:
    """The ops twin of ``norm_linear``."""
    h = x if residual is None else x + residual
    y = linear_row_ops(mx.fast.rms_norm(h, norm_weight, eps), weight)
    return h, (silu_mul(y) if gated else y)


def linear_row_ops(x: mx.array, weight: Weight) -> mx.array:
    """The ops twin of ``linear_row``."""
    if isinstance(weight, Quantized):
        q = weight
        return mx.quantized_matmul(
            x, q.words, q.scales, q.biases, transpose=True, group_size=q.group_size, bits=q.bits
        )
    return x @ weight.T
