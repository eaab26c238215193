"""All or nothing: a call that raises leaves the cache exactly as it was (docs/api.md),
and a step that fits is never refused (issue 11).

"Exactly as it was" is ``snapshot`` from test_paged_cache: every block table,
token count, refcount and the free list in order. The cases: ``generate`` checks the
whole run up front; a cache made for another config is refused before anything is
reserved; every public cache method refuses arguments of the wrong type; a batch
counts copy-on-write per shared block, as appending one sequence at a time would.

``BatchMachine`` drives all of it at random (add, fork, trim, release, batched
appends, refused calls) against an oracle for "does this batch fit" that shares no
code with the cache. Its size is a settings profile named by the environment
(hypothesis' own ``--hypothesis-profile`` is read when pytest starts, before this
module could register a profile):

    CACHE_MACHINE_PROFILE=deep pytest suites/test_all_or_nothing.py -k batch_machine

``ci`` (the default): 60 examples of up to 40 steps, about 2,000 steps in 3 s.
``deep``: 4,000 examples, about 137,000 steps in 90 s (one CPU core).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import conform_mlx.impl.model
from conform_mlx.impl.engine import InputError, decode, generate, prefill
from conform_mlx.impl.paged_cache import CacheFullError, PagedKVCache
from suites.test_paged_cache import CFG, check_invariants, rows, snapshot

pytestmark = [
    pytest.mark.impl_only("tests impl's paged cache and engine under refused calls"),
    pytest.mark.checkpoint_group("tiny-gqa8"),
]

SHAPE = "tiny-gqa8"
# (field, value) of a config whose cache the tiny-gqa8 model must refuse.
OTHER_SHAPES = [("num_key_value_heads", 4), ("head_dim", 8), ("num_hidden_layers", 3)]


@pytest.fixture(scope="module")
def model(checkpoint, model_factory):
    return model_factory(checkpoint(SHAPE))


# -- generate: the whole run is checked before the first step -----------------------------
def test_generate_past_the_pool_raises_and_changes_nothing(model):
    """Issue 11: 3 + 10 tokens feed 12 rows, 3 blocks of 4, in a pool of 2."""
    cache = PagedKVCache(model.config, 2, 4)
    before = snapshot(cache)
    with pytest.raises(CacheFullError, match=r"feed 12; .* need 3 free block\(s\), have 2"):
        generate(model, [1, 264, 319], 10, cache=cache, seq="g")
    assert snapshot(cache) == before  # no sequence "g", both blocks free


def test_generate_counts_what_the_sequence_already_holds(model):
    cache = PagedKVCache(model.config, 3, 4)
    cache.add_sequence("g")
    prefill(model, cache, "g", [1, 2, 3, 4, 5])  # 2 blocks, 1 free
    before = snapshot(cache)
    with pytest.raises(CacheFullError, match=r"\(5 cached\)"):
        generate(model, [6, 7], 7, cache=cache, seq="g", eos_token_ids=[])  # 5 + 8: 4 blocks
    assert snapshot(cache) == before
    gen = generate(model, [6, 7], 6, cache=cache, seq="g", eos_token_ids=[])  # 5 + 7: 3 blocks
    assert len(gen.tokens) == 6 and cache.tokens("g") == 5 + 2 + 6 - 1
    assert cache.allocator.num_free == 0


def test_generate_counts_the_copy_of_a_shared_block(model):
    """A fork's first write copies its shared partial last block: one block more."""
    cache = PagedKVCache(model.config, 3, 4)
    cache.add_sequence("p")
    prefill(model, cache, "p", [1, 2, 3, 4, 5, 6])  # blocks 0, 1 (partial); 1 free
    cache.fork("p", "q")
    before = snapshot(cache)
    with pytest.raises(CacheFullError, match="need 2 free block"):
        generate(model, [7], 3, cache=cache, seq="q", eos_token_ids=[])  # copy + 1 new
    assert snapshot(cache) == before
    generate(model, [7], 2, cache=cache, seq="q", eos_token_ids=[])  # the copy alone
    assert cache.tokens("q") == 8 and cache.allocator.num_free == 0


