"""RoPE offsets: a token decoded after p cached tokens is rotated at position p.

Checked three ways: decode-after-cache logits equal one full forward pass at the
same position (across block boundaries and deep into the context), chunked
prefill equals a single prefill (both through the engine under test), and impl's
rotation itself equals the formula at chosen offsets. Faults are injected to show
the checks can fail.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import conform_mlx.impl.kernels.rope
from conform_mlx.engines import Engine, NotApplicable
from conform_mlx.engines.impl_engine import DEFAULT_BLOCK_SIZE as BLOCK_SIZE
from conform_mlx.impl.config import LlamaConfig
from suites.tolerances import FP32_SAME_ENGINE_ATOL

pytestmark = pytest.mark.engine_suite

# Positions and chunks straddle impl's blocks; for an unpaged engine they are just
# positions.
POSITIONS = [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 200, 511]  # 511: the last (max 512)
CHUNKS = [1, 3, BLOCK_SIZE - 1, BLOCK_SIZE + 1]
ROPE_OFFSETS = [0, 1, 15, 16, 17, 1000]


@pytest.fixture(scope="module")
def engine(trained_dir, engine_factory) -> Engine:
    return engine_factory(trained_dir)


@pytest.fixture(scope="module")
def tokens(trained_dir) -> list[int]:
    cfg = LlamaConfig.from_dir(trained_dir)
    n = cfg.max_position_embeddings
    return np.random.default_rng(1).integers(3, cfg.vocab_size, n).tolist()


@pytest.fixture(scope="module")
def full_pass(engine, tokens) -> np.ndarray:
    """Logits at every position of one prefill over the whole context."""
    cache = engine.new_cache(len(tokens))
    cache.add_sequence(0)
    return engine.prefill(cache, 0, tokens)


def decode_at(engine: Engine, tokens: list[int], p: int) -> np.ndarray:
    """Logits of token p, decoded after a cache holding tokens[:p]."""
    cache = engine.new_cache(p + 1)
    cache.add_sequence(0)
    engine.prefill(cache, 0, tokens[:p])
    assert cache.tokens(0) == p
    return engine.decode(cache, 0, tokens[p])


def check_decode_offsets(engine: Engine, tokens, full_pass) -> float:
    """Largest |dlogit| over POSITIONS; raises at the first position out of tolerance."""
    worst = 0.0
    for p in POSITIONS:
        got = decode_at(engine, tokens, p)
        np.testing.assert_allclose(
            got,
            full_pass[p],
            atol=FP32_SAME_ENGINE_ATOL,
            rtol=0,
            err_msg=f"decode after {p} cached tokens differs from the full pass at position {p}",
        )
        worst = max(worst, float(np.abs(got - full_pass[p]).max()))
    return worst


@pytest.mark.conformance("RoPE offsets: decode after p cached")
def test_decode_after_p_cached_tokens_equals_full_pass(engine, tokens, full_pass, metric):
    metric("max|dlogit|", check_decode_offsets(engine, tokens, full_pass))


@pytest.mark.conformance("chunked prefill")
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_prefill_equals_single_prefill(engine, tokens, full_pass, metric, chunk):
    n = 3 * BLOCK_SIZE + 5
    cache = engine.new_cache(n)
    cache.add_sequence(0)
    try:
        got = engine.prefill(cache, 0, tokens[:n], chunk_size=chunk)
    except NotApplicable as e:
        pytest.skip(f"engine {engine.name}: {e}")
    metric("max|dlogit|", float(np.abs(got - full_pass[:n]).max()))
    assert cache.tokens(0) == n
    np.testing.assert_allclose(got, full_pass[:n], atol=FP32_SAME_ENGINE_ATOL, rtol=0)


def formula(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF's rotate-half RoPE in float64, with the angle formed in float32 as HF does."""
    angle = (positions[:, None].astype(np.float32) * inv_freq).astype(np.float64)  # (T, D/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]  # (T, 1, D/2)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.impl_only("checks impl's RoPE kernel against the formula")
@pytest.mark.parametrize("offset", [*ROPE_OFFSETS, "max-1"])
@pytest.mark.parametrize("shape", ["tiny-hd128", "tinyllama-1.1b"])
def test_rope_equals_formula(offset, shape):
    from conform_mlx.reference.checkpoints import hf_config

    cfg = LlamaConfig.from_dict(hf_config(shape).to_dict())
    pos = cfg.max_position_embeddings - 1 if offset == "max-1" else offset
    positions = np.arange(pos, pos + 3)
    x = np.random.default_rng(pos).standard_normal((1, 3, 4, cfg.dim_per_head)).astype(np.float32)
    inv = cfg.inv_freq()
    got = conform_mlx.impl.kernels.rope.rope(mx.array(x), mx.array(positions[None]), mx.array(inv))
    # float32 cos/sin of angles up to ~2000 rad carry ~1e-7 relative error each.
    np.testing.assert_allclose(np.array(got)[0], formula(x[0], positions, inv), atol=2e-5, rtol=0)


FAULTS = {
    "off by one": lambda pos: pos + 1,
    "restarts at 0": lambda pos: pos - pos[:, :1],  # every call starts counting at 0
}


@pytest.mark.impl_only("injects faults into impl's RoPE kernel")
@pytest.mark.parametrize("fault", FAULTS)
def test_offset_faults_are_caught(engine, tokens, full_pass, monkeypatch, fault):
    # Injected where the angles are made, so the twin and the GPU kernel both see it.
    real = conform_mlx.impl.kernels.rope.rope_cos_sin
    shift = FAULTS[fault]

    def faulty(positions, inv_freq, scale=1.0):
        return real(shift(positions) if positions.shape[1] == 1 else positions, inv_freq, scale)

    monkeypatch.setattr(conform_mlx.impl.kernels.rope, "rope_cos_sin", faulty)
    with pytest.raises(AssertionError, match="differs from the full pass"):
        check_decode_offsets(engine, tokens, full_pass)
