"""The fused RoPE + cache-write and residual-add + RMSNorm kernels, and their ops
twins, against slow float64 references (vLLM's kernel-test style).

RoPE + cache write: each case is a batch of sequences, each adding T tokens at
its own offset, written through a shuffled block table into a K/V pool poisoned
with NaN. The reference rotates token by token from the formula and fills the pool
row by row; every row no new token owns must still hold its NaN afterwards, in its
K and its V half, so a write through a wrong slot, or past the new tokens, fails
the case.

One row through a projection (``impl.kernels.norm_linear``): the fused add + RMSNorm +
matmul kernel and the plain row kernel against their ops twins (MLX's add, rms_norm
and matmul), which a float32 case checks against float64 on any backend.

On the CPU backend the twins run the grid; the kernels run it on Metal or CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from conform_mlx.impl.kernels import rope
from conform_mlx.impl.kernels.add_rms_norm import (
    add_rms_norm,
    add_rms_norm_kernel,
    add_rms_norm_ops,
)
from conform_mlx.impl.kernels.norm_linear import (
    MAX_GROUPS,
    N_WARPS,
    SHARED_BYTES,
    Quantized,
    groups,
    linear_row,
    linear_row_ops,
    norm_linear,
    norm_linear_ops,
    shared_bytes,
    supports,
)
from suites.tolerances import KERNEL_ATOL, KERNEL_RTOL, ROW_ATOL, ROW_RTOL
from suites.twice import twice

pytestmark = pytest.mark.impl_only("tests impl's fused kernels (kernels/), not an engine")

ON_GPU = rope.BACKEND != "cpu"

HEAD_DIMS: list[int] = [64, 128]
HEAD_COUNTS: list[tuple[int, int]] = [(32, 4), (32, 8), (8, 8), (32, 1)]  # (q heads, kv heads)
BLOCK_SIZES: list[int] = [8, 16, 32]
# New tokens per sequence in one call: decode, and prefill chunks around a block.
NEW_TOKENS: list[str] = ["1", "bs-1", "bs", "bs+1"]
DTYPES: list[str] = ["float16", "bfloat16", "float32"]
HIDDEN: list[int] = [64, 2048, 5632]  # 5632: TinyLlama's MLP width, not a power of two
ROWS: list[int] = [1, 7, 512]


def count(spec: str, block_size: int) -> int:
    return block_size + int(spec[2:] or 0) if spec.startswith("bs") else int(spec)


def to_f64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


@dataclass
class RopeCase:
    q: mx.array  # (B, T, n_heads, D)
    k: mx.array  # (B, T, n_kv, D)
    v: mx.array
    positions: mx.array  # (B, T) int32
    inv_freq: mx.array  # (D/2,) float32
    kv_pool: mx.array  # (num_blocks, block_size, 2, n_kv, D), NaN everywhere
    slots: mx.array  # (B * T,) int32


def make_rope_case(
    t: int, n_heads: int, n_kv: int, head_dim: int, block_size: int, dtype: str, seed: int = 0
) -> RopeCase:
    """Three sequences at offsets 0, block_size - 1 and 2000 add t tokens each."""
    rng = np.random.default_rng(seed)
    starts = [0, block_size - 1, 2000]
    blocks_each = [math.ceil((s + t) / block_size) for s in starts]
    num_blocks = sum(blocks_each) + 2  # spare blocks: no slot may land there
    order = rng.permutation(num_blocks)
    tables, at = [], 0
    for n in blocks_each:
        tables.append(order[at : at + n])
        at += n
    positions = np.array([[s + i for i in range(t)] for s in starts], np.int32)
    slots = [
        tables[b][p // block_size] * block_size + p % block_size
        for b in range(len(starts))
        for p in positions[b]
    ]
    dt = getattr(mx, dtype)

    def normal(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dt)

    poisoned = np.full((num_blocks, block_size, 2, n_kv, head_dim), np.nan, np.float32)
    inv_freq = 10000.0 ** (-np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    return RopeCase(
        q=normal(len(starts), t, n_heads, head_dim),
        k=normal(len(starts), t, n_kv, head_dim),
        v=normal(len(starts), t, n_kv, head_dim),
        positions=mx.array(positions),
        inv_freq=mx.array(inv_freq.astype(np.float32)),
        # A buffer of its own from numpy: the write updates the pool in place.
        kv_pool=mx.array(poisoned).astype(dt),
        slots=mx.array(np.array(slots, np.int32)),
    )


def reference_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Slow: rotate each token's pairs from the formula, angles in float32 as HF takes them."""
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for b, t in np.ndindex(positions.shape):
        angle = (np.float32(positions[b, t]) * inv_freq).astype(np.float64)  # (D/2,)
        c, s = np.cos(angle), np.sin(angle)
        first, second = x[b, t, :, :half], x[b, t, :, half:]
        out[b, t, :, :half] = first * c - second * s
        out[b, t, :, half:] = second * c + first * s
    return out