def test_generate_past_the_context_with_cached_tokens_changes_nothing(model):
    limit = model.config.max_position_embeddings
    cache = PagedKVCache.for_tokens(model.config, limit + 16, 16)
    cache.add_sequence("g")
    prefill(model, cache, "g", [1] * (limit - 4))
    before = snapshot(cache)
    with pytest.raises(InputError, match=rf"{limit - 4} cached .* = {limit + 1} exceeds"):
        generate(model, [1, 2], 4, cache=cache, seq="g", eos_token_ids=[])
    assert snapshot(cache) == before


# -- a cache made for another config -----------------------------------------------------
@pytest.mark.parametrize("field,value", OTHER_SHAPES)
def test_a_cache_of_another_shape_is_refused_before_anything_is_reserved(model, field, value):
    other = dataclasses.replace(model.config, **{field: value})
    cache = PagedKVCache(other, 8, 4)
    cache.add_sequence("s")
    cache.plan(["s"], 3)  # so that decode has a context to extend
    before = snapshot(cache)
    calls = [
        lambda: prefill(model, cache, "s", [1, 2, 3]),
        lambda: prefill(model, cache, "s", [1, 2, 3], chunk_size=1),
        lambda: decode(model, cache, ["s"], [1]),
        lambda: generate(model, [1, 2], 4, cache=cache, seq="s"),
        lambda: generate(model, [1, 2], 4, cache=cache, seq="new"),
    ]
    for call in calls * 2:  # a retry takes nothing either
        with pytest.raises(ValueError, match=field):
            call()
        assert snapshot(cache) == before
    with pytest.raises(conform_mlx.impl.model.CacheMismatchError):
        calls[0]()


def test_pools_in_the_old_two_pool_layout_are_refused(model):
    """Pools of (num_blocks, block_size, kv_heads, head_dim), one for K and one for V as
    the cache once held them, are named as the wrong layout before any step runs."""
    cache = PagedKVCache(model.config, 8, 4)
    cache.add_sequence("s")
    before = snapshot(cache)
    half = cache.kv[0][:, :, 0]
    cache.kv = [half] * len(cache.kv)
    with pytest.raises(
        conform_mlx.impl.model.CacheMismatchError, match=r"not \(num_blocks, block_size, 2,"
    ):
        prefill(model, cache, "s", [1, 2, 3])
    assert snapshot(cache) == before


# -- argument types -----------------------------------------------------------------------
# name -> (call on a cache and one of its sequences, the argument its TypeError names)
BAD_CALLS = {
    "trim float": (lambda c, s: c.trim(s, 1.5), "n"),
    "trim numpy float": (lambda c, s: c.trim(s, np.float64(1.0)), "n"),
    "trim bool": (lambda c, s: c.trim(s, True), "n"),
    "trim str": (lambda c, s: c.trim(s, "1"), "n"),
    "plan float": (lambda c, s: c.plan([s], 2.0), "num_new"),
    "plan bool": (lambda c, s: c.plan([s], True), "num_new"),
    "plan str seqs": (lambda c, s: c.plan(s, 1), "seqs"),
    "plan unhashable id": (lambda c, s: c.plan([[s]], 1), "sequence id"),
    "ensure_room float": (lambda c, s: c.ensure_room([s], 0.5), "num_new"),
    "block_needs numpy float": (lambda c, s: c.block_needs([s], np.float32(1)), "num_new"),
    "fork unhashable child": (lambda c, s: c.fork(s, ["c"]), "child"),
    "fork unhashable parent": (lambda c, s: c.fork({s}, "c"), "parent"),
    "add_sequence unhashable": (lambda c, s: c.add_sequence(["c"]), "sequence id"),
    "release unhashable": (lambda c, s: c.release([s]), "sequence id"),
    "tokens unhashable": (lambda c, s: c.tokens({}), "sequence id"),
    "allocate float": (lambda c, s: c.allocator.allocate(1.0), "n"),
    "refcount float": (lambda c, s: c.allocator.refcount(0.0), "block"),
    "incref bool": (lambda c, s: c.allocator.incref(False), "block"),
    "decref numpy float": (lambda c, s: c.allocator.decref(np.float64(0)), "block"),
}
# Not block_needs: the planted bugs below replace it, checks and all.
MACHINE_BAD_CALLS = sorted(k for k in BAD_CALLS if not k.startswith("block_needs"))


