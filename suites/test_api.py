"""The Python API: prefill / decode / generate behaviour, input checking that leaves
the cache untouched, batching, chunking and sampling."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import conform_mlx.impl.engine
import conform_mlx.impl.kernels.rope
from conform_mlx.impl.engine import (
    CompiledSteps,
    InputError,
    Sampler,
    StepPools,
    bucket_width,
    decode,
    generate,
    prefill,
    step_arrays,
    to_numpy,
)
from conform_mlx.impl.kernels.policy import KernelPolicy, early_commits, use_policy, variant
from conform_mlx.impl.loader import load
from conform_mlx.impl.model import KVPools
from conform_mlx.impl.paged_cache import CacheFullError, PagedKVCache
from suites.tolerances import FP32_SAME_ENGINE_ATOL

pytestmark = [
    pytest.mark.impl_only("tests impl's Python API (impl.engine, impl.paged_cache)"),
    pytest.mark.checkpoint_group("tiny-gqa8"),
]

SHAPE = "tiny-gqa8"


@pytest.fixture(scope="module")
def model(checkpoint, model_factory):
    return model_factory(checkpoint(SHAPE))


def fresh_cache(model, tokens=64, block_size=4) -> PagedKVCache:
    cache = PagedKVCache.for_tokens(model.config, tokens, block_size)
    cache.add_sequence("s")
    return cache


def state(cache: PagedKVCache) -> tuple:
    return (
        {s: (cache.tokens(s), cache.block_table(s)) for s in cache.sequences},
        cache.allocator.num_free,
    )


def ids(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def test_generate_accounting_and_timings(model):
    cache = fresh_cache(model)
    gen = generate(model, ids(5), 5, cache=cache, seq="s", eos_token_ids=[])
    assert len(gen.tokens) == 5 and gen.stop_reason == "max_new_tokens"
    assert len(gen.decode_ms) == 4 and gen.prefill_ms > 0
    assert cache.tokens("s") == 5 + 5 - 1  # the seed's "9 cached after 5 generated"
    assert cache.blocks_used("s") == 3


def test_generate_stops_at_eos(model):
    first = generate(model, ids(5), 3, eos_token_ids=[]).tokens
    gen = generate(model, ids(5), 10, eos_token_ids=[first[1]])
    assert gen.tokens == first[:2] and gen.stop_reason == "eos"


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(model):
    greedy = generate(model, ids(5), 8, eos_token_ids=[]).tokens
    a = generate(model, ids(5), 8, sampler=Sampler(1.0, 1.0, seed=3), eos_token_ids=[]).tokens
    b = generate(model, ids(5), 8, sampler=Sampler(1.0, 1.0, seed=3), eos_token_ids=[]).tokens
    c = generate(model, ids(5), 8, sampler=Sampler(1.0, 1.0, seed=4), eos_token_ids=[]).tokens
    nucleus = generate(model, ids(5), 8, sampler=Sampler(1.0, 1e-9, seed=3), eos_token_ids=[])
    assert a == b
    assert a != c  # random weights: near-uniform over 512 tokens, 8 draws
    assert nucleus.tokens == greedy


@pytest.mark.parametrize(
    "tokens,pattern",
    [
        ([3, 512], "token id 512 at index 1 is outside the vocabulary"),
        ([-1], "token id -1"),
        ([], "non-empty"),
    ],
)
def test_bad_token_ids_are_refused_before_the_cache_changes(model, tokens, pattern):
    cache = fresh_cache(model)
    prefill(model, cache, "s", ids(3))
    before = state(cache)
    with pytest.raises(InputError, match=pattern):
        prefill(model, cache, "s", tokens)
    if len(tokens) == 1:
        with pytest.raises(InputError, match=pattern):
            decode(model, cache, ["s"], tokens)
    assert state(cache) == before


def test_prompt_past_the_context_is_refused(model):
    limit = model.config.max_position_embeddings
    cache = PagedKVCache.for_tokens(model.config, limit + 8, 16)
    cache.add_sequence("s")
    prefill(model, cache, "s", ids(limit - 1))
    before = state(cache)
    with pytest.raises(
        InputError, match=f"exceeds the context length max_position_embeddings={limit}"
    ):
        prefill(model, cache, "s", ids(2))
    decode(model, cache, ["s"], [1])  # exactly at the limit is fine
    with pytest.raises(InputError, match="exceeds the context length"):
        decode(model, cache, ["s"], [1])
    with pytest.raises(InputError, match="exceeds the context length"):
        generate(model, ids(limit), 2)
    assert state(cache)[0]["s"][0] == limit and before[0]["s"][0] == limit - 1


def test_chunked_prefill_out_of_blocks_changes_nothing(model):
    cache = PagedKVCache(model.config, num_blocks=3, block_size=4)
    cache.add_sequence("s")
    before = state(cache)
    with pytest.raises(CacheFullError, match="need 4 free block"):
        prefill(model, cache, "s", ids(13), chunk_size=4)
    assert state(cache) == before


@pytest.mark.parametrize("chunk", [1, 3, 4, 5])
def test_chunked_prefill_equals_one_prefill(model, chunk):
    prompt = ids(13)
    whole = to_numpy(prefill(model, fresh_cache(model), "s", prompt))
    chunked = to_numpy(prefill(model, fresh_cache(model), "s", prompt, chunk_size=chunk))
    np.testing.assert_allclose(chunked, whole, atol=FP32_SAME_ENGINE_ATOL, rtol=0)


def test_batched_decode_of_mixed_lengths_equals_one_at_a_time(model):
    lengths = {"a": 1, "b": 4, "c": 9, "d": 17}
    batch = PagedKVCache(model.config, num_blocks=32, block_size=4)
    single = {}
    for i, (seq, n) in enumerate(lengths.items()):
        batch.add_sequence(seq)
        prefill(model, batch, seq, ids(n, seed=i))
        single[seq] = fresh_cache(model)
        prefill(model, single[seq], "s", ids(n, seed=i))
    nxt = [7, 8, 9, 10]
    got = to_numpy(decode(model, batch, list(lengths), nxt))
    for row, (seq, tok) in zip(got, zip(lengths, nxt)):
        want = to_numpy(decode(model, single[seq], ["s"], [tok]))[0]
        np.testing.assert_allclose(row, want, atol=FP32_SAME_ENGINE_ATOL, rtol=0, err_msg=seq)


def test_attention_reads_kv_heads_unrepeated(model, monkeypatch):
    """The seed tiled K/V to the query heads; our attention must get them untiled."""
    seen = []
    real = mx.fast.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1], v.shape[1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    prefill(model, fresh_cache(model), "s", ids(5))
    cfg = model.config
    assert seen and all(
        s == (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads)
        for s in seen
    )


def test_logits_as_numpy_are_float32(checkpoint, model_factory):
    m16 = model_factory(checkpoint(SHAPE), "float16")
    cache = PagedKVCache.for_tokens(m16.config, 8, 4, mx.float16)
    cache.add_sequence(0)
    out = to_numpy(prefill(m16, cache, 0, ids(4)))
    assert out.dtype == np.float32 and out.shape == (4, m16.config.vocab_size)
    assert cache.kv[0].dtype == mx.float16


def test_rope_angles_are_made_once_a_step_for_all_layers(model, monkeypatch):
    """The model's forward makes each step's RoPE angles once and hands them to every
    layer (no memo of earlier calls), so a fault injected there reaches every layer."""
    assert len(model.model.layers) > 1  # else once a step and once a layer agree
    shapes = []
    real = conform_mlx.impl.kernels.rope.rope_cos_sin

    def counted(positions, inv_freq, scale=1.0):
        shapes.append(positions.shape)
        return real(positions, inv_freq, scale)

    monkeypatch.setattr(conform_mlx.impl.kernels.rope, "rope_cos_sin", counted)
    cache = fresh_cache(model)
    prefill(model, cache, "s", ids(5), chunk_size=2)
    decode(model, cache, ["s"], [1])
    assert shapes == [(1, 2), (1, 2), (1, 1), (1, 1)]


# -- compiled steps (prefill / decode with steps=CompiledSteps(model)) ---------------------------
def decode_run(model, steps: CompiledSteps | None, dtype=mx.float32) -> np.ndarray:
    """Two prompts (one also continued in 2-token chunks), then 20 decode steps of both
    together, crossing several 4-token blocks, so the compiled steps are traced again
    as the lengths change and the tables widen. All logits, in order."""
    cache = PagedKVCache(model.config, 24, 4, dtype)
    out = []
    for seq, n in (("a", 5), ("b", 9)):
        cache.add_sequence(seq)
        out.append(to_numpy(prefill(model, cache, seq, ids(n, seed=n), steps=steps)))
    out.append(to_numpy(prefill(model, cache, "b", ids(3), chunk_size=2, steps=steps)))
    for i in range(20):
        got = decode(model, cache, ["a", "b"], [3 + i, 7 + i], steps=steps)
        out.append(to_numpy(got))
    return np.concatenate(out)


def test_compiled_decode_equals_eager(model):
    # Same ops, but mx.compile fuses element-wise chains into one kernel, whose float
    # arithmetic may round differently: equal on the CPU, ~1e-7 apart on the H100.
    np.testing.assert_allclose(
        decode_run(model, CompiledSteps(model)),
        decode_run(model, None),
        atol=FP32_SAME_ENGINE_ATOL,
        rtol=0,
    )


def test_fine_chunk_buckets_pad_less_and_change_no_logits(model, monkeypatch):
    """Compiled chunks over a cache under ``chunk_buckets=8`` (variant fine-chunk-buckets)
    trace tables of the fine widths, never wider than a power of two, and give the default's
    logits: padding is masked either way."""
    widths = []
    real = conform_mlx.impl.engine.pad_block_tables

    def recorded(tables, per_octave=1):
        out = real(tables, per_octave)
        widths.append((tables.shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(conform_mlx.impl.engine, "pad_block_tables", recorded)

    def chunks(policy: KernelPolicy) -> np.ndarray:
        widths.clear()
        cache = PagedKVCache(model.config, 24, 4)
        cache.add_sequence("s")
        with use_policy(policy):
            logits = prefill(model, cache, "s", ids(45), chunk_size=9, steps=CompiledSteps(model))
        return to_numpy(logits)

    pow2 = chunks(KernelPolicy())
    pow2_widths = list(widths)
    fine = chunks(variant("fine-chunk-buckets"))
    np.testing.assert_allclose(fine, pow2, atol=FP32_SAME_ENGINE_ATOL, rtol=0)
    # 9-token chunks in 4-token blocks: the fresh first chunk is padded as before
    assert pow2_widths == [(3, 4), (5, 8), (7, 8), (9, 16), (12, 16)]
    assert widths == [(3, 4), (5, 5), (7, 7), (9, 9), (12, 12)]


def test_compiled_decode_check_catches_a_step_that_drops_the_cache_write(model, monkeypatch):
    def forgetful(self, tokens, cache, plan):  # computes, but never installs the pools
        p = plan
        out, _, _ = self.graph(plan.fresh)(tokens, *step_arrays(p), cache.kv)
        mx.eval(out)
        return out

    monkeypatch.setattr(CompiledSteps, "__call__", forgetful)
    with pytest.raises(AssertionError):
        test_compiled_decode_equals_eager(model)


def test_early_commits_end_the_step_in_small_graphs():
    assert early_commits(22, False) == (15, 17, 19)
    assert early_commits(6, False) == (1, 3)  # layers before the first are skipped
    assert early_commits(1, False) == ()
    # the row kernels' steps: every 4 layers from layer 3, none in the last two
    assert early_commits(22, True) == (3, 7, 11, 15, 19)
    assert early_commits(32, True) == (3, 7, 11, 15, 19, 23, 27)
    assert early_commits(4, True) == ()


def test_compiled_step_asks_the_model_which_layers_to_queue(model, monkeypatch):
    """The step's marks follow ``Model.runs_row_kernels`` for its rows: a batch-1 step
    gets the row kernels' layers where they run (forced here), a batch of two not."""
    asked = []

    def spy(n, row_kernels):
        asked.append(row_kernels)
        return ()

    monkeypatch.setattr(type(model), "runs_row_kernels", lambda self, rows: rows == 1)
    cache = fresh_cache(model)
    for seq in ("a", "b"):
        cache.add_sequence(seq)
        prefill(model, cache, seq, ids(5))
    for seqs in (["a"], ["a", "b"]):
        plan = cache.plan(seqs, 1, table_width=bucket_width)
        tokens = mx.zeros((len(seqs), 1), dtype=mx.int32)
        with use_policy(KernelPolicy(commits=spy)):
            CompiledSteps(model).graph(False)(tokens, *step_arrays(plan), cache.kv)
    assert asked == [True, False]


