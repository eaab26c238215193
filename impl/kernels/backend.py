"""Which GPU backend MLX runs on, and the per-backend lines (``kernels/backend.inc``: index
names, KSHARED, ksync, warp reductions, kload/kstore) that let one kernel body serve CUDA
and Metal. Index names sit in the prologue, not the header: MLX's Metal wrapper adds e.g.
``thread_index_in_simdgroup`` as a kernel parameter only when ``source`` names it.
"""

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
    """The fragments of ``kernels/<op>.inc`` (each from a line ``//! name``) by name, each
    with a newline at both ends, so they concatenate safely."""
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
    """``x`` as float32 bits in an int: a float template argument (MLX takes int, bool or
    dtype; ``kfloat_bits`` inverts it). A one-element input array would be read across the
    bus every launch (measured: docs/kernel-notes.md#backend)."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def active_backend() -> Backend:
    """The backend MLX's GPU stream would run on; ``"cpu"`` when there is no GPU."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


# MLX puts the CUDA header before its own namespace and defines a macro ``inf``:
# no identifier in a header may be called that.
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
    """``source`` without ``//`` comments, indentation or blank lines (line breaks stay for the
    preprocessor): MLX hashes the text at every launch (docs/kernel-notes.md#backend) and
    passes ``<input>_shape`` for any input a comment names. Kernels hold no string literals,
    so every ``//`` starts a comment."""
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
    """An MLX custom kernel: ``backend``'s prologue + ``body``, its helpers as header. It
    compiles nothing until called, so Metal ones build anywhere (``suites.metal_check``)."""
    make = {"cuda": mx.fast.cuda_kernel, "metal": mx.fast.metal_kernel}[backend]
    return make(
        name=name,
        input_names=inputs,
        output_names=outputs,
        source=compact(prologue(backend) + body),
        header=compact(header(backend)),
    )