def forked_cache() -> PagedKVCache:
    cache = PagedKVCache(CFG, 8, 4)
    cache.add_sequence("a")
    cache.plan(["a"], 5)
    cache.fork("a", "b")
    return cache


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_an_argument_of_the_wrong_type_is_refused_and_changes_nothing(case):
    call, name = BAD_CALLS[case]
    cache = forked_cache()
    before = snapshot(cache)
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        call(cache, "a")
    assert snapshot(cache) == before


# name -> (call with a model and a cache holding "s", the start of its TypeError)
BAD_ENGINE_CALLS = {
    "prefill chunk_size float": (
        lambda m, c: prefill(m, c, "s", [1, 2, 3], chunk_size=1.5),
        "chunk_size must be an int",
    ),
    "prefill chunk_size bool": (
        lambda m, c: prefill(m, c, "s", [1, 2, 3], chunk_size=True),
        "chunk_size must be an int",
    ),
    "generate max_new_tokens float": (
        lambda m, c: generate(m, [1, 2], 2.5, cache=c, seq="s"),
        "max_new_tokens must be an int",
    ),
    "decode str seqs": (lambda m, c: decode(m, c, "s", [1]), "seqs must be a list"),
}


@pytest.mark.parametrize("case", list(BAD_ENGINE_CALLS))
def test_engine_arguments_of_the_wrong_type_are_refused(model, case):
    call, pattern = BAD_ENGINE_CALLS[case]
    cache = PagedKVCache(model.config, 8, 4)
    cache.add_sequence("s")
    before = snapshot(cache)
    with pytest.raises(TypeError, match=f"^{pattern}"):
        call(model, cache)
    assert snapshot(cache) == before


def test_numpy_integers_are_counts():
    cache = forked_cache()
    cache.plan(["a", "b"], np.int32(2))
    assert cache.trim("a", np.int64(3)) == 3
    assert cache.allocator.refcount(np.int16(0)) == 2
    assert (cache.tokens("a"), cache.tokens("b")) == (4, 7)
    check_invariants(cache)


# -- copy-on-write counted per block --------------------------------------------------------
def test_a_fork_and_its_parent_decode_together_in_the_last_free_block(model):
    """Issue 11: p copies the shared block, then q owns it alone and writes in place."""
    cache = PagedKVCache(model.config, 3, 4)
    cache.add_sequence("p")
    prefill(model, cache, "p", [1, 2, 3, 4, 5, 6])
    cache.fork("p", "q")
    full, partial = cache.block_table("p")
    decode(model, cache, ["p", "q"], [7, 8])
    assert cache.block_table("p") == [full, 2] and cache.block_table("q") == [full, partial]
    assert cache.allocator.num_free == 0
    check_invariants(cache)


def sharing(setup: str, spare: int = 8) -> tuple[PagedKVCache, list[str]]:
    """A cache where sequences share the partial block [full, partial] of "p", with
    ``spare`` free blocks, and the batch that appends one token to each."""
    cache = PagedKVCache(CFG, 2 + spare, 4)
    cache.add_sequence("p")
    cache.plan(["p"], 6)  # blocks [full, partial]
    if setup == "fork, both write":  # 2 holders, 2 writers: 1 copy
        cache.fork("p", "q")
        return cache, ["p", "q"]
    if setup == "two forks, two write":  # 3 holders, 2 writers: 2 copies
        cache.fork("p", "q")
        cache.fork("p", "r")
        return cache, ["q", "p"]
    if setup == "two forks, all write":  # 3 holders, 3 writers: 2 copies
        cache.fork("p", "q")
        cache.fork("p", "r")
        return cache, ["r", "p", "q"]
    if setup == "trimmed fork, both write":  # 6 and 5 tokens in one block: 1 copy
        cache.fork("p", "q")
        cache.trim("q", 1)
        return cache, ["q", "p"]
    if setup == "holder that does not write":  # q holds it whole, p writes: 1 copy
        cache.plan(["p"], 2)  # p: 8 tokens, block 1 full
        cache.fork("p", "q")
        cache.trim("p", 2)  # p: 6 tokens, block 1 its partial last, q's full one
        return cache, ["p", "q"]
    raise AssertionError(setup)


