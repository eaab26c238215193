"""Which GPU backend MLX runs on, and the per-backend lines (``kernels/backend.inc``) that
let one kernel body serve CUDA and Metal (docs/kernel-notes.md#backend)."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import mlx.core as mx

Backend = Literal["metal", "cuda", "cpu"]
T = TypeVar("T")
WARP = 32  # lanes per NVIDIA warp and per Apple simdgroup

# kernels/ (installed as conform_mlx/kernels/): two levels up in a checkout and a wheel.
SOURCE_DIR = Path(__file__).resolve().parents[2] / "kernels"


def kernel_source(op: str) -> dict[str, str]:
    """``kernels/<op>.inc``'s fragments (each from a ``//! name`` line) by name, newline-wrapped."""
    fragments: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in (SOURCE_DIR / f"{op}.inc").read_text().splitlines():
        if line.startswith("//! "):
            lines = fragments.setdefault(line[4:].strip(), [])
        else:
            lines.append(line)
    return {name: "\n" + "\n".join(body) + "\n" for name, body in fragments.items()}


SOURCE = kernel_source("backend")  # kernels/backend.inc


def float_bits(x: float) -> int:
    """``x`` as float32 bits in an int, a template argument (``kfloat_bits`` inverts it), not an
    input array read over the bus (measured: docs/kernel-notes.md#backend)."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def active_backend() -> Backend:
    """The backend MLX's GPU stream would run on; ``"cpu"`` when there is no GPU."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


# MLX puts this before its namespace and defines a macro ``inf``: no identifier may be so named.
CUDA_HEADER = SOURCE["cuda_header"]

CUDA_PROLOGUE = SOURCE["cuda_prologue"]

METAL_HEADER = SOURCE["metal_header"]

METAL_PROLOGUE = SOURCE["metal_prologue"]


def header(backend: Backend) -> str:
    """Helper functions and qualifiers for ``backend`` (``"cuda"`` or ``"metal"``)."""
    return {"cuda": CUDA_HEADER, "metal": METAL_HEADER}[backend]


def prologue(backend: Backend) -> str:
    """The index lines every kernel body starts with, for ``backend``."""
    return {"cuda": CUDA_PROLOGUE, "metal": METAL_PROLOGUE}[backend]


def compact(source: str) -> str:
    """``source`` without ``//`` comments, indentation or blank lines (MLX hashes it at every
    launch: docs/kernel-notes.md#backend); ValueError if it holds a string literal."""
    lines = [line.split("//", 1)[0].strip() for line in source.splitlines()]
    if any('"' in line for line in lines):
        raise ValueError("kernel source holds a string literal: compact() could cut it")
    return "\n".join(line for line in lines if line)


def on_first_use(build: Callable[[Backend], T], what: str) -> Callable[[], T]:
    """``build(backend)`` for the active GPU backend, made on the first call and kept;
    a RuntimeError naming ``what`` on the CPU, where no custom kernel runs."""

    @functools.cache
    def kernels() -> T:
        backend = active_backend()
        if backend == "cpu":
            raise RuntimeError(f"{what} needs a GPU backend (Metal or CUDA)")
        return build(backend)

    return kernels


def make_kernel(
    backend: Backend, name: str, inputs: list[str], outputs: list[str], body: str
) -> object:
    """An MLX custom kernel: ``backend``'s prologue + ``body``, helpers as header (lazy build)."""
    make = {"cuda": mx.fast.cuda_kernel, "metal": mx.fast.metal_kernel}[backend]
    return make(
        name=name,
        input_names=inputs,
        output_names=outputs,
        source=compact(prologue(backend) + body),
        header=compact(header(backend)),
    )
