"""impl's paged cache (impl.paged_cache), driven directly: block allocation, plans,
fork / copy-on-write, release, trim, and the all-or-nothing behaviour when the pool runs
out. Integers are compared exactly. The random walk over all of it (batches, forks,
trims) is test_all_or_nothing's BatchMachine; the cache accounting of the engine under
test is test_cache_accounting's."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from conform_mlx.impl.config import LlamaConfig
from conform_mlx.impl.paged_cache import (
    SMALL_POOL_BYTES,
    BlockAllocator,
    CacheFullError,
    PagedKVCache,
    StepPlan,
    TableArrays,
    step_fields,
)

pytestmark = pytest.mark.impl_only("tests impl's paged cache (impl.paged_cache), not an engine")

CFG = LlamaConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=256,
)
BLOCK_SIZES = [1, 4, 16]
TOKEN_COUNTS = [1, 3, 4, 5, 15, 16, 17, 33]


def snapshot(cache: PagedKVCache) -> tuple:
    """Everything the accounting consists of, for 'nothing changed' checks."""
    a = cache.allocator
    return (
        {s: cache.block_table(s) for s in cache.sequences},
        {s: cache.tokens(s) for s in cache.sequences},
        a.free_list,
        [a.refcount(b) for b in range(a.num_blocks)],
    )


def check_invariants(cache: PagedKVCache) -> None:
    a = cache.allocator
    holders = [0] * cache.num_blocks
    for s in cache.sequences:
        assert cache.blocks_used(s) == math.ceil(cache.tokens(s) / cache.block_size)
        for b in cache.block_table(s):
            holders[b] += 1
    assert [a.refcount(b) for b in range(cache.num_blocks)] == holders
    assert a.num_free + a.num_used == cache.num_blocks
    assert a.num_used == sum(h > 0 for h in holders)


def fill(cache: PagedKVCache, seq, n: int, value: float | list[float]) -> None:
    """Append n tokens to seq and write ``value`` (one per token, or one for all)
    into their K rows (and its negative into V) in every layer."""
    plan = cache.plan([seq], n)
    shape = (n, CFG.num_key_value_heads, CFG.dim_per_head)
    rows = mx.broadcast_to(mx.array(value, dtype=mx.float32).reshape(-1, 1, 1), shape)
    for layer, pool in enumerate(cache.kv):
        kv = pool.reshape(-1, 2, *shape[1:])  # one row per slot: its K heads, then its V heads
        kv[plan.slots] = mx.stack([rows, -rows], axis=1)
        cache.update_layer(layer, kv.reshape(pool.shape))


def rows(cache: PagedKVCache, seq, layer: int = 0) -> np.ndarray:
    """seq's cached K rows in token order (tokens, kv_heads, head_dim)."""
    bs = cache.block_size
    slots = [cache.block_table(seq)[p // bs] * bs + p % bs for p in range(cache.tokens(seq))]
    flat = np.array(cache.kv[layer]).reshape(-1, 2, CFG.num_key_value_heads, CFG.dim_per_head)
    return flat[slots, 0]


def test_allocator_free_list_and_refcounts():
    a = BlockAllocator(4)
    got = a.allocate(3)
    assert got == [0, 1, 2]
    assert (a.num_free, a.num_used) == (1, 3)
    a.incref(1)
    a.decref(1)
    assert a.refcount(1) == 1 and a.num_free == 1
    a.decref(1)
    assert a.refcount(1) == 0 and a.num_free == 2
    with pytest.raises(CacheFullError, match="need 3 free block"):
        a.allocate(3)
    assert a.num_free == 2


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
def test_blocks_used_is_ceil_tokens_over_block_size(block_size: int, tokens: int):
    cache = PagedKVCache(CFG, num_blocks=64, block_size=block_size)
    cache.add_sequence("a")
    for chunk in (tokens // 2, tokens - tokens // 2):
        if chunk:
            cache.plan(["a"], chunk)
    assert cache.tokens("a") == tokens
    assert cache.blocks_used("a") == math.ceil(tokens / block_size)
    check_invariants(cache)


def test_plan_slots_positions_and_tables():
    cache = PagedKVCache(CFG, num_blocks=8, block_size=4)
    cache.add_sequence("a")
    cache.add_sequence("b")
    cache.plan(["a"], 6)  # blocks 0, 1
    cache.plan(["b"], 3)  # block 2
    plan = cache.plan(["a", "b"], 1)
    assert plan.positions.tolist() == [[6], [3]]
    assert plan.slots.tolist() == [1 * 4 + 2, 2 * 4 + 3]
    assert plan.block_tables.tolist() == [[0, 1], [2, 0]]
    assert plan.context_lens.tolist() == [7, 4]


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_plan_fields_at_any_batch(batch: int):
    """Each sequence's fields, whether made one array each (batch 1 and 2: each
    field fits MLX's small pool) or as views of one packed array (batch 3 and up)."""
    cache = PagedKVCache(CFG, num_blocks=32, block_size=4)
    seqs = [f"s{b}" for b in range(batch)]
    for b, s in enumerate(seqs):
        cache.add_sequence(s)
        cache.plan([s], 2 + 3 * b)
    plan = cache.plan(seqs, 1)
    for b, s in enumerate(seqs):
        pos = 2 + 3 * b
        table = cache.block_table(s)
        assert plan.positions[b].tolist() == [pos]
        assert plan.slots[b].item() == table[pos // 4] * 4 + pos % 4
        assert (plan.blocks[b].item(), plan.offsets[b].item()) == (table[pos // 4], pos % 4)
        assert plan.context_lens[b].item() == pos + 1
    small = all(a.nbytes <= SMALL_POOL_BYTES for a in (plan.positions, plan.context_lens))
    assert small == (batch <= 2)


def test_step_fields_pack_only_what_outgrows_the_small_pool():
    one_each = step_fields([[7], [1, 2]])
    assert [a.tolist() for a in one_each] == [[7], [1, 2]]
    assert all(a.nbytes <= SMALL_POOL_BYTES for a in one_each)
    packed = step_fields([[7, 8, 9], [1], []])
    assert [a.tolist() for a in packed] == [[7, 8, 9], [1], []]


def padded_tables(cache: PagedKVCache, seqs: list, plan: StepPlan) -> list[list[int]]:
    """What ``plan.block_tables`` must hold: each table padded with block 0."""
    width = plan.block_tables.shape[1]
    return [cache.block_table(s) + [0] * (width - cache.blocks_used(s)) for s in seqs]


def check_tables_follow_every_change() -> None:
    """Decode across a block edge, fork and copy-on-write, trim, release and reuse:
    after each, the plan's tables are the cache's; between edges a decode step gets
    the array it had (the GPU already holds it)."""
    cache = PagedKVCache(CFG, num_blocks=16, block_size=4)
    cache.add_sequence("a")

    def step(seqs: list, n: int = 1) -> StepPlan:
        plan = cache.plan(seqs, n)
        assert plan.block_tables.tolist() == padded_tables(cache, seqs, plan)
        return plan

    step(["a"], 5)
    first = step(["a"])  # token 6, block 1
    assert step(["a"]).block_tables is first.block_tables  # token 7, same tables
    step(["a"], 2)  # block 2
    cache.fork("a", "b")
    step(["b"])  # b copies a's shared partial block: a new last block
    step(["a", "b"])
    cache.trim("a", 6)
    step(["a"])
    cache.release("a")
    cache.add_sequence("c")
    step(["c"], 3)  # blocks a let go of
    step(["b", "c"])


def test_plan_tables_follow_every_change():
    check_tables_follow_every_change()


def test_tables_check_catches_stale_tables(monkeypatch) -> None:
    """Tables remembered by their width alone go stale at the fork: the check fails."""

    def by_width(self, tables: list[int], width: int) -> mx.array:
        if self.key != width:
            self.key, self.array = width, mx.array(tables, mx.int32).reshape(-1, width)
        return self.array

    monkeypatch.setattr(TableArrays, "__call__", by_width)
    with pytest.raises(AssertionError):
        check_tables_follow_every_change()


def test_release_returns_every_block():
    cache = PagedKVCache(CFG, num_blocks=8, block_size=4)
    cache.add_sequence("a")
    cache.plan(["a"], 13)
    assert cache.allocator.num_free == 4
    cache.release("a")
    assert cache.allocator.num_free == 8 and cache.sequences == []
    check_invariants(cache)


def test_fork_shares_full_blocks_and_copies_partial_on_write():
    cache = PagedKVCache(CFG, num_blocks=8, block_size=4)
    cache.add_sequence("parent")
    fill(cache, "parent", 6, 1.0)  # one full block, one partial (2 of 4)
    cache.fork("parent", "child")
    full, partial = cache.block_table("parent")
    assert cache.block_table("child") == [full, partial]
    assert cache.allocator.refcount(full) == 2 and cache.allocator.refcount(partial) == 2
    check_invariants(cache)

    fill(cache, "child", 1, 7.0)  # writes into the shared partial block: copy first
    child_table = cache.block_table("child")
    assert child_table[0] == full and child_table[1] != partial
    assert cache.allocator.refcount(full) == 2
    assert cache.allocator.refcount(partial) == 1
    np.testing.assert_array_equal(rows(cache, "child")[:6], rows(cache, "parent"))
    assert (rows(cache, "child")[6] == 7.0).all()
    assert (rows(cache, "parent") == 1.0).all()  # the parent never saw the child's write
    check_invariants(cache)

    fill(cache, "parent", 1, 3.0)  # the parent now owns its block alone: no copy
    assert cache.block_table("parent") == [full, partial]
    assert (rows(cache, "child")[6] == 7.0).all()
    check_invariants(cache)


def test_fork_at_block_boundary_needs_no_copy():
    cache = PagedKVCache(CFG, num_blocks=8, block_size=4)
    cache.add_sequence("p")
    cache.plan(["p"], 8)
    cache.fork("p", "c")
    cache.plan(["c"], 1)
    assert cache.block_table("c")[:2] == cache.block_table("p")
    assert cache.allocator.num_used == 3
    check_invariants(cache)


def test_release_of_a_forked_parent_keeps_shared_blocks():
    cache = PagedKVCache(CFG, num_blocks=8, block_size=4)
    cache.add_sequence("p")
    cache.plan(["p"], 6)
    cache.fork("p", "c")
    cache.release("p")
    assert cache.allocator.num_used == 2
    assert all(cache.allocator.refcount(b) == 1 for b in cache.block_table("c"))
    check_invariants(cache)


@pytest.mark.parametrize("shared_partial", [False, True])
def test_out_of_blocks_raises_and_changes_nothing(shared_partial: bool):
    cache = PagedKVCache(CFG, num_blocks=4, block_size=4)
    cache.add_sequence("a")
    cache.plan(["a"], 6 if shared_partial else 8)
    if shared_partial:
        cache.fork("a", "b")
    else:
        cache.add_sequence("b")
        cache.plan(["b"], 4)
    before = snapshot(cache)
    pools = [np.array(p) for p in cache.kv]
    with pytest.raises(CacheFullError, match=r"need \d+ free block\(s\), have \d+ of 4"):
        cache.plan(["a", "b"], 9)
    assert snapshot(cache) == before
    for p, q in zip(pools, cache.kv):
        np.testing.assert_array_equal(p, np.array(q))
    check_invariants(cache)


def test_bad_sequence_arguments_are_refused_without_changes():
    cache = PagedKVCache(CFG, num_blocks=4, block_size=4)
    cache.add_sequence("a")
    before = snapshot(cache)
    with pytest.raises(KeyError, match="unknown sequence 'zz'"):
        cache.plan(["a", "zz"], 1)
    with pytest.raises(ValueError, match="appears twice"):
        cache.plan(["a", "a"], 1)
    with pytest.raises(KeyError, match="already exists"):
        cache.add_sequence("a")
    with pytest.raises(ValueError, match="num_new must be positive"):
        cache.plan(["a"], 0)
    assert snapshot(cache) == before


def test_pool_stores_only_kv_heads():
    cache = PagedKVCache(CFG, num_blocks=3, block_size=4, dtype=mx.float16)
    assert cache.kv[0].shape == (3, 4, 2, CFG.num_key_value_heads, CFG.dim_per_head)
    expected = 2 * CFG.num_hidden_layers * CFG.num_key_value_heads * CFG.dim_per_head * 2 * 3 * 4
    assert cache.nbytes == expected


# -- trim: dropping a sequence's last tokens ----------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("have,drop", [(17, 1), (17, 2), (16, 16), (33, 17), (5, 9)])
def test_trim_counts_exactly(block_size: int, have: int, drop: int) -> None:
    cache = PagedKVCache(CFG, 40, block_size)
    cache.add_sequence("s")
    cache.plan(["s"], have)
    free = cache.allocator.num_free
    assert cache.trim("s", drop) == min(drop, have)
    left = max(0, have - drop)
    assert cache.tokens("s") == left
    freed = math.ceil(have / block_size) - math.ceil(left / block_size)
    assert cache.allocator.num_free == free + freed
    check_invariants(cache)


def test_trim_then_append_overwrites_the_dropped_rows() -> None:
    cache = PagedKVCache(CFG, 8, 4)
    cache.add_sequence("s")
    fill(cache, "s", 6, [1, 2, 3, 4, 5, 6])
    cache.trim("s", 3)
    fill(cache, "s", 2, [7, 8])
    np.testing.assert_array_equal(rows(cache, "s")[:, 0, 0], [1, 2, 3, 7, 8])


def test_trim_into_a_shared_block_copies_it_on_the_next_write() -> None:
    cache = PagedKVCache(CFG, 8, 4)
    cache.add_sequence("a")
    fill(cache, "a", 8, list(range(1, 9)))
    cache.fork("a", "b")
    cache.trim("b", 1)  # b's last block is now a shared partial block
    fill(cache, "b", 1, [9])
    np.testing.assert_array_equal(rows(cache, "a")[:, 0, 0], range(1, 9))  # a intact
    np.testing.assert_array_equal(rows(cache, "b")[:, 0, 0], [1, 2, 3, 4, 5, 6, 7, 9])
    check_invariants(cache)


def test_trim_rejects_bad_input_and_changes_nothing() -> None:
    cache = PagedKVCache(CFG, 8, 4)
    cache.add_sequence("s")
    cache.plan(["s"], 5)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="negative"):
        cache.trim("s", -1)
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.trim("t", 1)
    assert snapshot(cache) == before


def test_trim_check_catches_blocks_kept_after_trim(monkeypatch) -> None:
    """A trim that lowers the count but keeps its blocks must fail the counts check."""

    # The token count drops, but no block trim lets go of returns to the free list.
    monkeypatch.setattr(BlockAllocator, "decref", lambda self, block: None)
    with pytest.raises(AssertionError):
        test_trim_counts_exactly(4, 17, 2)


def test_plan_is_fresh_only_when_every_sequence_was_empty() -> None:
    cache = PagedKVCache(CFG, 8, 4)
    cache.add_sequence("a")
    cache.add_sequence("b")
    assert cache.plan(["a"], 5).fresh
    assert not cache.plan(["a"], 1).fresh
    assert not cache.plan(["a", "b"], 1).fresh  # b is empty, a is not
    cache.trim("a", cache.tokens("a"))
    assert cache.plan(["a"], 2).fresh  # trimmed back to nothing: empty again


def test_plan_names_a_chunks_context() -> None:
    """chunk_context: one sequence's context after a chunk of more than one token over its
    cache (causal attention's static length); 0 for a first chunk, a decode or a batch."""
    cache = PagedKVCache(CFG, 8, 4)
    cache.add_sequence("a")
    cache.add_sequence("b")
    assert cache.plan(["a"], 5).chunk_context == 0  # fresh
    assert cache.plan(["a"], 3).chunk_context == 8
    assert cache.plan(["a"], 1).chunk_context == 0  # a decode step
    assert cache.plan(["b"], 2).chunk_context == 0
    assert cache.plan(["a", "b"], 2).chunk_context == 0  # a batch: masked rows