# setup -> copies of the shared block
COPIES = {
    "fork, both write": 1,
    "two forks, two write": 2,
    "two forks, all write": 2,
    "trimmed fork, both write": 1,
    "holder that does not write": 1,
}


def one_at_a_time(setup: str) -> int:
    """Blocks the batch takes when its sequences append one after another."""
    cache, batch = sharing(setup)
    free = cache.allocator.num_free
    for s in batch:
        cache.plan([s], 1)
    return free - cache.allocator.num_free


@pytest.mark.parametrize("setup", list(COPIES))
def test_a_batch_copies_a_shared_block_as_often_as_one_sequence_at_a_time(setup):
    cache, batch = sharing(setup)
    assert sum(cow for _, cow, _ in cache.block_needs(batch, 1)) == COPIES[setup]
    free = cache.allocator.num_free
    cache.plan(batch, 1)
    assert free - cache.allocator.num_free == one_at_a_time(setup)
    check_invariants(cache)


@pytest.mark.parametrize("setup", list(COPIES))
def test_a_batch_fits_exactly_when_one_sequence_at_a_time_does(setup):
    """A pool with just the blocks appending one at a time takes, then one fewer."""
    need = one_at_a_time(setup)
    cache, batch = sharing(setup, spare=need)
    cache.plan(batch, 1)
    assert cache.allocator.num_free == 0
    check_invariants(cache)
    cache, batch = sharing(setup, spare=need - 1)
    before = snapshot(cache)
    with pytest.raises(CacheFullError, match=f"need {need} free block"):
        cache.plan(batch, 1)
    assert snapshot(cache) == before


# -- the machine -----------------------------------------------------------------------------
PROFILES = {
    "ci": settings(max_examples=60, stateful_step_count=40, deadline=None),
    "deep": settings(max_examples=4_000, stateful_step_count=40, deadline=None),
}
# What a planted bug gets to show itself: more than ci, no example database, no shrinking
# (the test only needs the machine to fail, not the smallest failing run).
PLANTED = settings(
    max_examples=1_000,
    stateful_step_count=40,
    deadline=None,
    database=None,
    phases=[Phase.generate],
)


def fill_batch(cache: PagedKVCache, seqs: list, n: int, values: list[float]) -> None:
    """Append n tokens to each of seqs, writing values (n per sequence, in order) into
    their K rows and the negatives into their V rows, in every layer."""
    plan = cache.plan(seqs, n)
    shape = (CFG.num_key_value_heads, CFG.dim_per_head)
    written = np.broadcast_to(np.array(values, np.float32)[:, None, None], (len(values), *shape))
    both = np.stack([written, -written], axis=1)  # each slot's K heads, then V heads
    for layer, pool in enumerate(cache.kv):
        kv = pool.reshape(-1, 2, *shape)
        kv[plan.slots] = both
        cache.update_layer(layer, kv.reshape(pool.shape))


