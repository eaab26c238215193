"""The host side of a decode step, timed with pytest-benchmark.

On a GPU a batch-1 decode step is bounded by the host as much as by the device: the
paged cache's bookkeeping (``PagedKVCache.plan``: positions, slots, block tables),
the engine's input checks and the Python that builds the step's MLX graph. These
time each of those functions in-process, each with a check of what it returned, so
every benchmark is also a test. pyproject's addopts pass ``--benchmark-disable``:
in the default run each timed call runs once, as an ordinary test. To time them:

    python -m pytest suites/test_host_bench.py --benchmark-enable

(``--benchmark-only`` needs ``--benchmark-enable`` too; see docs/benchmarks.md).
Stateful calls go through ``benchmark.pedantic`` with an untimed ``setup`` that puts
the cache back (a trim, a release), so every round times the same step.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from conform_bench.common import BENCH_SMALL, BLOCK_SIZE
from conform_mlx.impl.config import LlamaConfig
from conform_mlx.impl.engine import bucket_width, decode
from conform_mlx.impl.model import Model
from conform_mlx.impl.paged_cache import PagedKVCache

pytestmark = [
    pytest.mark.impl_only("times impl's host-side step work (paged cache, decode, graph)"),
    pytest.mark.checkpoint_group("trained"),  # the graph-building cases: checkpoints/tiny-gqa
]

# A batch of 32 at mixed contexts: four lengths a block apart from each other's
# residues (100, 257 and 700 leave a partial last block; 16 + 16 i is block-aligned,
# so a quarter of the batch takes a new block every step), eight of each. The first
# is 100: batch 1 is the common step that stays inside its last block.
CONTEXTS = [c + BLOCK_SIZE * i for i in range(8) for c in (100, 257, 700, 16)]
BATCHES = [1, 32]


def blocks_for(contexts: list[int], spare: int = 0) -> int:
    """Blocks that hold every context plus ``spare`` tokens each."""
    return sum(math.ceil((c + spare) / BLOCK_SIZE) for c in contexts)


@pytest.fixture(scope="module")
def small_config() -> LlamaConfig:
    """The asv small preset (conform_bench/common.py): TinyLlama's head layout, 4 layers."""
    return LlamaConfig(**BENCH_SMALL)


@pytest.fixture(scope="module")
def small_model(small_config) -> Model:
    """A random-weight model of the small preset, built in memory (~60 MB, float32)."""
    mx.random.seed(0)
    model = Model(small_config)
    mx.eval(model.parameters())
    return model


def filled_cache(config: LlamaConfig, contexts: list[int], spare: int = 2) -> PagedKVCache:
    """Sequences 0..n-1 holding ``contexts`` tokens (tables only: planned, not run)."""
    cache = PagedKVCache(config, blocks_for(contexts, spare) + 1, BLOCK_SIZE)
    for s, c in enumerate(contexts):
        cache.add_sequence(s)
        cache.plan([s], c)
    return cache


def trim_back(cache: PagedKVCache, seqs: list[int], contexts: list[int]) -> None:
    for s, c in zip(seqs, contexts):
        cache.trim(s, cache.tokens(s) - c)


def random_pools(cache: PagedKVCache, seed: int = 0) -> None:
    """Fill every pool with random values, so a step reads a context that is not zeros."""
    key = mx.random.key(seed)
    for layer, pool in enumerate(cache.kv):
        key, sub = mx.random.split(key)
        cache.update_layer(layer, mx.random.normal(pool.shape, key=sub))
    mx.eval(cache.kv)


