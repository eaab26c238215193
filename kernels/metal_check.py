"""Metal without a Mac: parse the generated Metal source of our kernels with clang.

No open-source Metal compiler runs on Linux, but MLX builds the full Metal text of
a custom kernel on any platform: on the CPU backend ``mx.fast.metal_kernel(...)``
constructs, and ``mx.export_function`` of a function that calls it records the
kernel primitive with its generated source (our header, the ``[[kernel]] void
custom_kernel_...`` function with MLX's parameter list, and the explicit template
instantiation). This module captures that text and runs

    clang -fsyntax-only -std=c++17 -x c++ -Wno-unknown-attributes -include metal_stub.h

on it, where ``metal_stub.h`` declares, as C++, the Metal qualifiers, types and
``metal::`` functions the kernels use.

What it proves: the text MLX would hand the Metal compiler is well-formed C++ for
every instantiated template (dtype, head size, group size, block size): no
undeclared or misspelt names, no type errors, no wrong argument counts, no
Metal attribute whose name MLX failed to turn into a parameter.

What it cannot prove: anything Metal-specific the stub cannot see (address-space
rules, what is legal in ``threadgroup`` or ``constant`` memory, simdgroup
semantics, resource limits such as 32 KiB of threadgroup memory), that Apple's
compiler accepts it, or that the kernel computes the right thing. Those need a
Mac: the conformance grid in ``suites/test_kernels.py`` runs there.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from kernels import paged_decode_attention as pda

STUB = Path(__file__).with_name("metal_stub.h")
CLANG_FLAGS = ["-fsyntax-only", "-std=c++17", "-x", "c++", "-Wno-unknown-attributes"]
# Metal allows attributes between ``template`` and an explicit instantiation
# (``template [[host_name("k")]] [[kernel]] decltype(k<...>) k<...>;``); C++ does
# not, so they are dropped from that line only. The instantiation itself stays:
# it is what makes clang check the template body with concrete types.
_INSTANTIATION_ATTRS = re.compile(r"^template\s+(?:\[\[.*?\]\]\s*)+", re.MULTILINE)


@dataclass(frozen=True)
class ClangResult:
    ok: bool
    output: str  # clang's diagnostics


def clang_path() -> str | None:
    return shutil.which("clang")


def _read_string(data: bytes, at: int) -> tuple[str, int]:
    # MLX's export format writes a string as its uint64 little-endian length, then
    # the bytes.
    (n,) = struct.unpack_from("<Q", data, at)
    end = at + 8 + n
    return data[at + 8 : end].decode(), end


def generated_sources(exported: bytes) -> list[str]:
    """Every custom-kernel source recorded in an ``mx.export_function`` file."""
    sources, at = [], 0
    while (at := exported.find(b"custom_kernel_", at)) != -1:
        # A kernel's name is stored right before its source, both length-prefixed:
        # a name field starts 8 bytes after its length, so check that length.
        (n,) = struct.unpack_from("<Q", exported, at - 8)
        name = exported[at : at + n]
        if n < 256 and name.isascii() and b"\n" not in name:
            text, at = _read_string(exported, at + n)
            if "[[kernel]]" in text:
                sources.append(text)
                continue
        at += 1
    return sources


def metal_sources(q: mx.array, k_pool: mx.array, block_tables: mx.array) -> list[str]:
    """The Metal text of the three paged decode kernels for these inputs' shapes and dtype.

    Runs on any backend: the kernels are built for Metal here regardless of the
    active one, and only traced (exported), never run.
    """
    final, split, combine = pda.build_kernels("metal")
    batch, n_heads, _, head_dim = q.shape
    context_lens = mx.ones((batch,), dtype=mx.int32)
    inputs = [q, k_pool, k_pool, block_tables, context_lens, mx.array([0.125], mx.float32)]

    def run(*args: mx.array) -> list[mx.array]:
        one = final(
            inputs=list(args),
            output_shapes=[(batch, n_heads, 1, head_dim)],
            output_dtypes=[q.dtype],
            **pda.kernel_call_args(q, k_pool, 1),
        )
        two = split(
            inputs=list(args),
            output_shapes=[(batch, n_heads, 2, head_dim), (batch, n_heads, 2, 2)],
            output_dtypes=[mx.float32, mx.float32],
            **pda.kernel_call_args(q, k_pool, 2),
        )
        three = combine(
            inputs=two,
            output_shapes=[(batch, n_heads, 1, head_dim)],
            output_dtypes=[q.dtype],
            **pda.combine_call_args(q),
        )
        return one + three

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.mlxfn"
        mx.export_function(str(path), run, *inputs)
        sources = generated_sources(path.read_bytes())
    if len(sources) != 3:
        raise RuntimeError(f"expected 3 Metal sources in the export, found {len(sources)}")
    return sources


def clang_check(source: str, clang: str | None = None) -> ClangResult:
    """Parse one generated Metal source as C++ with the stub header."""
    clang = clang or clang_path()
    if clang is None:
        raise FileNotFoundError("clang is not installed (apt-get install clang)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.metal.cpp"
        path.write_text(_INSTANTIATION_ATTRS.sub("template ", source))
        proc = subprocess.run(
            [clang, *CLANG_FLAGS, "-include", str(STUB), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    return ClangResult(proc.returncode == 0, proc.stdout + proc.stderr)


def main() -> int:
    """Check every dtype and head size once; print clang's verdict per source."""
    failed = 0
    for dtype in pda.DTYPES:
        for head_dim in pda.HEAD_DIMS:
            q = mx.zeros((2, 8, 1, head_dim), dtype=dtype)
            k_pool = mx.zeros((4, 16, 2, head_dim), dtype=dtype)
            tables = mx.zeros((2, 2), dtype=mx.int32)
            for src in metal_sources(q, k_pool, tables):
                res = clang_check(src)
                failed += not res.ok
                print(f"{'ok  ' if res.ok else 'FAIL'} {dtype} head_dim={head_dim}")
                if not res.ok:
                    print(res.output)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
