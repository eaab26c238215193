"""Which BLAS MLX's CPU backend multiplies with, and a faster one where the machine has it.

MLX's Linux CPU wheel links the reference BLAS it bundles
(``mlx_cpu.libs/libblas-*.so.3.10.0``): a 512x2048x5632 float32 matmul ran at 2.9
GFLOP/s on the 2-core CI machine, 30-47 GFLOP/s with OpenBLAS (FACTS.md). libmlx
resolves ``cblas_sgemm`` through the process's global symbol scope before its own
dependencies, so a BLAS with unprefixed CBLAS symbols, loaded with RTLD_GLOBAL before
``mlx.core`` is imported, takes over every MLX CPU matmul. (numpy's scipy-openblas
prefixes its symbols, so it cannot stand in.)

``load()`` is called first thing by the ``conform`` command, the suites and the
benchmarks. ``CONFORM_BLAS`` chooses: unset or ``auto`` takes the first library of
``CANDIDATES`` that exists, else keeps the bundled one; ``bundled`` keeps MLX's own;
``openblas`` demands a candidate (an error if none is installed, so a benchmark
series never switches BLAS silently); any other value is a library path. The result
is checked once against numpy and named by ``describe()`` in every report.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ENV = "CONFORM_BLAS"
# Debian's OpenBLAS (`apt-get install libopenblas0-pthread`), then its other builds.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
# float32 matmul of a (64, 96) by (96, 80) product vs float64 numpy: both BLASes
# measured under 1e-6 relative here; 1e-4 still catches a wrong or transposed product.
CHECK_RTOL = 1e-4

_state: dict[str, str] = {}


class BlasError(RuntimeError):
    """The BLAS asked for cannot be loaded, or it multiplies wrongly."""


def load() -> str:
    """Load the chosen BLAS before MLX (once per process); returns ``describe()``."""
    if "described" in _state:
        return _state["described"]
    choice = os.environ.get(ENV, "auto").strip() or "auto"
    path = _pick(choice)
    if path is not None:
        if "mlx.core" in sys.modules:
            raise BlasError(
                f"{ENV}={choice}: mlx.core is already imported, so MLX keeps the BLAS it "
                "bound first; call conform_mlx.blas.load() before importing mlx"
            )
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as e:
            raise BlasError(f"{ENV}={choice}: cannot load {path}: {e}") from None
    _check_matmul()
    _state["described"] = describe()
    return _state["described"]


def _pick(choice: str) -> str | None:
    if sys.platform != "linux" or choice == "bundled":
        return None  # macOS MLX uses Accelerate; nothing to swap
    found = next((p for p in CANDIDATES if Path(p).is_file()), None)
    if choice == "auto":
        return found
    if choice == "openblas":
        if found is None:
            raise BlasError(
                f"{ENV}=openblas but none of {', '.join(CANDIDATES)} exists "
                "(apt-get install libopenblas0-pthread)"
            )
        return found
    if not Path(choice).is_file():
        raise BlasError(f"{ENV}={choice!r}: no such library file")
    return choice


def describe() -> str:
    """The library that provides ``cblas_sgemm`` to MLX in this process, e.g.
    "OpenBLAS 0.3.21 (/usr/lib/.../libblas.so.3)" or "MLX bundled reference BLAS"."""
    if sys.platform != "linux":
        return f"platform BLAS ({sys.platform})"
    scope = ctypes.CDLL(None)  # the global scope libmlx looks in first
    try:
        sgemm = scope.cblas_sgemm
    except AttributeError:
        bundled = [p for p in _mapped_files() if "mlx_cpu.libs" in p and "libblas" in p]
        where = f" ({Path(bundled[0]).name})" if bundled else ""
        return f"MLX bundled reference BLAS{where}"
    lib = _library_of(sgemm)
    try:
        get_config = scope.openblas_get_config
    except AttributeError:
        return f"BLAS from {lib}"
    get_config.restype = ctypes.c_char_p
    words = get_config().decode().split()
    name = " ".join(words[:2]) if words else "OpenBLAS"
    return f"{name} ({lib})"


def _check_matmul() -> None:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 96)).astype(np.float32)
    b = rng.standard_normal((96, 80)).astype(np.float32)
    got = np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))
    want = a.astype(np.float64) @ b.astype(np.float64)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    if not err <= CHECK_RTOL:
        raise BlasError(
            f"MLX CPU matmul through {describe()} is off by {err:.2e} (relative, limit "
            f"{CHECK_RTOL:g}) against numpy float64; set {ENV}=bundled to use MLX's own BLAS"
        )


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _library_of(symbol) -> str:
    info = _DlInfo()
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if libc.dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)) and info.dli_fname:
        return info.dli_fname.decode()
    return "an unknown library"


def _mapped_files() -> list[str]:
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    return sorted({line.split()[-1] for line in lines if "/" in line})