def test_compiled_step_queues_each_early_commit_mlp_output(model):
    """The arrays a compiled step queues early are the MLP outputs of the policy's
    ``commits``: the same values the eager trace records under those names.
    (The test model's few layers get none by default: every layer is marked here.)"""
    every = KernelPolicy(commits=lambda n, row_kernels: tuple(range(n)))
    traced, cache = {}, fresh_cache(model)
    cache.add_sequence("a")
    prefill(model, cache, "a", ids(5))
    plan = cache.plan(["a"], 1, table_width=bucket_width)
    tokens = mx.array([[7]], dtype=mx.int32)
    with use_policy(every):
        *_, marks = CompiledSteps(model).graph(False)(tokens, *step_arrays(plan), cache.kv)
    model(tokens, cache, plan, traced)
    layers = every.commits(model.config.num_hidden_layers, False)
    assert len(marks) == len(layers) > 0
    for layer, mark in zip(layers, marks):
        want = traced[f"layers.{layer}.mlp"].reshape(mark.shape)
        np.testing.assert_allclose(
            np.array(mark), np.array(want), atol=FP32_SAME_ENGINE_ATOL, rtol=0
        )


def test_compiled_steps_belong_to_the_caller(model, trained_dir):
    """One graph per StepPlan.fresh (under the default policy, whose chunks are masked),
    kept by the caller's object: the model holds none, and another model's steps are
    refused."""
    steps = CompiledSteps(model)
    decode_run(model, steps)  # a 2-token chunk over a cache among its steps
    assert sorted((fresh, c) for fresh, c, _ in steps.graphs) == [(False, 0), (True, 0)]
    assert not any("compiled" in name for name in vars(model))
    other = load(trained_dir, "float32")
    cache = fresh_cache(model)
    cache.add_sequence("a")
    with pytest.raises(ValueError, match="another model"):
        prefill(model, cache, "a", ids(3), steps=CompiledSteps(other))


