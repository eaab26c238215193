"""KV memory math: the pool holds exactly what the formula says, and only K/V heads.

bytes = 2 (K and V) x layers x kv_heads x head_dim x itemsize x (blocks x block_size)
The unpaged lower bound puts tokens in place of blocks x block_size. The seed
engine claimed the GQA saving while storing repeated heads; ``check_kv_memory``
is the check that would have caught it, and a test below proves it does.

For any engine, the bytes its cache holds for one sequence follow the same formula
with slots = ceil(tokens / g) x g, where g is the cache's allocation granularity:
impl's block size, or mlx-lm's growth step (KVCache.step, 256 slots).
"""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
import pytest

import conform_mlx.impl.paged_cache
from conform_mlx.engines import NotApplicable
from conform_mlx.impl.config import LlamaConfig
from conform_mlx.impl.paged_cache import PagedKVCache
from conform_mlx.reference.checkpoints import hf_config
from conform_mlx.validate import kv_bytes

pytestmark = [
    pytest.mark.engine_suite,
    pytest.mark.checkpoint_group("tiny-gqa8"),
]

MiB = 2**20
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
BLOCK_SIZES = [8, 16, 32]
# Growth was exactly the formula on MLX 0.32.4's CPU backend (measured 2026-11-27 for
# 1, 3, 64 and 129 blocks). The slack allows an allocator that rounds each buffer
# up to a 16 KiB page, as GPU allocators do; a repeated-heads pool is 2x-32x over.
ALLOC_SLACK_PER_ARRAY = 16 * 1024
IMPL_ONLY = pytest.mark.impl_only("sizes impl's paged pool")
# Around mlx-lm's 256-slot growth step and impl's 16-token blocks.
PROMPT_LENS = [1, 16, 255, 256, 300]


def config(shape: str) -> LlamaConfig:
    return LlamaConfig.from_dict(hf_config(shape).to_dict())


def check_kv_memory(cache: PagedKVCache, model_cfg: LlamaConfig) -> None:
    """The cache holds K/V at the model's num_key_value_heads and nothing more."""
    expected_block = (cache.block_size, 2, model_cfg.num_key_value_heads, model_cfg.dim_per_head)
    for layer, pool in enumerate(cache.kv):
        assert pool.shape[1:] == expected_block, (
            f"pool {layer} stores blocks of {pool.shape[1:]}, expected {expected_block}: "
            f"{pool.shape[3]} heads per token where the model has "
            f"{model_cfg.num_key_value_heads} K/V heads (repeated heads?)"
        )
    slots = cache.num_blocks * cache.block_size
    assert cache.nbytes == kv_bytes(model_cfg, cache.dtype.size, slots)


@IMPL_ONLY
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", ["tinyllama-1.1b", "tiny-mqa", "tiny-hd128"])
def test_pool_nbytes_equal_the_formula(shape, block_size, dtype):
    cfg = config(shape)
    cache = PagedKVCache(cfg, num_blocks=5, block_size=block_size, dtype=DTYPES[dtype])
    check_kv_memory(cache, cfg)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.dim_per_head
    assert cache.nbytes == per_token * DTYPES[dtype].size * 5 * block_size


@IMPL_ONLY
def test_allocated_memory_matches_the_formula():
    """MLX's own active-memory counter grows by the formula when a pool is made."""
    cfg = config("tinyllama-1.1b")
    mx.eval(mx.zeros(1))
    before = mx.get_active_memory()
    cache = PagedKVCache(cfg, num_blocks=64, block_size=16, dtype=mx.float16)
    grown = mx.get_active_memory() - before
    formula = kv_bytes(cfg, 2, 64 * 16)
    arrays = len(cache.kv)
    assert formula <= grown <= formula + arrays * ALLOC_SLACK_PER_ARRAY, (grown, formula)
    del cache


@pytest.mark.impl_only("the seed report's figures from the formula, not an engine")
def test_tinyllama_figures_from_the_seed_report():
    cfg = config("tinyllama-1.1b")
    one_layer = dataclasses.replace(cfg, num_hidden_layers=1)
    assert 1 - cfg.num_key_value_heads / cfg.num_attention_heads == 0.875
    gqa = kv_bytes(one_layer, 2, 2048)
    repeated = kv_bytes(one_layer, 2, 2048, kv_heads=cfg.num_attention_heads)
    assert (repeated, gqa) == (16 * MiB, 2 * MiB)
    saved = kv_bytes(cfg, 2, 2048, kv_heads=32) - kv_bytes(cfg, 2, 2048)
    assert saved == 308 * MiB
    assert kv_bytes(cfg, 2, 1) == 22_528  # bytes per token, FACTS.md