def check_plan(
    cache: PagedKVCache, seqs: list[int], contexts: list[int], plan, padded: bool = False
) -> None:
    """``plan`` is the one-token step after ``contexts``, on the cache's tables; with
    ``padded``, tables widened with block 0 to their compiled width bucket."""
    assert np.array(plan.positions).tolist() == [[c] for c in contexts]
    assert np.array(plan.context_lens).tolist() == [c + 1 for c in contexts]
    tables = [cache.block_table(s) for s in seqs]
    width = max(len(t) for t in tables)
    if padded:
        width = bucket_width(width)
    got = np.array(plan.block_tables).tolist()
    assert plan.block_tables.shape == (len(seqs), width)
    assert got == [t + [0] * (width - len(t)) for t in tables]
    assert all(len(t) == math.ceil((c + 1) / BLOCK_SIZE) for t, c in zip(tables, contexts))
    want = [t[c // BLOCK_SIZE] * BLOCK_SIZE + c % BLOCK_SIZE for t, c in zip(tables, contexts)]
    assert np.array(plan.slots).tolist() == want
    assert not plan.fresh


# -- the step plan ----------------------------------------------------------------------
@pytest.mark.parametrize("batch", BATCHES)
def test_plan(benchmark, small_config, batch):
    """``PagedKVCache.plan`` for one decode token per sequence at mixed contexts."""
    contexts, seqs = CONTEXTS[:batch], list(range(batch))
    cache = filled_cache(small_config, contexts)
    plan = benchmark.pedantic(
        cache.plan,
        args=(seqs, 1),
        setup=lambda: trim_back(cache, seqs, contexts),
        rounds=max(2000 // batch, 200),
        warmup_rounds=10,
    )
    check_plan(cache, seqs, contexts, plan)
    # Every round's blocks went back: only the last step's are held.
    assert cache.allocator.num_used == blocks_for(contexts, 1)


@pytest.mark.parametrize("batch", BATCHES)
def test_compiled_plan_pads_tables_to_the_bucket(small_config, batch):
    """A compiled decode step's plan (``table_width=bucket_width``): the same plan,
    its tables widened with block 0 to the next power of two."""
    contexts, seqs = CONTEXTS[:batch], list(range(batch))
    cache = filled_cache(small_config, contexts)
    plan = cache.plan(seqs, 1, table_width=bucket_width)
    check_plan(cache, seqs, contexts, plan, padded=True)
    assert plan.block_tables.shape[1] & (plan.block_tables.shape[1] - 1) == 0


# -- block allocation, trim, fork ---------------------------------------------------
def test_grow_across_block_boundary(benchmark, small_config):
    """ensure_room + plan at a block-aligned context: the step takes a new block."""
    context = 16 * BLOCK_SIZE
    cache = filled_cache(small_config, [context])

    def grow():
        cache.ensure_room([0], 1)
        return cache.plan([0], 1)

    plan = benchmark.pedantic(
        grow, setup=lambda: trim_back(cache, [0], [context]), rounds=2000, warmup_rounds=10
    )
    check_plan(cache, [0], [context], plan)
    assert cache.blocks_used(0) == 17 == cache.allocator.num_used


def test_trim_across_block_boundary(benchmark, small_config):
    """Rejecting 4 speculative tokens that had crossed into a new block frees it."""
    context = 16 * BLOCK_SIZE - 2
    cache = filled_cache(small_config, [context], spare=4)

    def speculate():
        trim_back(cache, [0], [context])
        cache.plan([0], 4)
        assert cache.blocks_used(0) == 17

    dropped = benchmark.pedantic(
        cache.trim, args=(0, 4), setup=speculate, rounds=2000, warmup_rounds=10
    )
    assert dropped == 4
    assert cache.tokens(0) == context
    assert cache.blocks_used(0) == 16 == cache.allocator.num_used
    assert cache.allocator.num_free == cache.num_blocks - 16


def test_fork_copy_on_write(benchmark, small_config):
    """fork + the child's first step, which copies the shared partial last block
    (one lazy row copy per layer and pool; evaluated in the untimed setup)."""
    context = 100
    cache = filled_cache(small_config, [context], spare=BLOCK_SIZE)
    random_pools(cache)
    parent = cache.block_table(0)

    def reset():
        if "child" in cache.sequences:
            cache.release("child")
        mx.eval(cache.kv)

    def fork_and_step():
        cache.fork(0, "child")
        return cache.plan(["child"], 1)

    plan = benchmark.pedantic(fork_and_step, setup=reset, rounds=1000, warmup_rounds=10)
    child = cache.block_table("child")
    check_plan(cache, ["child"], [context], plan)
    assert child[:-1] == parent[:-1] and child[-1] != parent[-1]
    assert all(cache.allocator.refcount(b) == 2 for b in parent[:-1])
    assert cache.allocator.refcount(parent[-1]) == 1 == cache.allocator.refcount(child[-1])
    mx.eval(cache.kv)
    for pool in cache.kv:
        assert mx.array_equal(pool[child[-1]], pool[parent[-1]]).item()


# -- one decode step's inputs -------------------------------------------------------
class HostOnly:
    """A model for ``impl.engine.decode`` whose forward returns ready logits: the real
    model's config and cache check, everything else forwarded, so decode's host work
    (token checks, context checks, plan, token array) is all a call runs."""

    def __init__(self, model: Model, batch: int) -> None:
        self.model = model
        self.logits = mx.zeros((batch, 1, model.config.vocab_size))
        mx.eval(self.logits)
        self.seen = None

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, tokens, cache, plan, trace=None):
        self.seen = tokens, plan
        return self.logits


@pytest.mark.parametrize("batch", BATCHES)
def test_decode_step_inputs(benchmark, small_config, small_model, batch):
    """impl.engine.decode with the model's forward stubbed out: what the host does
    before the model on every step."""
    contexts, seqs = CONTEXTS[:batch], list(range(batch))
    cache = filled_cache(small_config, contexts)
    model = HostOnly(small_model, batch)
    ids = np.random.default_rng(0).integers(3, small_config.vocab_size, batch).tolist()
    logits = benchmark.pedantic(
        decode,
        args=(model, cache, seqs, ids),
        setup=lambda: trim_back(cache, seqs, contexts),
        rounds=max(2000 // batch, 200),
        warmup_rounds=10,
    )
    assert logits.shape == (batch, small_config.vocab_size)
    tokens, plan = model.seen
    assert tokens.shape == (batch, 1) and tokens.dtype == mx.int32
    assert np.array(tokens)[:, 0].tolist() == ids
    check_plan(cache, seqs, contexts, plan)  # eager: tables unpadded


# -- graph building -----------------------------------------------------------------
class Pools:
    """The model's view of the cache for one step: the cache's pools, with the step's
    writes kept here, so repeated graph building never chains onto the cache."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.kv = list(cache.kv)

    def update_layer(self, layer: int, kv_pool: mx.array) -> None:
        self.kv[layer] = kv_pool


@pytest.fixture
def graph_model(request, model_factory, trained_dir, small_model):
    return {"tiny-gqa": lambda: model_factory(trained_dir), "bench-small": lambda: small_model}[
        request.param
    ]()


@pytest.mark.parametrize(
    "graph_model, batch",
    [("tiny-gqa", 1), ("bench-small", 1), ("bench-small", 32)],
    indirect=["graph_model"],
)
def test_decode_graph_building(benchmark, graph_model, batch):
    """The model's forward for one decode step without mx.eval: MLX is lazy, so this
    is the Python and graph construction alone. The graph it built must evaluate to
    the logits impl.engine.decode gives for the same step."""
    model, cfg = graph_model, graph_model.config
    contexts = [min(c, cfg.max_position_embeddings - 1) for c in CONTEXTS[:batch]]
    seqs = list(range(batch))
    cache = filled_cache(cfg, contexts)
    random_pools(cache)
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, batch)
    tokens = mx.array(ids.astype(np.int32))[:, None]
    plan = cache.plan(seqs, 1)
    mx.eval(plan.positions, plan.slots, plan.block_tables, plan.context_lens)
    out = benchmark.pedantic(lambda: model(tokens, Pools(cache), plan), rounds=200, warmup_rounds=5)
    assert out.shape == (batch, 1, cfg.vocab_size)
    built = np.array(out[:, 0])
    trim_back(cache, seqs, contexts)
    want = np.array(decode(model, cache, seqs, ids.tolist()))
    np.testing.assert_allclose(built, want, rtol=1e-5, atol=1e-5)
