"""Which GPU backend MLX runs on, and the few lines that let one kernel body serve both.

A kernel body in ``kernels/`` is written once, in the common subset of CUDA C++ and
the Metal Shading Language, against these names:

  lane, warp, tid      thread's lane in its 32-wide warp/simdgroup, warp index, index
                       in the thread group (1-D groups only)
  group_y, group_z     the thread group's position in the grid
  groups_z             number of thread groups along z
  KSHARED              qualifier of a thread-group (shared memory) array
  KALIGN16             aligns such an array to 16 bytes, for CUDA's ``kload8`` from it
                       (Metal's loads element by element: empty there)
  ksync()              barrier across the thread group, shared memory visible after it
  kwarp_sum(x)         sum of x over the 32 lanes, the same value in every lane
  kwarp_max(x)         max of x over the 32 lanes, likewise
  kshfl(x, src)        lane src's x (float or int), in every lane
  kexp(x), kmax(a, b)  float32 exp and max
  krsqrt(x)            float32 1 / sqrt(x)
  kfloat_bits(b)       the float32 whose bits are the int b (``float_bits``' inverse)
  kmini(a, b)          int min (CUDA's and Metal's spellings differ)
  kload(x)             one element of any input dtype widened to float32
  kload8(p, out)       out[0..8) = p[0..8) widened to float32; p 16-byte aligned
  kstore<T>(x)         float32 narrowed to the output dtype T

Index names go in the ``source`` prologue, not the header, because MLX's Metal
wrapper adds an attribute such as ``thread_index_in_simdgroup`` as a kernel
parameter only when its name appears in ``source``. Both Apple simdgroups and
NVIDIA warps are 32 lanes wide, so the same lane arithmetic holds on both.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Literal

import mlx.core as mx

Backend = Literal["metal", "cuda", "cpu"]
WARP = 32  # lanes per NVIDIA warp and per Apple simdgroup

# The device code: the repository's kernels/ folder, installed as conform_mlx/kernels/,
# two levels above this package in a checkout and in a wheel alike.
SOURCE_DIR = Path(__file__).resolve().parents[2] / "kernels"


def kernel_source(op: str) -> dict[str, str]:
    """The fragments of ``kernels/<op>.inc`` by name: each starts at a line ``//! name``.
    Each fragment keeps a newline at both ends, so fragments concatenate safely."""
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
    """``x`` rounded to float32, its bits as an int: how a float constant (an
    attention scale, a norm's epsilon) reaches a kernel as a template argument, which
    MLX takes as int, bool or dtype only; ``kfloat_bits`` turns it back in the kernel.

    A template constant costs the kernel nothing at run time. The same value passed
    as a one-element input array sits in MLX's small pool in host memory, which the
    GPU reads over the bus: on an H200 the decode attention kernel waited about 4 us
    a call on such reads (results/gpu/README.md)."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def active_backend() -> Backend:
    """The backend MLX's GPU stream would run on; ``"cpu"`` when there is no GPU."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


# Helpers live in the header, outside the kernel function. MLX puts the CUDA header
# before its own namespace and defines a macro named ``inf``: no identifier here
# may be called that.
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
    """``source`` without ``//`` comments, indentation or blank lines; line breaks
    kept (preprocessor lines need them). The kernels carry no string literals, so
    every ``//`` starts a comment.

    MLX's CUDA backend hashes a custom kernel's whole source text at every launch
    it encodes: on an H200 a kernel with 9 KB of source cost 2.3 us more host time
    a launch than one with a single line, and a batch-1 decode step launches 66
    custom kernels. Comments in the kernel text would also make MLX pass shape
    arguments for every input they name (it looks for ``<input>_shape``)."""
    lines = [line.split("//", 1)[0].strip() for line in source.splitlines()]
    if any('"' in line for line in lines):
        raise ValueError("kernel source holds a string literal: compact() could cut it")
    return "\n".join(line for line in lines if line)


def make_kernel(
    backend: Backend, name: str, inputs: list[str], outputs: list[str], body: str
) -> object:
    """An MLX custom kernel for ``backend`` from a shared ``body``: the backend's
    prologue goes in front of it and its helpers into the header, both ``compact``ed.
    Construction compiles nothing (MLX compiles on first call, per template) and
    works for Metal on any platform, which ``suites.metal_check`` relies on."""
    make = {"cuda": mx.fast.cuda_kernel, "metal": mx.fast.metal_kernel}[backend]
    return make(
        name=name,
        input_names=inputs,
        output_names=outputs,
        source=compact(prologue(backend) + body),
        header=compact(header(backend)),
    )