def test_cache_and_step_pools_are_kv_pools(model):
    """The model is typed against KVPools; both pool holders it is given must be one."""
    cache = fresh_cache(model)
    assert isinstance(cache, KVPools)
    assert isinstance(StepPools(list(cache.kv)), KVPools)


def test_compiled_chunks_keep_a_graph_per_context(model):
    """Under ``causal_chunks`` a chunk over a cache is traced for its exact context (causal
    attention's rows); by default it is masked, one graph for every length. The logits are
    the eager step's either way."""
    steps = CompiledSteps(model)
    prompt = ids(13)  # chunks of 5: fresh, then over a cache at contexts 10 and 13
    for policy, contexts in [(variant("causal-chunks"), [10, 13]), (KernelPolicy(), [0])]:
        with use_policy(policy):
            got, want = [], []
            for out, compiled in ((got, steps), (want, None)):
                cache = fresh_cache(model)
                cache.add_sequence("a")
                out.append(to_numpy(prefill(model, cache, "a", prompt, 5, steps=compiled)))
        np.testing.assert_array_equal(got[0], want[0])
        keys = sorted(c for fresh, c, p in steps.graphs if p == policy and not fresh)
        assert keys == contexts


def test_compiled_steps_keep_a_graph_per_policy(model):
    """A graph bakes in the kernels it was traced with: another policy gets its own."""
    steps = CompiledSteps(model)
    default = steps.graph(False)
    with use_policy(variant("no-early")):
        other = steps.graph(False)
    assert other is not default and steps.graph(False) is default
