"""Paged prefill attention against a slow, obvious float64 reference.

T new query tokens per sequence (a prefill chunk) attend causally over a paged
cache that already holds them after a prefix of earlier tokens. The inputs are
poisoned as in ``suites/test_kernels.py``: every pool slot no sequence owns (the
tail of a last block, spare blocks, the block the tables are padded with) holds
NaN in its K and its V half, and each table lists its blocks shuffled across the
pool, so reading past ``context_len`` or through the wrong table entry changes the
answer. Every case is a batch of mixed prefixes sharing one chunk length.

The reference is written here in numpy (each sequence's keys and values gathered
token by token through its block table); on the CPU it is itself checked against
the ops twin ``paged_attention_ops`` on a subset, and the poison is shown to catch
the bugs it is there for. The kernel runs the whole grid on Metal or CUDA: one
test per template (dtype, head size, heads, block size), the chunk lengths and
prefixes inside it, since those are run-time sizes that compile nothing new.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np
import pytest

from conform_mlx.impl.kernels.paged_attention import (
    BACKEND,
    ContextRows,
    context_rows,
    gathered_attention,
    paged_attention_ops,
)
from conform_mlx.impl.kernels.paged_prefill import (
    HEAD_DIMS,
    TARGET_ROWS,
    call_args,
    paged_prefill_attention,
    supports,
)
from suites.tolerances import KERNEL_ATOL, KERNEL_RTOL
from suites.twice import twice

pytestmark = pytest.mark.impl_only("tests impl's paged prefill kernel (kernels/), not an engine")

ON_GPU = BACKEND != "cpu"

HEAD_COUNTS: list[tuple[int, int]] = [(32, 4), (32, 8), (8, 8), (32, 1)]  # (q heads, kv heads)
BLOCK_SIZES: list[int] = [8, 16, 32]
DTYPES: list[str] = ["float16", "bfloat16", "float32"]
# New tokens per sequence (T), and the longest prefix of each case's batch ("bs" is
# the block size): the chunk starts a prompt, follows one token, starts on a block
# edge, or follows a long context.
CHUNKS: list[int] = [1, 7, 64, 512]
PREFIXES: list[str] = ["0", "1", "bs", "1000"]
# The CPU check of the reference against the ops twin: every chunk and prefix, at
# shorter lengths where the twin's dense attention would take long.
OPS_COMBOS: list[tuple[int, str]] = [(1, "1000"), (7, "bs"), (64, "1"), (40, "0"), (33, "100")]


@dataclass
class Case:
    q: mx.array  # (B, n_heads, T, D)
    kv_pool: mx.array  # (num_blocks, block_size, 2, n_kv_heads, D): K, then V
    block_tables: mx.array  # (B, max_blocks) int32
    context_lens: mx.array  # (B,) int32: prefix + T
    positions: mx.array  # (B, T) int32: prefix, ..., prefix + T - 1
    scale: float


def prefix_len(spec: str, block_size: int) -> int:
    """Resolve a PREFIXES entry: bs -> block_size, 1000 -> 1000."""
    return block_size if spec == "bs" else int(spec)


def batch_prefixes(longest: int, block_size: int) -> list[int]:
    """A mixed batch: the case's prefix, about a third of it, and one just past a block."""
    return [longest, longest // 3, block_size + 1]


def make_case(
    prefixes: list[int],
    t: int,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    block_size: int,
    dtype: str,
    seed: int = 0,
) -> Case:
    """Sequence b holds prefixes[b] earlier tokens and the t new ones; q holds the new
    tokens' queries. Unowned slots are NaN; tables are shuffled across the pool."""
    rng = np.random.default_rng(seed)
    lengths = [p + t for p in prefixes]
    needs = [math.ceil(n / block_size) for n in lengths]
    num_blocks = sum(needs) + 3  # spare blocks stay all-NaN; the last one pads the tables
    order = rng.permutation(num_blocks - 1)  # shuffled: neighbours in a table are not in the pool
    # NaN in both the K and the V half of every slot until a token owns it.
    kv_pool = np.full((num_blocks, block_size, 2, n_kv, head_dim), np.nan, np.float32)
    tables = np.full((len(lengths), max(needs)), num_blocks - 1, np.int32)
    start = 0
    for b, n in enumerate(lengths):
        tables[b, : needs[b]] = order[start : start + needs[b]]
        start += needs[b]
        tok = np.arange(n)
        blocks, offsets = tables[b, tok // block_size], tok % block_size
        kv_pool[blocks, offsets, 0] = rng.standard_normal((n, n_kv, head_dim))  # K
        kv_pool[blocks, offsets, 1] = rng.standard_normal((n, n_kv, head_dim))  # V
    q = rng.standard_normal((len(lengths), n_heads, t, head_dim)).astype(np.float32)
    positions = np.array([[p + i for i in range(t)] for p in prefixes], np.int32)
    dt = getattr(mx, dtype)
    return Case(
        q=mx.array(q).astype(dt),
        kv_pool=mx.array(kv_pool).astype(dt),
        block_tables=mx.array(tables),
        context_lens=mx.array(lengths, dtype=mx.int32),
        positions=mx.array(positions),
        scale=head_dim**-0.5,
    )


def grid_case(
    prefix: str, t: int, heads: tuple[int, int], head_dim: int, block_size: int, dtype: str
) -> Case:
    longest = prefix_len(prefix, block_size)
    return make_case(batch_prefixes(longest, block_size), t, *heads, head_dim, block_size, dtype)


def to_f64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


def reference_prefill_attention(case: Case, read_past: int = 0) -> np.ndarray:
    """Deliberately slow: gather each sequence's K/V token by token through its table,
    then per KV head a masked softmax of its query heads' scores.

    ``read_past`` gathers that many slots past context_len too (masked out, as a
    buggy kernel might): only there to show the poison catches it.
    """
    q, kv_pool = to_f64(case.q), to_f64(case.kv_pool)
    k_pool, v_pool = kv_pool[:, :, 0], kv_pool[:, :, 1]
    tables, lengths = np.array(case.block_tables), np.array(case.context_lens)
    positions = np.array(case.positions)
    block_size, n_kv = k_pool.shape[1], k_pool.shape[2]
    group = q.shape[1] // n_kv
    out = np.zeros(q.shape)
    for b, n in enumerate(lengths):
        keys, values = [], []
        for t in range(n + read_past):
            block, offset = tables[b, t // block_size], t % block_size
            keys.append(k_pool[block, offset])  # (n_kv, D)
            values.append(v_pool[block, offset])
        k, v = np.stack(keys), np.stack(values)  # (n + read_past, n_kv, D)
        key_pos = np.arange(len(keys))
        # Query i at position p sees keys 0..p that the sequence holds.
        visible = (key_pos[None, :] <= positions[b][:, None]) & (key_pos[None, :] < n)  # (T, L)
        for h in range(n_kv):
            rows = q[b, h * group : (h + 1) * group]  # (group, T, D)
            scores = rows @ k[:, h].T * case.scale  # (group, T, L)
            scores = np.where(visible, scores, -np.inf)
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[b, h * group : (h + 1) * group] = (p / p.sum(axis=-1, keepdims=True)) @ v[:, h]
    return out


def assert_matches_reference(got: mx.array, case: Case, dtype: str, what: str = "") -> None:
    assert got.dtype == case.q.dtype and got.shape == case.q.shape
    np.testing.assert_allclose(
        to_f64(got),
        reference_prefill_attention(case),
        atol=KERNEL_ATOL[dtype],
        rtol=KERNEL_RTOL[dtype],
        err_msg=what,
    )


def ops_args(case: Case) -> tuple:
    """The arguments of ``paged_attention_ops`` / ``paged_prefill_attention``, in order."""
    c = case
    return (c.q, c.kv_pool, c.block_tables, c.context_lens, c.positions, c.scale)


def run_ops(case: Case) -> mx.array:
    return paged_attention_ops(*ops_args(case))


def run_kernel(case: Case) -> mx.array:
    return twice(paged_prefill_attention, *ops_args(case))


def case_rows(case: Case) -> ContextRows:
    c = case
    return context_rows(c.block_tables, c.context_lens, c.positions, c.kv_pool.shape[1], c.q.dtype)


def run_gathered(case: Case, rows: ContextRows | None = None) -> mx.array:
    return gathered_attention(case.q, case.kv_pool, rows or case_rows(case), case.scale)


def template_grid(test):
    """Parametrize ``test(head_dim, heads, block_size, dtype)`` over the templates the
    ops-path tests share (fewer than the kernel's: each ops case is slow on the CPU)."""
    test = pytest.mark.parametrize("head_dim", HEAD_DIMS)(test)
    test = pytest.mark.parametrize(
        "heads", [(32, 4), (8, 8), (32, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv"
    )(test)
    test = pytest.mark.parametrize("block_size", [8, 32])(test)
    return pytest.mark.parametrize("dtype", DTYPES)(test)


# -- the reference is the oracle: check it against the ops twin (CPU) ------------------


@template_grid
def test_reference_matches_ops_twin(
    head_dim: int, heads: tuple[int, int], block_size: int, dtype: str
) -> None:
    for t, prefix in OPS_COMBOS:
        case = grid_case(prefix, t, heads, head_dim, block_size, dtype)
        assert_matches_reference(run_ops(case), case, dtype, f"T={t} prefix={prefix}")


def test_reference_matches_ops_twin_long_chunk() -> None:
    """The grid's longest chunk after its longest prefix, once."""
    case = grid_case("1000", 512, (8, 2), 64, 16, "float32")
    assert_matches_reference(run_ops(case), case, "float32")


# -- the poison and the shuffle catch the bugs they are there for ----------------------


def test_unowned_slots_hold_nan() -> None:
    case = make_case([5, 8, 0], 3, 8, 2, 64, 8, "float32", seed=1)
    kv = np.array(case.kv_pool)
    owned = np.isfinite(kv).all(axis=(2, 3, 4))  # (num_blocks, block_size)
    assert owned.sum() == int(np.array(case.context_lens).sum())
    assert np.isnan(kv[~owned]).all()  # the K and the V half
    # Each sequence's slot just past its context (a partial block's tail, or the
    # padding block) is poisoned.
    tables, bs = np.array(case.block_tables), case.kv_pool.shape[1]
    for b, n in enumerate(np.array(case.context_lens)):
        assert not owned[tables[b, n // bs], n % bs]


def test_poison_catches_reading_past_context_len() -> None:
    # Context 8 (a full block, then the padding block) and 11 (a partial block).
    case = make_case([5, 8], 3, 8, 2, 64, 8, "float32", seed=2)
    want = reference_prefill_attention(case)
    assert np.isfinite(want).all()
    # A reader that loads one slot too many, even masked out, turns the output NaN.
    assert np.isnan(reference_prefill_attention(case, read_past=1)).any()
    # So does the ops twin told the context is one token longer.
    over = replace(case, context_lens=case.context_lens + 1, positions=case.positions + 1)
    with pytest.raises(AssertionError):
        assert_matches_reference(run_ops(over), case, "float32")


def test_shuffled_tables_catch_ignoring_the_table() -> None:
    case = make_case([40, 9], 5, 8, 2, 64, 8, "float32", seed=3)
    in_pool_order = mx.sort(case.block_tables, axis=1)  # right blocks, wrong order
    with pytest.raises(AssertionError):
        assert_matches_reference(
            run_ops(replace(case, block_tables=in_pool_order)), case, "float32"
        )


def test_causal_mask_is_checked() -> None:
    """Letting each query see one key past its position (an off-by-one causal mask)
    fails the check: the new tokens after it hold real keys."""
    case = make_case([20, 3], 7, 8, 2, 64, 8, "float32", seed=4)
    shifted = replace(case, positions=case.positions + 1)
    with pytest.raises(AssertionError):
        assert_matches_reference(run_ops(shifted), case, "float32")


# -- the gathered path (long chunks on a GPU; plain MLX ops, so any backend runs it) ----


@template_grid
def test_gathered_attention(
    head_dim: int, heads: tuple[int, int], block_size: int, dtype: str
) -> None:
    """On a GPU the whole grid of chunks and prefixes; on the CPU the twin's subset."""
    combos = [(t, p) for t in CHUNKS for p in PREFIXES] if ON_GPU else OPS_COMBOS
    for t, prefix in combos:
        case = grid_case(prefix, t, heads, head_dim, block_size, dtype)
        assert_matches_reference(run_gathered(case), case, dtype, f"T={t} prefix={prefix}")


def test_context_rows() -> None:
    """Slots follow the table token by token; past a sequence's length they repeat
    its token 0's row; the mask is 0 exactly where the reference lets a query see."""
    case = make_case([20, 3], 5, 8, 2, 64, 8, "float16", seed=9)
    rows = case_rows(case)
    tables, lengths = np.array(case.block_tables), np.array(case.context_lens)
    width = tables.shape[1] * 8
    assert rows.slots.shape == (2, width) and rows.mask.shape == (2, 1, 5, width)
    assert rows.mask.dtype == mx.float16
    for b, n in enumerate(lengths):
        tok = np.arange(width)
        want = np.where(tok < n, tables[b, tok // 8] * 8 + tok % 8, tables[b, 0] * 8)
        np.testing.assert_array_equal(np.array(rows.slots[b]), want)
        pos = np.array(case.positions[b])
        visible = (tok[None, :] <= pos[:, None]) & (tok[None, :] < n)
        mask = np.array(rows.mask[b, 0].astype(mx.float32))
        assert (mask[visible] == 0).all() and (mask[~visible] == -np.inf).all()


def test_gathered_rows_keep_the_poison_out() -> None:
    """Rows past a sequence's length are masked, but a gather of the unowned (NaN) slots
    they point to would still turn the output NaN (0 * NaN): repeating token 0's row
    is what keeps them out."""
    case = make_case([20, 3], 5, 8, 2, 64, 8, "float32", seed=10)
    rows = case_rows(case)
    batch, width = case.block_tables.shape
    raw = (case.block_tables[:, :, None] * 8 + mx.arange(8)).reshape(batch, width * 8)
    assert np.isfinite(np.array(run_gathered(case, rows))).all()
    assert np.isnan(np.array(run_gathered(case, ContextRows(raw, rows.mask)))).any()


def test_gathered_mask_is_checked() -> None:
    """A mask one position late (each query sees the next new token) fails the check."""
    case = make_case([20, 3], 7, 8, 2, 64, 8, "float32", seed=11)
    late = case_rows(replace(case, positions=case.positions + 1))
    with pytest.raises(AssertionError):
        assert_matches_reference(run_gathered(case, late), case, "float32")


@template_grid
def test_gathered_causal_attention(
    head_dim: int, heads: tuple[int, int], block_size: int, dtype: str
) -> None:
    """One sequence's chunk over exactly its context rows and MLX's causal mask (what
    ``StepPlan.chunk_context`` runs): every chunk and prefix on a GPU, the twin's on the CPU."""
    combos = [(t, p) for t in CHUNKS for p in PREFIXES] if ON_GPU else OPS_COMBOS
    for t, prefix in combos:
        longest = prefix_len(prefix, block_size)
        case = make_case([longest], t, *heads, head_dim, block_size, dtype)
        rows = exact_rows(case)
        assert rows.mask is None and rows.slots.shape == (1, longest + t)
        assert_matches_reference(run_gathered(case, rows), case, dtype, f"T={t} prefix={prefix}")


def exact_rows(case: Case) -> ContextRows:
    c = case
    n = int(c.context_lens[0])
    return context_rows(
        c.block_tables, c.context_lens, c.positions, c.kv_pool.shape[1], c.q.dtype, n
    )


def test_causal_rows_must_be_exactly_the_context() -> None:
    """MLX's causal mask lines the queries up with the last keys: rows one slot longer or
    one shorter shift every query's view and fail the check; a batch is refused."""
    case = make_case([20], 7, 8, 2, 64, 8, "float32", seed=12)
    rows = exact_rows(case)
    assert_matches_reference(run_gathered(case, rows), case, "float32")
    n = rows.slots.shape[1]
    table_rows = context_rows(case.block_tables, case.context_lens, case.positions, 8, mx.float32)
    for wrong in (n - 1, n + 1):
        off = ContextRows(table_rows.slots[:, :wrong], None)
        with pytest.raises(AssertionError):
            assert_matches_reference(run_gathered(case, off), case, "float32")
    two = make_case([20, 3], 7, 8, 2, 64, 8, "float32", seed=12)
    with pytest.raises(ValueError, match="one sequence"):
        context_rows(two.block_tables, two.context_lens, two.positions, 8, mx.float32, 27)


# -- the launch ------------------------------------------------------------------------


@pytest.mark.parametrize("heads", HEAD_COUNTS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_call_args(head_dim: int, heads: tuple[int, int]) -> None:
    """One group per (KV head, sequence x query tile); rows per group near the target."""
    n_heads, n_kv = heads
    q, kv_pool = mx.zeros((3, n_heads, 7, head_dim)), mx.zeros((9, 16, 2, n_kv, head_dim))
    assert supports(q, kv_pool)
    args = call_args(q, kv_pool, 0.125)
    template = dict(args["template"])
    group, tile = template["GROUP_SIZE"], template["Q_TILE"]
    assert group == n_heads // n_kv and tile >= 1
    assert group * tile <= max(group, TARGET_ROWS[head_dim])
    assert args["grid"] == (args["threadgroup"][0], n_kv, 3 * math.ceil(7 / tile))


def test_supports() -> None:
    q, kv_pool = mx.zeros((2, 8, 5, 64)), mx.zeros((4, 16, 2, 2, 64))
    assert supports(q, kv_pool)
    assert not supports(mx.zeros((2, 8, 5, 16)), mx.zeros((4, 16, 2, 2, 16)))  # head size
    assert not supports(q.astype(mx.int32), kv_pool)
    assert not supports(q, mx.zeros((4, 16, 2, 3, 64)))  # 8 heads on 3 KV heads
    # 64 query heads on one KV head at head_dim 128: the queries outgrow shared memory.
    assert not supports(mx.zeros((1, 64, 5, 128)), mx.zeros((4, 16, 2, 1, 128)))
    # Only the one K and V pool: not a pool of the old layout, nor axis 2 other than 2.
    assert not supports(q, mx.zeros((4, 16, 2, 64)))
    assert not supports(q, mx.zeros((4, 16, 4, 2, 64)))


@pytest.mark.skipif(ON_GPU, reason="the CPU backend's refusal")
def test_kernel_needs_a_gpu() -> None:
    case = make_case([3], 2, 8, 2, 64, 8, "float32")
    with pytest.raises(RuntimeError):
        run_kernel(case)


@pytest.mark.gpu
def test_kernel_refuses_unsupported_shapes() -> None:
    case = make_case([3], 2, 4, 2, 16, 8, "float32")
    with pytest.raises(ValueError):
        run_kernel(case)
    case = make_case([3], 2, 8, 2, 64, 8, "float32")
    with pytest.raises(ValueError):
        run_kernel(replace(case, positions=case.positions[:, :1]))


# -- the kernel (GPU) ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", HEAD_COUNTS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_kernel(head_dim: int, heads: tuple[int, int], block_size: int, dtype: str) -> None:
    for t in CHUNKS:
        for prefix in PREFIXES:
            case = grid_case(prefix, t, heads, head_dim, block_size, dtype)
            assert_matches_reference(run_kernel(case), case, dtype, f"T={t} prefix={prefix}")


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 4), (8, 8)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_kernel_any_positions(heads: tuple[int, int]) -> None:
    """Per-row masks: positions out of order, repeated, and past the context (which
    then limits what a query sees), so rows of one tile see very different keys."""
    case = make_case([50, 0, 200], 37, *heads, 64, 16, "float32", seed=5)
    rng = np.random.default_rng(6)
    ctx = np.array(case.context_lens)
    positions = np.stack([rng.integers(0, n + 5, size=37) for n in ctx]).astype(np.int32)
    case = replace(case, positions=mx.array(positions))
    assert_matches_reference(run_kernel(case), case, "float32")


@pytest.mark.gpu
def test_kernel_large_batch_long_context() -> None:
    case = make_case([4000, 5, 2048] + [33] * 29, 96, 32, 4, 128, 16, "bfloat16", seed=7)
    assert_matches_reference(run_kernel(case), case, "bfloat16")


@pytest.mark.gpu
def test_kernel_agrees_with_the_ops_twin() -> None:
    case = make_case([300, 17], 45, 32, 8, 128, 16, "float32", seed=8)
    np.testing.assert_allclose(
        to_f64(run_kernel(case)), to_f64(run_ops(case)), atol=KERNEL_ATOL["float32"], rtol=0
    )