@pytest.fixture
def repeated_heads_cache(monkeypatch):
    """Inject the seed's bug: pools sized for the query heads instead of the K/V heads."""
    real_init = PagedKVCache.__init__

    def init(self, config, *args, **kwargs):
        tiled = dataclasses.replace(config, num_key_value_heads=config.num_attention_heads)
        real_init(self, tiled, *args, **kwargs)

    monkeypatch.setattr(conform_mlx.impl.paged_cache.PagedKVCache, "__init__", init)


@IMPL_ONLY
def test_memory_check_fails_when_repeated_heads_are_stored(repeated_heads_cache):
    cfg = config("tiny-gqa8")
    cache = PagedKVCache(cfg, num_blocks=4, block_size=16)
    with pytest.raises(AssertionError, match="repeated heads"):
        check_kv_memory(cache, cfg)


@IMPL_ONLY
@pytest.mark.parametrize("lengths", [[1], [15, 16, 17], [1, 100, 257, 33]])
def test_paging_waste_is_under_one_block_per_sequence(lengths):
    cfg = config("tiny-gqa4")
    bs = 16
    cache = PagedKVCache(cfg, num_blocks=sum(math.ceil(n / bs) for n in lengths), block_size=bs)
    for i, n in enumerate(lengths):
        cache.add_sequence(i)
        cache.plan([i], n)
    for i, n in enumerate(lengths):
        waste_slots = cache.blocks_used(i) * bs - n
        assert 0 <= waste_slots < bs
    held = kv_bytes(cfg, 4, cache.allocator.num_used * bs)
    lower = kv_bytes(cfg, 4, sum(lengths))
    per_block_all_layers = kv_bytes(cfg, 4, bs)
    assert lower <= held < lower + len(lengths) * per_block_all_layers


@pytest.mark.conformance("KV bytes vs formula")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("prompt_len", PROMPT_LENS)
def test_engine_kv_bytes_follow_the_formula(checkpoint, engine_factory, metric, dtype, prompt_len):
    """After a prefill of P tokens and one decode step (n = P + 1 tokens), the sequence
    holds exactly kv_bytes(ceil(n / g) x g slots), g = the cache's granularity."""
    path = checkpoint("tiny-gqa8")  # GQA 8:1: repeated heads would be 8x over
    cfg = LlamaConfig.from_dir(path)
    engine = engine_factory(path, dtype)
    cache = engine.new_cache(prompt_len + 1)
    cache.add_sequence(0)
    ids = list(range(3, 3 + prompt_len))
    engine.prefill(cache, 0, ids)
    engine.decode(cache, 0, 5)
    n, g = prompt_len + 1, cache.granularity
    want = kv_bytes(cfg, DTYPES[dtype].size, math.ceil(n / g) * g)
    try:
        held = cache.kv_bytes(0)
    except NotApplicable as e:
        pytest.skip(f"engine {engine.name}: {e}")
    metric("held - formula (bytes)", held - want)
    assert cache.tokens(0) == n
    assert held == want, (
        f"{held} bytes held for {n} tokens; the formula at {g}-token granularity gives {want} "
        f"({held / kv_bytes(cfg, DTYPES[dtype].size, n):.2f}x the unpadded bytes)"
    )


@IMPL_ONLY
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("hold", [False, True], ids=["released", "held"])
def test_steps_write_the_pool_in_place(checkpoint, compiled, hold):
    """A prefill and a decode write their K/V rows into each layer's pool without copying
    it (``write_rows`` moves the rows as words, through a view of the same buffer): MLX's
    peak memory grows by less than one pool. Keeping the old pools alive (``hold``) must
    force the copy, and the check must see it: it can fail."""
    from conform_mlx.impl.engine import CompiledSteps, decode, prefill
    from conform_mlx.impl.loader import load

    model = load(checkpoint("tiny-gqa8"), "float16")
    steps = CompiledSteps(model) if compiled else None
    cache = PagedKVCache(model.config, num_blocks=1024, block_size=16, dtype=mx.float16)
    pool = cache.kv[0].nbytes  # 2 MiB a layer: far above the steps' own arrays
    cache.add_sequence(0)
    prefill(model, cache, 0, list(range(3, 40)), steps=steps)  # traces, caches the kernels
    decode(model, cache, [0], [5], steps=steps)
    held = list(cache.kv) if hold else []
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    prefill(model, cache, 0, list(range(3, 20)), steps=steps)
    decode(model, cache, [0], [7], steps=steps)
    grown = mx.get_peak_memory() - base
    copied = grown >= pool
    assert copied == hold, f"peak grew {grown} bytes; one pool is {pool}"
    assert cache.tokens(0) == 37 + 1 + 17 + 1
    del held