class BatchMachine(RuleBasedStateMachine):
    """Random add / fork / trim / release / batched appends / refused calls.

    The oracle keeps its own block tables of labels, a label shared exactly where a
    block is: a batch fits when appending to its sequences one at a time, a sequence
    writing into a block only when no other table lists it (else it takes a new
    label first), leaves at most num_blocks distinct labels. Each sequence must read
    back exactly the values it wrote or inherited by fork.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cache = PagedKVCache(CFG, 1, 1)  # replaced by setup
        self.labels: dict[int, list[int]] = {}  # the oracle's block tables
        self.values: dict[int, list[float]] = {}  # what each sequence must read back
        self.next_id = self.next_label = 0
        self.next_value = 1.0

    def _label(self) -> int:
        self.next_label += 1
        return self.next_label

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def appended(self, seqs: list[int], n: int) -> dict[int, list[int]] | None:
        """The oracle's tables after n more tokens in each of seqs, None if they overflow."""
        tables = {s: list(t) for s, t in self.labels.items()}
        bs = self.cache.block_size
        for s in seqs:
            t, have = tables[s], len(self.values[s])
            if have % bs and any(t[-1] in u for o, u in tables.items() if o != s):
                t[-1] = self._label()
            t += [self._label() for _ in range(math.ceil((have + n) / bs) - len(t))]
        used = {b for t in tables.values() for b in t}
        return tables if len(used) <= self.cache.num_blocks else None

    @initialize(num_blocks=st.integers(2, 10), block_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.cache = PagedKVCache(CFG, num_blocks, block_size)

    @rule(n=st.integers(0, 9))
    def add(self, n: int) -> None:
        """A new sequence, and a prompt of n tokens if they fit."""
        seq = self._id()
        self.cache.add_sequence(seq)
        self.labels[seq], self.values[seq] = [], []
        if n:
            self._append([seq], n)

    @precondition(lambda self: self.values)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent, child = data.draw(st.sampled_from(sorted(self.values))), self._id()
        self._fork(parent, child)

    def _fork(self, parent: int, child: int) -> None:
        self.cache.fork(parent, child)
        self.labels[child], self.values[child] = [*self.labels[parent]], [*self.values[parent]]

    @precondition(lambda self: self.values)
    @rule(data=st.data(), n=st.integers(0, 9))
    def trim(self, data: st.DataObject, n: int) -> None:
        seq = data.draw(st.sampled_from(sorted(self.values)))
        assert self.cache.trim(seq, n) == min(n, len(self.values[seq]))
        del self.values[seq][len(self.values[seq]) - min(n, len(self.values[seq])) :]
        del self.labels[seq][math.ceil(len(self.values[seq]) / self.cache.block_size) :]

    @precondition(lambda self: self.values)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.values)))
        self.cache.release(seq)
        del self.labels[seq], self.values[seq]

    def _append(self, seqs: list[int], n: int) -> None:
        """Append n tokens to each of seqs, as the oracle says: all of them, or, when
        they do not fit, none (CacheFullError, nothing changed)."""
        after = self.appended(seqs, n)
        values = [self.next_value + i for i in range(n * len(seqs))]
        before = snapshot(self.cache)
        try:
            fill_batch(self.cache, seqs, n, values)
        except CacheFullError as e:
            assert after is None, f"refused a batch that fits: {seqs} + {n} each: {e}"
            assert snapshot(self.cache) == before
            return
        assert after is not None, f"took a batch that does not fit: {seqs} + {n} each"
        self.labels = after
        self.next_value += len(values)
        for i, s in enumerate(seqs):
            self.values[s] += values[i * n : (i + 1) * n]

    def _crowd(self, free: int) -> None:
        """A new sequence takes all but ``free`` blocks (if there are more)."""
        take = self.cache.allocator.num_free - free
        if take > 0:
            self.add(take * self.cache.block_size)

    def _at_the_edge(self, seqs: list[int], n: int, short: int) -> None:
        """Leave the blocks the oracle says the batch needs, less ``short``, then append:
        a miscount by one block either way shows here."""
        after = self.appended(seqs, n)
        if after is not None:
            in_use = {b for t in self.labels.values() for b in t}
            need = len({b for t in after.values() for b in t} - in_use)
            self._crowd(need - short)
        self._append(seqs, n)

    @precondition(lambda self: self.values)
    @rule(
        data=st.data(),
        n=st.sampled_from([1, 1, 1, 2, 3, 5, 9]),
        short=st.sampled_from([0, 1, None]),
    )
    def append(self, data: st.DataObject, n: int, short: int | None) -> None:
        """Append to a random batch; unless ``short`` is None, at the edge of the pool."""
        live = sorted(self.values)
        seqs = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=4, unique=True))
        if short is None:
            self._append(seqs, n)
        else:
            self._at_the_edge(seqs, n, short)

    @rule(data=st.data(), short=st.sampled_from([0, 1]))
    def decode_sharers(self, data: st.DataObject, short: int) -> None:
        """One token for two or more sequences whose next rows land in one shared
        block, at the edge of the pool: the step where copies are counted per block,
        which a random batch rarely is."""
        bs, groups = self.cache.block_size, {}
        for s, values in self.values.items():
            if len(values) % bs:
                groups.setdefault(self.labels[s][-1], []).append(s)
        shared = sorted(sorted(g) for g in groups.values() if len(g) > 1)
        if shared:
            group = data.draw(st.permutations(data.draw(st.sampled_from(shared))))
            self._at_the_edge(group[: data.draw(st.integers(2, len(group)))], 1, short)

    @precondition(lambda self: self.values)
    @rule(data=st.data(), width=st.integers(2, 4), short=st.sampled_from([0, 1]))
    def sample_in_parallel(self, data: st.DataObject, width: int, short: int) -> None:
        """Fork a sequence width - 1 times and decode all of them at once (parallel
        sampling, a beam), at the edge of the pool."""
        parent = data.draw(st.sampled_from(sorted(self.values)))
        group = [parent, *(self._id() for _ in range(width - 1))]
        for child in group[1:]:
            self._fork(parent, child)
        self._at_the_edge(data.draw(st.permutations(group)), 1, short)

    @precondition(lambda self: self.values)
    @rule(free=st.integers(0, 3))
    def crowd(self, free: int) -> None:
        """Fill the pool up to ``free`` blocks: what the next steps meet is a near-full pool."""
        self._crowd(free)

    @precondition(lambda self: self.values)
    @rule(data=st.data(), bad=st.sampled_from(MACHINE_BAD_CALLS))
    def refused(self, data: st.DataObject, bad: str) -> None:
        """A call of the wrong type (or past the pool) changes nothing."""
        seq = data.draw(st.sampled_from(sorted(self.values)))
        call, _ = BAD_CALLS[bad]
        too_many = (self.cache.num_blocks + 1) * self.cache.block_size
        before = snapshot(self.cache)
        with pytest.raises(TypeError):
            call(self.cache, seq)
        with pytest.raises(CacheFullError):
            self.cache.plan([seq], too_many)
        assert snapshot(self.cache) == before

    @invariant()
    def accounting_holds(self) -> None:
        cache = self.cache
        check_invariants(cache)
        assert sorted(cache.sequences) == sorted(self.values)
        # The oracle's labels and the cache's blocks are shared alike: one to one.
        to_block: dict[int, int] = {}
        to_label: dict[int, int] = {}
        for seq, values in self.values.items():
            assert cache.tokens(seq) == len(values)
            table = cache.block_table(seq)
            assert len(table) == len(self.labels[seq])
            for label, block in zip(self.labels[seq], table):
                assert to_block.setdefault(label, block) == block
                assert to_label.setdefault(block, label) == label
            np.testing.assert_array_equal(rows(cache, seq)[:, 0, 0], values)
        assert cache.allocator.num_used == len(to_block)


