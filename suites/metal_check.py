"""Metal without a Mac: parse the generated Metal source of our kernels with clang.

No open-source Metal compiler runs on Linux, but MLX builds the full Metal text of
a custom kernel on any platform: on the CPU backend ``mx.fast.metal_kernel(...)``
constructs, and ``mx.export_function`` of a function that calls it records the
kernel primitive with its generated source (our header, the ``[[kernel]] void
custom_kernel_...`` function with MLX's parameter list, and the explicit template
instantiation). This module captures that text and runs

    clang -fsyntax-only -std=c++17 -x c++ -Wno-unknown-attributes -include metal_stub.h

on it, where ``metal_stub.h`` declares, as C++, the Metal qualifiers, types and
``metal::`` functions the kernels use. Without a clang binary the same parse runs
through libclang's Python bindings (the ``libclang`` wheel of the ``test`` extra),
so CI checks every source without a system package.

What it proves: the text MLX would hand the Metal compiler is well-formed C++ for
every instantiated template (dtype, head size, group size, block size): no
undeclared or misspelt names, no type errors, no wrong argument counts, no
Metal attribute whose name MLX failed to turn into a parameter.

What it cannot prove: anything Metal-specific the stub cannot see (address-space
rules, what is legal in ``threadgroup`` or ``constant`` memory, simdgroup
semantics, resource limits such as 32 KiB of threadgroup memory), that Apple's
compiler accepts it, or that the kernel computes the right thing. Those need a
Mac: the conformance grid in ``suites/test_kernels.py`` runs there.

Test tooling, not part of the installed packages: ``suites/test_metal_source.py``
runs it, and ``python -m suites.metal_check`` prints a verdict per source.
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

from conform_mlx.impl.kernels import paged_decode_source, paged_prefill_source, rope
from conform_mlx.impl.kernels.add_rms_norm import build_kernel as build_norm_kernel
from conform_mlx.impl.kernels.add_rms_norm import call_args as norm_call_args
from conform_mlx.impl.kernels.norm_linear import Quantized, weight_inputs
from conform_mlx.impl.kernels.norm_linear import build_kernels as build_linear_kernels
from conform_mlx.impl.kernels.norm_linear import call_args as linear_call_args
from conform_mlx.impl.kernels.paged_attention import (
    DTYPES,
    HEAD_DIMS,
    combine_call_args,
    kernel_call_args,
    max_warps,
)
from conform_mlx.impl.kernels.paged_prefill import call_args as prefill_call_args

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
    """The clang binary, else ``"libclang"`` when its Python bindings import, else None."""
    if path := shutil.which("clang"):
        return path
    try:
        import clang.cindex  # noqa: F401
    except ImportError:
        return None
    return "libclang"


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


def metal_sources(q: mx.array, kv_pool: mx.array, block_tables: mx.array) -> list[str]:
    """The Metal text of the three paged decode kernels for these inputs' shapes and dtype
    (kv_pool: (num_blocks, block_size, 2, n_kv_heads, D)).

    Runs on any backend: the kernels are built for Metal here regardless of the
    active one, and only traced (exported), never run.
    """
    final, split, combine = paged_decode_source.build_kernels("metal")
    batch, n_heads, _, head_dim = q.shape
    group = n_heads // kv_pool.shape[3]
    context_lens = mx.ones((batch,), dtype=mx.int32)
    inputs = [q, kv_pool, block_tables, context_lens]

    def run(*args: mx.array) -> list[mx.array]:
        one = final(
            inputs=list(args),
            output_shapes=[(batch, n_heads, 1, head_dim)],
            output_dtypes=[q.dtype],
            **kernel_call_args(q, kv_pool, 0.125, 1),
        )
        two = split(
            inputs=list(args),
            output_shapes=[(batch, n_heads, 2, head_dim), (batch, n_heads, 2, 2)],
            output_dtypes=[mx.float32, mx.float32],
            # the widest group the wrapper launches for this shape (the merge's tree)
            **kernel_call_args(q, kv_pool, 0.125, 2, max_warps(group, head_dim)),
        )
        three = combine(
            inputs=two,
            output_shapes=[(batch, n_heads, 1, head_dim)],
            output_dtypes=[q.dtype],
            **combine_call_args(q),
        )
        return one + three

    return _exported_sources(run, inputs, 3)


def prefill_metal_sources(q: mx.array, kv_pool: mx.array, block_tables: mx.array) -> list[str]:
    """The Metal text of the paged prefill kernel for these inputs' shapes and dtype
    (q: (B, n_heads, T, D)); built for Metal and only traced, like ``metal_sources``."""
    kernel = paged_prefill_source.build_kernels("metal")
    batch, _, t, _ = q.shape
    context_lens = mx.full((batch,), t, dtype=mx.int32)
    positions = mx.zeros((batch, t), dtype=mx.int32)
    inputs = [q, kv_pool, block_tables, context_lens, positions]

    def run(*args: mx.array) -> list[mx.array]:
        return kernel(
            inputs=list(args),
            output_shapes=[q.shape],
            output_dtypes=[q.dtype],
            **prefill_call_args(q, kv_pool, 0.125),
        )

    return _exported_sources(run, inputs, 1)


def fused_metal_sources(dtype: mx.Dtype, head_dim: int, n_heads: int, n_kv: int) -> list[str]:
    """The Metal text of the Q/K RoPE and the add + RMSNorm kernels, and of the
    norm + projection kernels (``impl.kernels.norm_linear``): gated after a residual add,
    plain without one, and the plain row kernel, for a float weight and for 4-bit and
    8-bit quantized ones."""
    rope_kernel, norm_kernel = rope.build_kernel("metal"), build_norm_kernel("metal")
    linear_kernels = build_linear_kernels("metal")
    hidden = n_heads * head_dim
    matrix = mx.zeros((2 * hidden + 8, hidden), dtype=dtype)
    # 4-bit in groups of 32 and 8-bit in groups of 128: both ends of each range
    packed = [
        Quantized(*mx.quantize(matrix, 32, 4), 32, 4),
        Quantized(*mx.quantize(matrix, 128, 8), 128, 8),
    ]
    packed = [
        Quantized(q.words, q.scales.astype(dtype), q.biases.astype(dtype), q.group_size, q.bits)
        for q in packed
    ]
    qkv = mx.zeros((6, (n_heads + 2 * n_kv) * head_dim), dtype=dtype)
    cos = mx.zeros((2, 3, head_dim // 2), dtype=mx.float32)
    x = mx.zeros((6, n_heads * head_dim), dtype=dtype)
    weight = mx.zeros((n_heads * head_dim,), dtype=dtype)
    inputs = [qkv, cos, x, weight]

    def run(qkv, cos, x, weight) -> list[mx.array]:
        one = rope_kernel(
            inputs=[qkv, cos, cos],
            output_shapes=[(2, 3, n_heads, head_dim), (2, 3, 2, n_kv, head_dim)],
            output_dtypes=[dtype] * 2,
            **rope.call_args(qkv, n_kv, head_dim),
        )
        two = norm_kernel(
            inputs=[x, x, weight],
            output_shapes=[x.shape, x.shape],
            output_dtypes=[dtype, dtype],
            **norm_call_args(x, 1e-5),
        )
        row = x[:1]
        three = []
        for w in [matrix, *packed]:
            quant = isinstance(w, Quantized)
            for gated, residual in ((True, True), (False, False)):
                n_out = w.shape[0] // 2 if gated else w.shape[0]
                three += linear_kernels[True, quant](
                    inputs=[row, row, weight, *weight_inputs(w)],
                    output_shapes=[row.shape, (1, n_out)],
                    output_dtypes=[dtype, dtype],
                    **linear_call_args(row, w, 1e-5, residual, gated),
                )
            three += linear_kernels[False, quant](
                inputs=[row, *weight_inputs(w)],
                output_shapes=[(1, w.shape[0])],
                output_dtypes=[dtype],
                **linear_call_args(row, w),
            )
        return one + two + three

    return _exported_sources(run, inputs, 11)


def _exported_sources(fn, inputs: list[mx.array], expected: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.mlxfn"
        mx.export_function(str(path), fn, *inputs)
        sources = generated_sources(path.read_bytes())
    if len(sources) != expected:
        raise RuntimeError(f"expected {expected} Metal sources in the export, found {len(sources)}")
    return sources


def clang_check(source: str, clang: str | None = None) -> ClangResult:
    """Parse one generated Metal source as C++ with the stub header."""
    clang = clang or clang_path()
    if clang is None:
        raise FileNotFoundError("no clang: apt-get install clang, or pip install libclang")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.metal.cpp"
        path.write_text(_INSTANTIATION_ATTRS.sub("template ", source))
        if clang == "libclang":
            return _libclang_check(path)
        proc = subprocess.run(
            [clang, *CLANG_FLAGS, "-include", str(STUB), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    return ClangResult(proc.returncode == 0, proc.stdout + proc.stderr)


def _libclang_check(path: Path) -> ClangResult:
    from clang import cindex

    args = [a for a in CLANG_FLAGS if a != "-fsyntax-only"] + ["-include", str(STUB)]
    unit = cindex.Index.create().parse(str(path), args=args)
    diagnostics = list(unit.diagnostics)
    ok = all(d.severity < cindex.Diagnostic.Error for d in diagnostics)
    return ClangResult(ok, "\n".join(str(d) for d in diagnostics))


def main() -> int:
    """Check every dtype and head size once; print clang's verdict per source."""
    failed = 0
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            q = mx.zeros((2, 8, 1, head_dim), dtype=dtype)
            kv_pool = mx.zeros((4, 16, 2, 2, head_dim), dtype=dtype)
            tables = mx.zeros((2, 2), dtype=mx.int32)
            found = metal_sources(q, kv_pool, tables) + fused_metal_sources(dtype, head_dim, 8, 2)
            found += prefill_metal_sources(mx.repeat(q, 3, axis=2), kv_pool, tables)
            for src in found:
                res = clang_check(src)
                failed += not res.ok
                print(f"{'ok  ' if res.ok else 'FAIL'} {dtype} head_dim={head_dim}")
                if not res.ok:
                    print(res.output)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