def pool_rows(pool: mx.array) -> np.ndarray:
    return to_f64(pool).reshape(-1, *pool.shape[2:])  # (num_blocks * block_size, 2, n_kv, D)


def assert_rope_write_matches(
    got: tuple[mx.array, mx.array, mx.array], case: RopeCase, dtype: str
) -> None:
    q_rot, kv, kv_pool = got
    pos, inv = np.array(case.positions), np.array(case.inv_freq)
    tol = dict(atol=KERNEL_ATOL[dtype], rtol=KERNEL_RTOL[dtype])
    assert q_rot.shape == case.q.shape and q_rot.dtype == case.q.dtype
    np.testing.assert_allclose(to_f64(q_rot), reference_rope(to_f64(case.q), pos, inv), **tol)
    rows = pool_rows(kv_pool)
    k_rows, v_rows = rows[:, 0], rows[:, 1]
    slots = np.array(case.slots)
    k_ref = reference_rope(to_f64(case.k), pos, inv)
    # kv is returned for the fresh path: k rotated, then v as given, as pool rows
    # (B * T, 2, n_kv, D), token-major.
    b, t, n_kv, head_dim = case.k.shape
    assert kv.shape == (b * t, 2, n_kv, head_dim)
    kv = kv.reshape(b, t, 2, n_kv, head_dim)
    np.testing.assert_allclose(to_f64(kv[:, :, 0]), k_ref, **tol)
    np.testing.assert_array_equal(to_f64(kv[:, :, 1]), to_f64(case.v))
    k_new = k_ref.reshape(-1, *case.k.shape[2:])
    np.testing.assert_allclose(k_rows[slots], k_new, **tol)
    np.testing.assert_array_equal(v_rows[slots], to_f64(case.v).reshape(-1, *case.v.shape[2:]))
    untouched = np.ones(k_rows.shape[0], bool)
    untouched[slots] = False
    assert np.isnan(k_rows[untouched]).all() and np.isnan(v_rows[untouched]).all()


def qkv_rows(case: RopeCase) -> mx.array:
    """The case's q, k, v as the projection makes them: one q | k | v row per token."""
    rows = case.q.shape[0] * case.q.shape[1]
    return mx.concatenate([x.reshape(rows, -1) for x in (case.q, case.k, case.v)], axis=-1)