PROFILE = os.environ.get("CACHE_MACHINE_PROFILE", "ci")
if PROFILE not in PROFILES:
    raise ValueError(f"CACHE_MACHINE_PROFILE={PROFILE!r}: one of {sorted(PROFILES)}")
BatchMachine.TestCase.settings = PROFILES[PROFILE]
test_batch_machine = BatchMachine.TestCase


def per_sequence_copies(cache: PagedKVCache, seqs: list, num_new: int) -> list:
    """The old count: every sequence writing into a shared block copies it."""
    bs = cache.block_size
    return [
        (
            s,
            cache.tokens(s) % bs != 0 and cache.allocator.refcount(cache.block_table(s)[-1]) > 1,
            math.ceil((cache.tokens(s) + num_new) / bs) - cache.blocks_used(s),
        )
        for s in seqs
    ]


def no_copies(cache: PagedKVCache, seqs: list, num_new: int) -> list:
    """No copy-on-write at all: a fork writes into the block it shares."""
    return [(s, False, new) for s, _, new in per_sequence_copies(cache, seqs, num_new)]


@pytest.mark.parametrize("planted", [per_sequence_copies, no_copies])
def test_machine_catches_a_wrong_copy_on_write_count(monkeypatch, planted):
    monkeypatch.setattr(PagedKVCache, "block_needs", planted)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(BatchMachine, settings=PLANTED)
