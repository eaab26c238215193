"""Paged decode attention against a slow, obvious reference (vLLM's kernel-test style).

The reference walks each sequence's block table one token at a time in float64.
Inputs are poisoned so the grid catches the classic paged-attention bugs: every
pool slot no sequence owns (the tail of a last block, spare blocks, the block the
tables are padded with) holds NaN in its K and its V half, and each table lists
its blocks shuffled across the pool, so reading past ``context_len`` or through
the wrong table entry changes the answer. Every case is a batch of mixed lengths.

On the CPU backend the ops twin (``paged_attention_ops``) runs the grid on a
subset of lengths; the custom kernel runs the whole grid on Metal or CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from conform_mlx.impl.kernels import paged_decode_source, paged_prefill, paged_prefill_source
from conform_mlx.impl.kernels.add_rms_norm import INPUTS as NORM_INPUTS
from conform_mlx.impl.kernels.add_rms_norm import call_args as norm_call_args
from conform_mlx.impl.kernels.backend import float_bits
from conform_mlx.impl.kernels.paged_attention import (
    BACKEND,
    PREFILL_KERNEL_MAX_CHUNK,
    causal_self_attention,
    context_rows,
    gathered_attention,
    kernel_call_args,
    launch_plan,
    max_warps,
    paged_attention,
    paged_attention_ops,
    paged_decode_attention,
    shared_floats,
    supports,
    thread_floats,
)
from suites.tolerances import KERNEL_ATOL, KERNEL_RTOL
from suites.twice import bits, twice

pytestmark = pytest.mark.impl_only("tests impl's attention kernels (kernels/), not an engine")

ON_GPU = BACKEND != "cpu"

HEAD_DIMS: list[int] = [64, 128]
HEAD_COUNTS: list[tuple[int, int]] = [(32, 4), (32, 8), (8, 8), (32, 1)]  # (q heads, kv heads)
BLOCK_SIZES: list[int] = [8, 16, 32]
# The longest sequence of each case's batch; "bs" is the block size.
SEQ_LENS: list[str] = ["1", "bs-1", "bs", "bs+1", "1000", "2048"]
DTYPES: list[str] = ["float16", "bfloat16", "float32"]
# The ops twin is the CPU path and the kernel's oracle, already checked end to end by
# the parity suites: here it gets the block-edge lengths and one long one, which
# keeps the CPU grid to seconds.
OPS_SEQ_LENS: list[str] = ["1", "bs-1", "bs", "bs+1", "1000"]


@dataclass
class Case:
    q: mx.array  # (B, n_heads, 1, D)
    kv_pool: mx.array  # (num_blocks, block_size, 2, n_kv_heads, D): K, then V
    block_tables: mx.array  # (B, max_blocks) int32
    context_lens: mx.array  # (B,) int32
    positions: mx.array  # (B, 1) int32: context_len - 1
    scale: float


def seq_len(spec: str, block_size: int) -> int:
    """Resolve a SEQ_LENS entry: bs+1 -> block_size + 1, 1000 -> 1000."""
    if spec.startswith("bs"):
        return block_size + int(spec[2:] or 0)
    return int(spec)


def batch_lengths(longest: int, block_size: int) -> list[int]:
    """A mixed batch: the case's length, one about half of it and one just past a block."""
    return [longest, max(1, longest // 2), block_size + 1]


def make_case(
    lengths: list[int],
    n_heads: int,
    n_kv: int,
    head_dim: int,
    block_size: int,
    dtype: str,
    seed: int = 0,
) -> Case:
    rng = np.random.default_rng(seed)
    needs = [math.ceil(n / block_size) for n in lengths]
    num_blocks = sum(needs) + 3  # spare blocks stay all-NaN; the last one pads the tables
    order = rng.permutation(num_blocks - 1)  # shuffled: neighbours in a table are not in the pool
    # NaN in both the K and the V half of every slot until a token owns it.
    kv_pool = np.full((num_blocks, block_size, 2, n_kv, head_dim), np.nan, np.float32)
    poison_block = num_blocks - 1
    tables = np.full((len(lengths), max(needs)), poison_block, np.int32)
    start = 0
    for b, n in enumerate(lengths):
        tables[b, : needs[b]] = order[start : start + needs[b]]
        start += needs[b]
        for t in range(n):
            row = (tables[b, t // block_size], t % block_size)
            kv_pool[row] = rng.standard_normal((2, n_kv, head_dim))  # its K heads, then V
    q = rng.standard_normal((len(lengths), n_heads, 1, head_dim)).astype(np.float32)
    dt = getattr(mx, dtype)
    ctx = mx.array(lengths, dtype=mx.int32)
    return Case(
        q=mx.array(q).astype(dt),
        kv_pool=mx.array(kv_pool).astype(dt),
        block_tables=mx.array(tables),
        context_lens=ctx,
        positions=(ctx - 1)[:, None],
        scale=head_dim**-0.5,
    )


def to_f64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


def reference_decode_attention(case: Case) -> np.ndarray:
    """Deliberately slow: gather each sequence's K/V token by token through its table."""
    q, kv_pool = to_f64(case.q), to_f64(case.kv_pool)
    k_pool, v_pool = kv_pool[:, :, 0], kv_pool[:, :, 1]
    tables, lengths = np.array(case.block_tables), np.array(case.context_lens)
    block_size, n_kv = k_pool.shape[1], k_pool.shape[2]
    group = q.shape[1] // n_kv
    out = np.zeros(q.shape)
    for b, n in enumerate(lengths):
        keys, values = [], []
        for t in range(n):
            block, offset = tables[b, t // block_size], t % block_size
            keys.append(k_pool[block, offset])  # (n_kv, D)
            values.append(v_pool[block, offset])
        k, v = np.stack(keys), np.stack(values)  # (n, n_kv, D)
        for h in range(q.shape[1]):
            scores = k[:, h // group] @ q[b, h, 0] * case.scale  # (n,)
            p = np.exp(scores - scores.max())
            out[b, h, 0] = (p / p.sum()) @ v[:, h // group]
    return out


def assert_matches_reference(got: mx.array, case: Case, dtype: str) -> None:
    assert got.dtype == case.q.dtype and got.shape == case.q.shape
    np.testing.assert_allclose(
        to_f64(got),
        reference_decode_attention(case),
        atol=KERNEL_ATOL[dtype],
        rtol=KERNEL_RTOL[dtype],
    )


def ops_args(case: Case) -> tuple:
    """The arguments of ``paged_attention`` / ``paged_attention_ops``, in order."""
    c = case
    return (c.q, c.kv_pool, c.block_tables, c.context_lens, c.positions, c.scale)


def run_ops(case: Case) -> mx.array:
    return paged_attention_ops(*ops_args(case))


def run_kernel(case: Case, n_parts: int | None = None, n_warps: int | None = None) -> mx.array:
    c = case
    warps = {} if n_warps is None else {"n_warps": n_warps}
    return twice(
        paged_decode_attention,
        c.q, c.kv_pool, c.block_tables, c.context_lens, c.scale, n_parts, **warps
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", OPS_SEQ_LENS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", HEAD_COUNTS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_ops_twin(
    head_dim: int, heads: tuple[int, int], block_size: int, length: str, dtype: str
) -> None:
    lengths = batch_lengths(seq_len(length, block_size), block_size)
    case = make_case(lengths, *heads, head_dim, block_size, dtype)
    assert_matches_reference(run_ops(case), case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", SEQ_LENS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", HEAD_COUNTS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_kernel(
    head_dim: int, heads: tuple[int, int], block_size: int, length: str, dtype: str
) -> None:
    lengths = batch_lengths(seq_len(length, block_size), block_size)
    case = make_case(lengths, *heads, head_dim, block_size, dtype)
    assert_matches_reference(run_kernel(case), case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n_parts", [1, 2, 3, 16, 200])
def test_kernel_any_partition_count(n_parts: int) -> None:
    """Split-K gives the same answer however the context is cut, even into empty parts."""
    case = make_case([700, 1, 64, 300], 32, 4, 64, 16, "float32", seed=3)
    assert_matches_reference(run_kernel(case, n_parts), case, "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("n_warps", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("n_parts", [1, 3])
def test_kernel_any_warp_count(n_warps: int, n_parts: int) -> None:
    """The warps of a group split its tokens and merge in a tree; their number, odd
    ones included (a round whose upper half is the smaller), changes no answer."""
    case = make_case([700, 1, 64, 300], 32, 4, 64, 16, "float32", seed=5)
    assert_matches_reference(run_kernel(case, n_parts, n_warps), case, "float32")


@pytest.mark.parametrize(
    ("batch", "width", "want"),
    [
        (1, 2, (4, 1)),  # ctx 16: one chunk, still MIN_WARPS (1 warp measured slower)
        (1, 64, (4, 8)),  # ctx 512 padded to 64 blocks: 8 partitions of 4 warps
        (1, 256, (16, 8)),  # ctx 2048: 8 partitions of the widest group (policy.head_warps)
        (8, 64, (8, 4)),  # 32 (sequence, KV head) pairs: split-K to policy.target_groups
        (32, 256, (16, 1)),  # 128 groups already: no split, the widest group
    ],
)
def test_launch_plan(batch: int, width: int, want: tuple) -> None:
    """The launch shapes the kernel bench measured best (TinyLlama's heads, tables
    ``width`` blocks of 16 as a compiled step pads them)."""
    assert launch_plan(batch, 4, width, 16, 8, 64) == want


@pytest.mark.parametrize(
    ("batch", "width", "want"),
    [
        (1, 64, (4, 8)),  # ctx 512: as TinyLlama's heads
        (1, 512, (8, 16)),  # ctx 4096: 16 partitions of 8 warps (of 8w16p and 8w32p, tied)
        (1, 4096, (8, 16)),  # ctx 32768: still 16; 8 ran 1.7x slower (results/gpu)
        (8, 512, (8, 2)),  # 64 (sequence, KV head) pairs: split-K to policy.target_groups
    ],
)
def test_launch_plan_at_llama3_8b_heads(batch: int, width: int, want: tuple) -> None:
    """Llama-3-8B's heads (8 KV heads, group 4, head_dim 128; 8 warps at most): a head's
    context spreads over policy.head_warps warps, twice TinyLlama's partitions."""
    assert launch_plan(batch, 8, width, 16, 4, 128) == want


@pytest.mark.parametrize(
    ("group_size", "head_dim", "want"),
    [(8, 64, 16), (4, 128, 8), (8, 128, 8), (16, 128, 4), (64, 128, 1)],
)
def test_max_warps_fits_registers_and_shared_memory(
    group_size: int, head_dim: int, want: int
) -> None:
    """A group's warps are capped by the values its threads keep in registers (no more
    than the widest group run on a GPU: TinyLlama's 8 x 64 at 16 warps) and by its
    merge slots' shared memory (Metal's 32 KiB); the policy never asks for more."""
    warps = max_warps(group_size, head_dim)
    assert warps == want
    assert thread_floats(group_size, head_dim) * warps <= thread_floats(8, 64) * 16 or warps == 1
    assert 4 * shared_floats(group_size, head_dim, warps) <= 32 * 1024 or warps == 1
    assert launch_plan(32, 8, 256, 16, group_size, head_dim)[0] <= warps


@pytest.mark.gpu
def test_kernel_refuses_more_warps_than_its_shape_fits() -> None:
    case = make_case([40], 32, 4, 128, 16, "float32")  # group of 8 x 128: 8 warps at most
    with pytest.raises(ValueError, match="n_warps must be in 1..8"):
        run_kernel(case, 1, 16)


def float_of(bits: int) -> float:
    return float(np.array([bits], np.int32).view(np.float32)[0])


@pytest.mark.parametrize("x", [0.125, 64**-0.5, 128**-0.5, 1e-5, 1e-6, -2.5, 0.0])
def test_float_bits_round_trip_to_float32(x: float) -> None:
    """A float constant reaches a kernel as the bits of its float32 value, in an int
    (MLX's template arguments are int, bool or dtype): exactly np.float32(x) back."""
    assert float_of(float_bits(x)) == np.float32(x)


def test_float_constants_are_template_arguments_not_inputs() -> None:
    """The softmax scale and the norm's epsilon are template constants. As one-element
    input arrays they sat in MLX's small pool in host memory, which the GPU read over
    the bus at every launch; nothing of the kind is an input any more."""
    scale = 64**-0.5
    q, pool = mx.zeros((1, 32, 1, 64)), mx.zeros((4, 16, 2, 4, 64))
    decode = dict(kernel_call_args(q, pool, scale, 1)["template"])
    prefill = dict(paged_prefill.call_args(mx.zeros((1, 32, 5, 64)), pool, scale)["template"])
    norm = dict(norm_call_args(mx.zeros((3, 2048)), 1e-5)["template"])
    assert float_of(decode["SCALE_BITS"]) == float_of(prefill["SCALE_BITS"]) == np.float32(scale)
    assert float_of(norm["EPS_BITS"]) == np.float32(1e-5)
    inputs = paged_decode_source.INPUTS + paged_prefill_source.INPUTS + NORM_INPUTS
    assert not {"scale", "eps"} & set(inputs)


@pytest.mark.gpu
def test_kernel_large_batch_context_8192() -> None:
    case = make_case([8192, 5, 4097] + [33] * 61, 32, 4, 128, 16, "bfloat16", seed=4)
    assert_matches_reference(run_kernel(case), case, "bfloat16")


def dispatch(q: mx.array, *args: object, **kwargs: object) -> mx.array:
    """``paged_attention`` for a head-major q (B, n_heads, T, D), the layout of the
    cases and the twin: the dispatcher takes the model's token-major q and returns rows."""
    b, h, t, d = q.shape
    rows = paged_attention(q.transpose(0, 2, 1, 3), *args, **kwargs)
    assert rows.shape == (b * t, h * d)  # the rows the output projection takes
    return rows.reshape(b, t, h, d).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("t", [1, 3, 200])
def test_dispatch(t: int) -> None:
    """paged_attention on a GPU: the decode kernel for one token, the prefill kernel
    for a short chunk, the gathered path for a long one (200 tokens a sequence is past
    PREFILL_KERNEL_MAX_CHUNK); the ops twin for everything on the CPU."""
    case = make_case([340, 277], 8, 2, 64, 16, "float32", seed=5)
    q = mx.repeat(case.q, t, axis=2)  # (B, n_heads, T, D)
    positions = case.context_lens[:, None] - t + mx.arange(t)[None, :]
    args = (case.kv_pool, case.block_tables, case.context_lens, positions, case.scale)
    got, ops = dispatch(q, *args), paged_attention_ops(q, *args)
    if ON_GPU:
        np.testing.assert_allclose(to_f64(got), to_f64(ops), atol=KERNEL_ATOL["float32"])
        if t > PREFILL_KERNEL_MAX_CHUNK:
            rows = context_rows(case.block_tables, case.context_lens, positions, 16, q.dtype)
            want = gathered_attention(q, case.kv_pool, rows, case.scale)
            assert mx.array_equal(got, want).item()  # the gathered path ran
    else:
        assert mx.array_equal(got, ops).item()  # the very same ops ran


def test_dispatch_falls_back_for_unsupported_head_dim() -> None:
    """No kernel takes head_dim 16: the ops twin on the CPU, the gathered path (MLX's
    fused attention, any head size) on a GPU."""
    case = make_case([20], 4, 2, 16, 8, "float32")
    assert not supports(case.q, case.kv_pool)
    got = dispatch(*ops_args(case))
    if ON_GPU:
        np.testing.assert_allclose(to_f64(got), to_f64(run_ops(case)), atol=KERNEL_ATOL["float32"])
    else:
        assert mx.array_equal(got, run_ops(case)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("n_parts", [1, 3])
def test_decode_kernel_out_shape_is_the_same_bytes(n_parts: int) -> None:
    """``out_shape`` reshapes the result in the launch (the model asks for the output
    projection's rows) without changing a value, with or without the combine; a shape
    of another size fails by name."""
    case = make_case([40, 9], 8, 2, 64, 8, "float32", seed=7)
    want = run_kernel(case, n_parts)
    c = case
    args = (c.q, c.kv_pool, c.block_tables, c.context_lens, c.scale, n_parts)
    rows = paged_decode_attention(*args, out_shape=(2, 8 * 64))
    assert rows.shape == (2, 8 * 64)
    assert mx.array_equal(rows, want.reshape(2, -1)).item()
    with pytest.raises(ValueError, match="does not hold"):
        paged_decode_attention(*args, out_shape=(2, 64))


@pytest.mark.parametrize("shape", [(1, 1, 8, 64), (1, 4, 6, 64)], ids=["decode", "heads-on-axis-2"])
def test_supports_reads_token_major_heads_without_a_transpose(shape) -> None:
    """The dispatcher checks token-major q by its shape alone; the answer is the one
    for the head-major transpose. In the second case the tokens (4) divide among the 4
    KV heads but the 6 query heads do not: reading the wrong axis would say yes."""
    q = mx.zeros(shape, dtype=mx.float16)
    pool = mx.zeros((3, 16, 2, 4, 64), dtype=mx.float16)
    assert supports(q, pool, token_major=True) == supports(q.transpose(0, 2, 1, 3), pool)
    assert supports(q, pool, token_major=True) == (shape[2] % 4 == 0)


def test_supports_needs_one_kv_pool() -> None:
    """Only the (num_blocks, block_size, 2, n_kv_heads, D) pool: not a K or V pool of
    the old layout, nor one whose axis 2 is not K and V."""
    q = mx.zeros((1, 8, 1, 64), dtype=mx.float16)
    assert supports(q, mx.zeros((3, 16, 2, 4, 64), dtype=mx.float16))
    assert not supports(q, mx.zeros((3, 16, 4, 64), dtype=mx.float16))
    assert not supports(q, mx.zeros((3, 16, 4, 2, 64), dtype=mx.float16))


def test_supports_refuses_a_group_past_thread_group_memory() -> None:
    """64 query heads of 128 on one KV head need more than Metal's 32 KiB of
    thread-group memory even at one warp: the dispatcher must fall back, not launch."""
    pool = mx.zeros((3, 16, 2, 1, 128), dtype=mx.float16)
    assert not supports(mx.zeros((1, 64, 1, 128), dtype=mx.float16), pool)
    assert supports(mx.zeros((1, 32, 1, 128), dtype=mx.float16), pool)
    assert 4 * shared_floats(64, 128, 1) > 32 * 1024 >= 4 * shared_floats(32, 128, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("n_parts", [1, 3])
def test_kernel_stops_at_the_table_whatever_the_context_length(n_parts: int) -> None:
    """A context length past its table's width reads nothing outside the table's row:
    the kernel attends over the table's tokens only, as if the length were its width."""
    case = make_case([48, 20], 8, 2, 64, 16, "float32", seed=11)  # tables 3 blocks wide
    c = case
    want = run_kernel(case, n_parts)
    long_lens = mx.array([5000, 20], dtype=mx.int32)
    got = paged_decode_attention(c.q, c.kv_pool, c.block_tables, long_lens, c.scale, n_parts)
    assert mx.array_equal(got, want).item()


@pytest.mark.gpu
def test_kernel_refuses_no_partitions() -> None:
    case = make_case([40], 32, 4, 64, 16, "float32")
    with pytest.raises(ValueError, match="n_parts must be at least 1"):
        run_kernel(case, 0)


# The poison and the shuffle must be able to catch the bugs they are there for:
# inject each bug into the ops twin and watch the reference comparison fail.
def test_poison_catches_reading_past_context_len() -> None:
    for lengths in ([13, 7], [16, 8]):  # past a partial block, and into the padding block
        case = make_case(lengths, 8, 2, 64, 8, "float32", seed=6)
        over = {"context_lens": case.context_lens + 1, "positions": case.positions + 1}
        got = run_ops(Case(**{**case.__dict__, **over}))
        with pytest.raises(AssertionError):
            assert_matches_reference(got, case, "float32")


def test_shuffled_tables_catch_ignoring_the_table() -> None:
    case = make_case([40, 9], 8, 2, 64, 8, "float32", seed=7)
    in_pool_order = mx.sort(case.block_tables, axis=1)  # right blocks, wrong order
    got = run_ops(Case(**{**case.__dict__, "block_tables": in_pool_order}))
    with pytest.raises(AssertionError):
        assert_matches_reference(got, case, "float32")


# A prompt's first chunk (every sequence empty before the step) attends over its own
# new keys and values with MLX's fused causal attention instead of the masked twin.
def fresh_case(t: int, lengths: list[int] | None = None) -> tuple[Case, mx.array, mx.array]:
    """A case, T queries per sequence, and each sequence's first T cached rows as
    (B, T, 2, n_kv_heads, D) keys and values, read through its table."""
    case = make_case(lengths or [t, t], 8, 2, 64, 16, "float32", seed=8)
    q = mx.array(np.random.default_rng(9).standard_normal((2, 8, t, 64)).astype(np.float32))
    tables, bs, pool = np.array(case.block_tables), case.kv_pool.shape[1], np.array(case.kv_pool)
    rows = [[(tables[b, i // bs], i % bs) for i in range(t)] for b in range(2)]
    own = mx.array(np.stack([[pool[blk, off] for blk, off in r] for r in rows]))
    return case, q, own


@pytest.mark.parametrize("t", [1, 7, 16, 17, 40])
def test_fresh_prefill_path_equals_the_twin(t: int) -> None:
    case, q, own = fresh_case(t)
    c = case
    positions = mx.broadcast_to(mx.arange(t, dtype=mx.int32)[None], (2, t))
    args = (c.kv_pool, c.block_tables, c.context_lens, positions, c.scale)
    got = dispatch(q, *args, own_kv=own)
    np.testing.assert_allclose(
        to_f64(got), to_f64(paged_attention_ops(q, *args)), atol=KERNEL_ATOL["float32"], rtol=0
    )


def test_fresh_path_check_catches_a_sequence_with_a_prefix() -> None:
    """Taking the fresh path for a sequence that already held tokens must fail the check."""
    case, q, own = fresh_case(7, lengths=[7, 12])  # the second holds 5 earlier tokens
    c = case
    positions = mx.array([list(range(7)), list(range(5, 12))], dtype=mx.int32)
    want = paged_attention_ops(q, c.kv_pool, c.block_tables, c.context_lens, positions, c.scale)
    got = causal_self_attention(q, own, c.scale)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(to_f64(got), to_f64(want), atol=KERNEL_ATOL["float32"], rtol=0)


def test_twice_catches_outputs_that_differ_run_to_run() -> None:
    """The grid's determinism check: an op whose output changes between two runs on the
    same inputs fails it; a NaN equals itself bit for bit."""
    calls = iter(range(10))

    def drifting(x: mx.array) -> tuple[mx.array, mx.array]:
        return x, x + next(calls)

    with pytest.raises(AssertionError, match="drifting: output 1 differs in 4 of 4 elements"):
        twice(drifting, mx.zeros(4))
    nan = mx.array([float("nan"), 1.0, -0.0], dtype=mx.bfloat16)
    twice(lambda: nan * 1)  # the same NaN both runs: no difference
    assert bits(mx.array([-0.0]))[0] != bits(mx.array([0.0]))[0]
