"""Cache accounting through the engine under test: tokens cached after greedy
generation (P + G - 1), block accounting where the cache is paged, and forks. Integers
are compared exactly. impl's paged cache itself (allocation, fork / copy-on-write,
release, trim, all-or-nothing) is test_paged_cache's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conform_mlx.engines import NotApplicable
from suites.tolerances import FP32_SAME_ENGINE_ATOL

pytestmark = [
    pytest.mark.engine_suite,
    pytest.mark.checkpoint_group("tiny-gqa8"),
]

ENGINE_SHAPE = "tiny-gqa8"


@pytest.mark.conformance("token accounting P+G-1")
@pytest.mark.parametrize("prompt_len", [1, 5, 16])
@pytest.mark.parametrize("generated", [1, 5, 17])
def test_cached_tokens_after_greedy_is_prompt_plus_generated_minus_one(
    checkpoint, engine_factory, metric, prompt_len, generated
):
    """The rule in impl.paged_cache's docstring: the last generated token is never fed."""
    engine = engine_factory(checkpoint(ENGINE_SHAPE))
    cache = engine.new_cache(prompt_len + generated)
    cache.add_sequence(0)
    assert cache.tokens(0) == 0
    gen = engine.greedy(list(range(3, 3 + prompt_len)), generated, cache=cache, seq=0)
    assert len(gen.tokens) == generated
    metric("|tokens - (P+G-1)|", abs(cache.tokens(0) - (prompt_len + generated - 1)))
    assert cache.tokens(0) == prompt_len + generated - 1


@pytest.mark.conformance("block accounting")
@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 40])
def test_blocks_used_after_prefill_and_decode(checkpoint, engine_factory, metric, tokens):
    """blocks_used == ceil(tokens / block_size); released blocks return to the pool."""
    engine = engine_factory(checkpoint(ENGINE_SHAPE))
    cache = engine.new_cache(tokens, max_sequences=2)
    cache.add_sequence(0)
    try:
        empty = cache.block_facts(0)
    except NotApplicable as e:
        pytest.skip(f"engine {engine.name}: {e}")
    assert (empty.blocks_used, empty.num_free) == (0, empty.num_blocks)
    ids = list(range(3, 3 + tokens))
    engine.prefill(cache, 0, ids[:-1] or ids)
    if tokens > 1:
        engine.decode(cache, 0, ids[-1])
    facts = cache.block_facts(0)
    want = math.ceil(tokens / facts.block_size)
    metric("|blocks - ceil(tokens / block_size)|", abs(facts.blocks_used - want))
    assert facts.blocks_used == want
    assert facts.num_free == facts.num_blocks - want
    cache.release(0)
    cache.add_sequence(1)
    assert cache.block_facts(1).num_free == facts.num_blocks


@pytest.mark.conformance("fork keeps history")
def test_fork_continues_like_its_parent_and_leaves_it_alone(checkpoint, engine_factory, metric):
    """After a fork at 21 tokens (a partial block for impl), the child and the parent
    each decode a different token; both must equal a fresh prefill of their history."""
    engine = engine_factory(checkpoint(ENGINE_SHAPE))
    ids = list(range(3, 24))
    cache = engine.new_cache(len(ids) + 1, max_sequences=2)
    cache.add_sequence("parent")
    engine.prefill(cache, "parent", ids)
    try:
        cache.fork("parent", "child")
    except NotApplicable as e:
        pytest.skip(f"engine {engine.name}: {e}")
    assert cache.tokens("child") == cache.tokens("parent") == len(ids)
    child = engine.decode(cache, "child", 100)  # writes first, into what it shares
    parent = engine.decode(cache, "parent", 200)
    worst = 0.0
    for got, last in ((child, 100), (parent, 200)):
        fresh = engine.new_cache(len(ids) + 1)
        fresh.add_sequence(0)
        want = engine.prefill(fresh, 0, [*ids, last])[-1]
        worst = max(worst, float(np.abs(got - want).max()))
        np.testing.assert_allclose(got, want, atol=FP32_SAME_ENGINE_ATOL, rtol=0)
    metric("max|dlogit|", worst)
    assert cache.tokens("child") == cache.tokens("parent") == len(ids) + 1
