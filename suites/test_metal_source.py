"""The Metal kernels' generated source parses as C++ against suites/metal_stub.h.

Metal without a Mac (see ``suites/metal_check.py`` for what this proves and what it
cannot): MLX on the CPU backend still builds the full Metal text of a custom kernel,
and clang checks it. A second test injects an error and shows the check catches it.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from conform_mlx.impl.kernels.backend import compact
from conform_mlx.impl.kernels.paged_attention import HEAD_DIMS as KERNEL_HEAD_DIMS
from suites import metal_check

pytestmark = pytest.mark.impl_only("checks impl's Metal kernel source, not an engine")

CLANG = metal_check.clang_path()
needs_clang = pytest.mark.skipif(
    CLANG is None,
    reason="neither clang nor libclang to parse Metal source (pip install -e '.[test]')",
)

HEAD_DIMS: list[int] = list(KERNEL_HEAD_DIMS)
DTYPES: list[str] = ["float16", "bfloat16", "float32"]
# (q heads, kv heads, block size): GQA 8:1 with the usual block, MQA (the largest
# register and threadgroup arrays) with a large block, and MHA (the prefill kernel's
# largest query tile) with a small block.
SHAPES: list[tuple[int, int, int]] = [(32, 4, 16), (32, 1, 32), (8, 8, 8)]


def sources(dtype: str, head_dim: int, n_heads: int, n_kv: int, block_size: int) -> list[str]:
    dt = getattr(mx, dtype)
    q = mx.zeros((2, n_heads, 1, head_dim), dtype=dt)
    kv_pool = mx.zeros((4, block_size, 2, n_kv, head_dim), dtype=dt)
    tables = mx.zeros((2, 2), dtype=mx.int32)
    decode = metal_check.metal_sources(q, kv_pool, tables)
    fused = metal_check.fused_metal_sources(dt, head_dim, n_heads, n_kv)
    # Prefill: 5 query tokens, a partial last tile for every Q_TILE above 1.
    prefill = metal_check.prefill_metal_sources(mx.repeat(q, 5, axis=2), kv_pool, tables)
    return decode + fused + prefill


def test_export_holds_the_generated_kernels() -> None:
    """Runs without clang: the text is captured whole, template instantiation included."""
    found = sources("float16", 64, 32, 4, 16)
    kernels = [f"paged_decode_attention{s}" for s in ("", "_split", "_combine")]
    for kernel in [*kernels, "rope_qkv", "add_rms_norm", "linear_row", "paged_prefill_attention"]:
        name = f"[[kernel]] void custom_kernel_{kernel}__"
        assert sum(name in src for src in found) == 1, name
    # norm_linear twice: gated after a residual add, and plain without one
    assert sum("[[kernel]] void custom_kernel_norm_linear__" in src for src in found) == 2
    # the quantized twins at 4 and 8 bits: norm_linear twice each, linear_row once each
    assert sum("[[kernel]] void custom_kernel_norm_linear_q__" in src for src in found) == 4
    assert sum("[[kernel]] void custom_kernel_linear_row_q__" in src for src in found) == 2
    assert sum("const device uint32_t* w [[buffer(" in src for src in found) == 6
    for src in found:
        assert "template [[host_name(" in src  # the instantiation clang must see
        assert "metal::simd_sum" in src  # the Metal header came along
    for src in found[:3] + found[4:]:  # the kernels that use warp lanes
        assert "thread_index_in_simdgroup [[thread_index_in_simdgroup]]" in src


@needs_clang
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}q{s[1]}kv-bs{s[2]}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_metal_source_parses(dtype: str, head_dim: int, shape: tuple[int, int, int]) -> None:
    for src in sources(dtype, head_dim, *shape):
        result = metal_check.clang_check(src, CLANG)
        assert result.ok, result.output


# (text in the source, what replaces it, clang's complaint)
INJECTED: list[tuple[str, str, str]] = [
    ("kexp(m[g] - m_new)", "kexpp(m[g] - m_new)", "undeclared identifier"),
    ("ksync();", "__syncthreads();", "undeclared identifier"),  # CUDA spelling
    ("kv_out[kv_at] = first;", "kv_out[kv_at] = frist;", "undeclared identifier"),
    (
        "kmax(top, sm_m[w * GROUP_SIZE + g])",
        "kmax(sm_m[w * GROUP_SIZE + g])",
        "no matching function",
    ),
    ("t < lim[r % Q_TILE]", "t < lmi[r % Q_TILE]", "undeclared identifier"),
]


@needs_clang
@pytest.mark.parametrize(
    "bug", INJECTED, ids=["misspelt", "cuda-barrier", "misspelt-rope", "arity", "misspelt-prefill"]
)
def test_check_catches_an_injected_error(bug: tuple[str, str, str]) -> None:
    good, bad, diagnostic = bug
    src = next(src for src in sources("float16", 64, 32, 4, 16) if good in src)
    result = metal_check.clang_check(src.replace(good, bad, 1), CLANG)
    assert not result.ok
    assert diagnostic in result.output


def test_compact_strips_comments_and_keeps_lines() -> None:
    """The kernel text MLX hashes at every launch loses comments, indentation and
    blank lines; each line stays a line, so a preprocessor directive still ends."""
    source = "#define KSHARED __shared__  // shared\n\n  int a = 1;  // one\n// gone\n  a += 2;\n"
    assert compact(source) == "#define KSHARED __shared__\nint a = 1;\na += 2;"


def test_compact_refuses_a_string_literal() -> None:
    with pytest.raises(ValueError, match="string literal"):
        compact('printf("a // b");')
    assert compact('x = 1;  // a "quoted" comment') == "x = 1;"


def test_kernels_reach_mlx_compacted() -> None:
    """What MLX gets (and hashes every launch) is the compacted text; the clang
    checks above parse that same text, so compacting kept it valid."""
    for text in sources("float16", 64, 32, 4, 16):
        assert "//" not in text[text.index("[[kernel]]") :]