def rope_args(case: RopeCase) -> tuple:
    """The arguments of ``rope_and_cache_write`` / its twin; the step's angles come from
    ``rope.rope_cos_sin`` when this runs, so a fault injected there reaches both."""
    c = case
    bs = c.kv_pool.shape[1]
    step = rope.rope_step(c.positions, c.inv_freq, c.slots // bs, c.slots % bs, bs)
    return (qkv_rows(c), c.q.shape[:2], step, c.kv_pool)


def run_rope_kernel(case: RopeCase) -> tuple[mx.array, ...]:
    """The GPU path: the rotation kernel, then the scatter write; run twice, each run
    writing into its own copy of the pool (the write updates the pool it is given)."""
    assert rope.supports(qkv_rows(case), case.q.shape[-1])

    def rope_write(qkv, shape, step, pool):
        return rope.rope_and_cache_write(qkv, shape, step, mx.array(pool))

    return twice(rope_write, *rope_args(case))


ROPE_GRID = [
    pytest.mark.parametrize("dtype", DTYPES),
    pytest.mark.parametrize("new", NEW_TOKENS),
    pytest.mark.parametrize("block_size", BLOCK_SIZES),
    pytest.mark.parametrize("heads", HEAD_COUNTS, ids=lambda h: f"{h[0]}q{h[1]}kv"),
    pytest.mark.parametrize("head_dim", HEAD_DIMS),
]


def grid(marks: list):
    def wrap(fn):
        for mark in marks:
            fn = mark(fn)
        return fn

    return wrap


@grid(ROPE_GRID)
def test_rope_write_ops_twin(head_dim, heads, block_size, new, dtype) -> None:
    case = make_rope_case(count(new, block_size), *heads, head_dim, block_size, dtype)
    assert_rope_write_matches(rope.rope_and_cache_write_ops(*rope_args(case)), case, dtype)


@pytest.mark.gpu
@grid(ROPE_GRID)
def test_rope_write_kernel(head_dim, heads, block_size, new, dtype) -> None:
    case = make_rope_case(count(new, block_size), *heads, head_dim, block_size, dtype)
    got = run_rope_kernel(case)
    assert_rope_write_matches(got, case, dtype)
    twin = rope.rope_and_cache_write_ops(*rope_args(case))
    for a, b in zip(got, twin):  # same rounding steps as the twin: equal to its tolerance
        np.testing.assert_allclose(to_f64(a), to_f64(b), atol=KERNEL_ATOL[dtype], rtol=0)


@pytest.mark.gpu
def test_rope_write_readers_see_the_new_rows() -> None:
    """A reader of the returned pool that does not use q_rot (as the prefill gather)
    still runs after the write. The first kernel, which wrote in place, failed this."""
    case = make_rope_case(3, 8, 2, 64, 16, "float16", seed=1)
    _, _, kv_pool = rope.rope_and_cache_write(*rope_args(case))  # nothing evaluated before
    gathered = kv_pool.reshape(-1, 2, 2, 64)[case.slots]
    assert not np.isnan(to_f64(gathered)).any()


def test_rope_dispatch() -> None:
    """rope_and_cache_write: the kernel on a GPU, the very same twin ops on the CPU."""
    case = make_rope_case(2, 8, 2, 64, 8, "float32", seed=2)
    got = rope.rope_and_cache_write(*rope_args(case))
    assert_rope_write_matches(got, case, "float32")
    if not ON_GPU:
        twin = rope.rope_and_cache_write_ops(*rope_args(case))
        assert all(mx.array_equal(a, b, equal_nan=True).item() for a, b in zip(got, twin))


@pytest.mark.parametrize("width", [8 * 64 + 1, 2 * 2 * 64], ids=["ragged", "no-q-heads"])
def test_rope_refuses_rows_that_are_not_whole_heads(width: int) -> None:
    """Rows whose width is not (n_heads + 2 * n_kv) whole heads (a pool from another
    config) fail by name before any kernel or write runs; the pool stays as it was."""
    case = make_rope_case(1, 8, 2, 64, 8, "float32", seed=5)
    _, tokens, step, kv_pool = rope_args(case)
    before = to_f64(kv_pool)
    with pytest.raises(ValueError, match=r"is not \(tokens, \(n_heads \+ 2 \* 2\) \* 64\) rows"):
        rope.rope_and_cache_write(mx.zeros((3, width)), tokens, step, kv_pool)
    np.testing.assert_array_equal(to_f64(kv_pool), before)


def test_rope_write_puts_rotated_k_then_v_in_a_pool_row() -> None:
    """The twin (the kernel's oracle) writes each new token's pool row as its K heads
    rotated at [:, 0], then its V heads exactly as in the qkv row at [:, 1]; the
    returned kv holds the same rows."""
    case = make_rope_case(3, 8, 2, 64, 8, "float16", seed=6)
    qkv, tokens, step, kv_pool = rope_args(case)
    k = qkv[:, 8 * 64 : 10 * 64].reshape(*tokens, 2, 64)
    k_rot = rope.apply_rope(k, step.cos, step.sin).reshape(-1, 2, 64)
    v = qkv[:, 10 * 64 :].reshape(-1, 2, 64)
    _, kv, kv_pool = rope.rope_and_cache_write_ops(qkv, tokens, step, kv_pool)
    written = kv_pool.reshape(-1, 2, 2, 64)[case.slots]  # (B * T, 2, n_kv, D)
    for rows in (written, kv.reshape(written.shape)):
        assert mx.array_equal(rows[:, 0], k_rot).item()
        assert mx.array_equal(rows[:, 1], v).item()


@pytest.mark.parametrize("shape", [(6, 8, 2, 64), (6, 8, 3, 2, 64)], ids=["4-D", "axis-2-not-kv"])
def test_pool_heads_refuses_a_pool_that_is_not_one_kv_pool(shape: tuple[int, ...]) -> None:
    """A K or V pool of the old layout (4-D), or a 5-D pool whose axis 2 is not K and
    V, fails by name; so does a write into it."""
    assert rope.pool_heads(mx.zeros((6, 8, 2, 3, 64))) == (3, 64)
    with pytest.raises(ValueError, match=r"is not \(num_blocks, block_size, 2, n_kv_heads"):
        rope.pool_heads(mx.zeros(shape))
    qkv, tokens, step, _ = rope_args(make_rope_case(1, 8, 2, 64, 8, "float32", seed=7))
    with pytest.raises(ValueError, match=r"is not \(num_blocks, block_size, 2, n_kv_heads"):
        rope.rope_and_cache_write(qkv, tokens, step, mx.zeros(shape))


# The checks must be able to fail: inject the faults they guard against.
def test_rope_check_catches_a_position_off_by_one(monkeypatch) -> None:
    case = make_rope_case(1, 8, 2, 64, 8, "float32", seed=3)
    real = rope.rope_cos_sin
    monkeypatch.setattr(rope, "rope_cos_sin", lambda p, inv, scale=1.0: real(p + 1, inv, scale))
    with pytest.raises(AssertionError):
        assert_rope_write_matches(rope.rope_and_cache_write(*rope_args(case)), case, "float32")


def test_rope_check_catches_a_write_to_the_wrong_slot() -> None:
    case = make_rope_case(4, 8, 2, 64, 8, "float32", seed=4)
    wrong = RopeCase(**{**case.__dict__, "slots": case.slots + 1})
    got = rope.rope_and_cache_write_ops(*rope_args(wrong))
    with pytest.raises(AssertionError):
        assert_rope_write_matches(got, case, "float32")


# -- residual add + RMSNorm ---------------------------------------------------------------
def make_norm_case(rows: int, hidden: int, dtype: str, seed: int = 0) -> tuple[mx.array, ...]:
    rng = np.random.default_rng(seed)
    dt = getattr(mx, dtype)
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    residual = rng.standard_normal((rows, hidden)).astype(np.float32)
    weight = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    return mx.array(x).astype(dt), mx.array(residual).astype(dt), mx.array(weight).astype(dt)


EPS = 1e-5


def assert_norm_matches(
    got: tuple[mx.array, mx.array], x: mx.array, residual: mx.array, weight: mx.array, dtype: str
) -> None:
    """Reference: the sum in float64 from the dtype-rounded inputs, then the norm of the
    dtype-rounded sum (the kernel stores h in the dtype and normalises what it stored)."""
    h, normed = got
    tol = dict(atol=KERNEL_ATOL[dtype], rtol=KERNEL_RTOL[dtype])
    np.testing.assert_allclose(to_f64(h), to_f64(x) + to_f64(residual), **tol)
    h_stored = to_f64(x + residual)
    rms = np.sqrt((h_stored**2).mean(axis=-1, keepdims=True) + EPS)
    np.testing.assert_allclose(to_f64(normed), to_f64(weight) * h_stored / rms, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_add_rms_norm_ops_twin(hidden: int, rows: int, dtype: str) -> None:
    x, r, w = make_norm_case(rows, hidden, dtype)
    assert_norm_matches(add_rms_norm_ops(x, r, w, EPS), x, r, w, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_add_rms_norm_kernel(hidden: int, rows: int, dtype: str) -> None:
    x, r, w = make_norm_case(rows, hidden, dtype)
    got = twice(add_rms_norm_kernel, x, r, w, EPS)
    assert_norm_matches(got, x, r, w, dtype)
    for a, b in zip(got, add_rms_norm_ops(x, r, w, EPS)):
        np.testing.assert_allclose(to_f64(a), to_f64(b), atol=KERNEL_ATOL[dtype], rtol=0)


def test_add_rms_norm_dispatch() -> None:
    x, r, w = make_norm_case(3, 64, "float32", seed=5)
    got = add_rms_norm(x[None], r[None], w, EPS)  # any leading shape
    assert got[0].shape == got[1].shape == (1, 3, 64)
    assert_norm_matches((got[0][0], got[1][0]), x, r, w, "float32")


def test_add_rms_norm_check_catches_a_dropped_residual() -> None:
    x, r, w = make_norm_case(4, 64, "float32", seed=6)
    with pytest.raises(AssertionError):
        assert_norm_matches(add_rms_norm_ops(x, mx.zeros_like(r), w, EPS), x, r, w, "float32")


def test_add_rms_norm_check_catches_a_norm_of_the_wrong_tensor() -> None:
    x, r, w = make_norm_case(4, 64, "float32", seed=7)
    wrong = (x + r, mx.fast.rms_norm(x, w, EPS))  # normalises the input, not the sum
    with pytest.raises(AssertionError):
        assert_norm_matches(wrong, x, r, w, "float32")


# -- one row through a projection (impl.kernels.norm_linear) -----------------------------------
# 264: a row of two 256-element chunks, the second partial (896, Qwen2.5-0.5B's, too)
ROW_HIDDEN: list[int] = [64, 264, 2048, 5632]
ROW_OUT: list[int] = [1, 13, 2560]
# (residual, gated): q/k/v after the first layer's norm (nothing to add), gate/up after
# an add (the activation fused in), a projection after an add (lm_head).
ROW_KINDS: list[tuple[bool, bool]] = [(False, False), (True, True), (True, False)]


def make_row_case(hidden: int, n_out: int, dtype: str, gated: bool, seed: int = 0) -> tuple:
    """x, residual (1, hidden), norm weight (hidden,), weight (n, hidden) scaled so
    each column is ~N(0, 1); gated: n = 2 * n_out rows, [gate; up]."""
    x, residual, norm_weight = make_norm_case(1, hidden, dtype, seed)
    rng = np.random.default_rng(seed + 1)
    rows = 2 * n_out if gated else n_out
    weight = rng.standard_normal((rows, hidden)).astype(np.float32) / math.sqrt(hidden)
    return x, residual, norm_weight, mx.array(weight).astype(getattr(mx, dtype))


def assert_rows_match(got: tuple[mx.array, ...], want: tuple[mx.array, ...], dtype: str) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(to_f64(a), to_f64(b), atol=ROW_ATOL[dtype], rtol=ROW_RTOL[dtype])


@pytest.mark.parametrize("kind", ROW_KINDS, ids=lambda k: f"res{int(k[0])}-gated{int(k[1])}")
def test_norm_linear_ops_twin_against_float64(kind: tuple[bool, bool]) -> None:
    residual_on, gated = kind
    x, r, nw, w = make_row_case(264, 9, "float32", gated, seed=3)
    h, y = norm_linear_ops(x, r if residual_on else None, nw, EPS, w, gated)
    h64 = to_f64(x) + (to_f64(r) if residual_on else 0)
    normed = to_f64(nw) * h64 / np.sqrt((h64**2).mean() + EPS)
    y64 = normed @ to_f64(w).T
    if gated:
        gate, up = y64[:, :9], y64[:, 9:]
        y64 = gate / (1 + np.exp(-gate)) * up
    tol = dict(atol=ROW_ATOL["float32"], rtol=ROW_RTOL["float32"])
    np.testing.assert_allclose(to_f64(h), h64, **tol)
    np.testing.assert_allclose(to_f64(y), y64, **tol)
    np.testing.assert_allclose(to_f64(linear_row_ops(x, w)), to_f64(x) @ to_f64(w).T, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ROW_KINDS, ids=lambda k: f"res{int(k[0])}-gated{int(k[1])}")
@pytest.mark.parametrize("n_out", ROW_OUT)
@pytest.mark.parametrize("hidden", ROW_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_linear_kernel(dtype: str, hidden: int, n_out: int, kind) -> None:
    residual_on, gated = kind
    x, r, nw, w = make_row_case(hidden, n_out, dtype, gated)
    r = r if residual_on else None
    got = twice(norm_linear, x, r, nw, EPS, w, gated)
    assert got[1].shape == (1, n_out)
    assert_rows_match(got, norm_linear_ops(x, r, nw, EPS, w, gated), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n_out", ROW_OUT)
@pytest.mark.parametrize("hidden", ROW_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_row_kernel(dtype: str, hidden: int, n_out: int) -> None:
    x, _, _, w = make_row_case(hidden, n_out, dtype, False, seed=1)
    assert_rows_match((twice(linear_row, x, w),), (linear_row_ops(x, w),), dtype)


# -- quantized weights: affine 4 and 8 bits, de-quantized as the kernel reads them --------------
# (bits, group size): MLX's 4-bit default (64), GGUF Q4_0/Q4_1 repacked (32), 8-bit at 128
QUANT_KINDS: list[tuple[int, int]] = [(4, 32), (4, 64), (8, 32), (8, 128)]
# 576: SmolLM2's width, not a multiple of 256 (a warp's partial last chunk)
QUANT_HIDDEN: list[int] = [576, 5632]


def quantize(weight: mx.array, bits: int, group_size: int) -> Quantized:
    """``weight`` quantized as ``nn.QuantizedLinear`` keeps it, scales and biases in its dtype."""
    words, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    return Quantized(
        words, scales.astype(weight.dtype), biases.astype(weight.dtype), group_size, bits
    )


def quant_id(kind: tuple[int, int]) -> str:
    return f"{kind[0]}bit-g{kind[1]}"


def test_quantized_ops_twin_against_float64() -> None:
    """The twin (MLX's quantized matmul) against float64 on the de-quantized weights."""
    x, _, _, w = make_row_case(640, 9, "float32", False, seed=6)
    for bits, group_size in QUANT_KINDS:
        q = quantize(w, bits, group_size)
        dense = mx.dequantize(q.words, q.scales, q.biases, group_size=group_size, bits=bits)
        want = to_f64(x) @ to_f64(dense).T
        got = to_f64(linear_row_ops(x, q))
        np.testing.assert_allclose(got, want, atol=ROW_ATOL["float32"], rtol=ROW_RTOL["float32"])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ROW_KINDS, ids=lambda k: f"res{int(k[0])}-gated{int(k[1])}")
@pytest.mark.parametrize("quant", QUANT_KINDS, ids=quant_id)
@pytest.mark.parametrize("hidden", QUANT_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_linear_quantized_kernel(dtype: str, hidden: int, quant, kind) -> None:
    if hidden % quant[1]:
        pytest.skip(f"MLX quantizes no row of {hidden} in groups of {quant[1]}")
    residual_on, gated = kind
    x, r, nw, w = make_row_case(hidden, 13, dtype, gated, seed=8)
    q, r = quantize(w, *quant), (r if residual_on else None)
    got = twice(norm_linear, x, r, nw, EPS, q, gated)
    assert got[1].shape == (1, 13)
    assert_rows_match(got, norm_linear_ops(x, r, nw, EPS, q, gated), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n_out", [1, 32000])
@pytest.mark.parametrize("quant", QUANT_KINDS, ids=quant_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_row_quantized_kernel(dtype: str, quant, n_out: int) -> None:
    x, _, _, w = make_row_case(2048, n_out, dtype, False, seed=9)
    q = quantize(w, *quant)
    assert_rows_match((twice(linear_row, x, q),), (linear_row_ops(x, q),), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", QUANT_KINDS, ids=quant_id)
def test_quantized_row_check_catches_the_next_groups_scale(quant) -> None:
    """A planted fault: each row's scales shifted by one group (a kernel indexing its
    scales off by one group reads these); the check must fail."""
    x, _, _, w = make_row_case(2048, 64, "float16", False, seed=10)
    q = quantize(w, *quant)
    shifted = Quantized(q.words, mx.roll(q.scales, 1, axis=1), q.biases, q.group_size, q.bits)
    with pytest.raises(AssertionError):
        assert_rows_match((linear_row(x, shifted),), (linear_row_ops(x, q),), "float16")


@pytest.mark.gpu
@pytest.mark.parametrize("n_out", [32000, N_WARPS * MAX_GROUPS + 1])
def test_row_kernels_with_many_columns_a_warp(n_out: int) -> None:
    """Past MAX_GROUPS groups each warp takes several columns (lm_head's vocabulary:
    4), and the last group holds fewer than a full share; gated too (Llama-2-7B's
    11008-wide MLP takes 2 a warp)."""
    assert groups(n_out)[1] > 1
    x, r, nw, w = make_row_case(2048, n_out, "float16", False, seed=2)
    want = norm_linear_ops(x, r, nw, EPS, w)
    assert_rows_match(twice(norm_linear, x, r, nw, EPS, w), want, "float16")
    assert_rows_match((twice(linear_row, x, w),), (linear_row_ops(x, w),), "float16")
    x, r, nw, w = make_row_case(264, n_out, "float16", True, seed=3)
    got, want = twice(norm_linear, x, r, nw, EPS, w, True), norm_linear_ops(x, r, nw, EPS, w, True)
    assert_rows_match(got, want, "float16")


@pytest.mark.gpu
def test_row_check_catches_gate_and_up_swapped() -> None:
    x, r, nw, w = make_row_case(2048, 64, "float16", True, seed=4)
    swapped = mx.concatenate([w[64:], w[:64]])
    with pytest.raises(AssertionError):
        assert_rows_match(
            norm_linear(x, r, nw, EPS, swapped, True),
            norm_linear_ops(x, r, nw, EPS, w, True),
            "float16",
        )


@pytest.mark.gpu
def test_row_check_catches_a_dropped_residual() -> None:
    x, r, nw, w = make_row_case(2048, 64, "float16", False, seed=5)
    with pytest.raises(AssertionError):
        assert_rows_match(
            norm_linear(x, None, nw, EPS, w), norm_linear_ops(x, r, nw, EPS, w), "float16"
        )


@pytest.mark.skipif(
    ON_GPU, reason="checks the CPU backend's refusal; a GPU backend runs the kernels"
)
def test_row_kernels_refuse_the_cpu_backend() -> None:
    x, r, nw, w = make_row_case(64, 8, "float32", False)
    with pytest.raises(RuntimeError, match="GPU backend"):
        norm_linear(x, r, nw, EPS, w)
    with pytest.raises(RuntimeError, match="GPU backend"):
        linear_row(x, w)


@pytest.mark.parametrize("n_out", [1, 7, 8, 2560, 5632, 8192, 8193, 32000, 128256])
def test_row_groups_cover_the_columns_in_few_groups(n_out: int) -> None:
    n_groups, per_warp = groups(n_out)
    assert n_groups * N_WARPS * per_warp >= n_out  # every column has a warp
    assert (n_groups - 1) * N_WARPS * per_warp < n_out  # and no group is idle
    assert n_groups <= MAX_GROUPS
    assert per_warp == 1 or -(-n_out // (N_WARPS * (per_warp - 1))) > MAX_GROUPS


def test_row_supports() -> None:
    def case(rows=1, hidden=2048, n=2560, dtype=mx.float16, wdtype=None):
        x = mx.zeros((rows, hidden), dtype=dtype)
        return x, mx.zeros((n, hidden), dtype=wdtype or dtype)

    assert supports(*case()) and supports(*case(n=11264), gated=True)
    assert supports(*case(hidden=5632, n=2048)) and supports(*case(dtype=mx.float32))
    assert not supports(*case(rows=2))  # a batch: MLX's matmul
    assert not supports(*case(hidden=2044))  # not whole 16-byte loads
    assert not supports(*case(wdtype=mx.float32))
    assert not supports(*case(dtype=mx.int32))
    assert not supports(*case(n=7), gated=True)  # no [gate; up] halves
    too_wide = SHARED_BYTES // 2
    assert shared_bytes(too_wide, mx.float16) > SHARED_BYTES
    assert not supports(*case(hidden=too_wide))
    assert supports(*case(hidden=too_wide - 64))
    x, w = case()
    assert not supports(x, w[:, :1024])  # rows of another length


def test_row_supports_quantized() -> None:
    x = mx.zeros((1, 2048), dtype=mx.float16)
    w = mx.zeros((2560, 2048), dtype=mx.float16)
    for bits, group_size in QUANT_KINDS:
        q = quantize(w, bits, group_size)
        assert q.shape == (2560, 2048) and supports(x, q) and supports(x, q, gated=True)
        assert not supports(mx.zeros((2, 2048), dtype=mx.float16), q)  # a batch
        assert not supports(x.astype(mx.float32), q)  # scales in another dtype than x
        assert not supports(x[:, :1024], q)
    assert not supports(x, quantize(w, 6, 64))  # 8 values are not whole words
    q = quantize(w, 4, 32)
    assert not supports(x, Quantized(q.words, q.scales, q.biases, 16, 4))  # no MLX group of 16
