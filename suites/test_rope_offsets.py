"""RoPE offsets: a token decoded after p cached tokens is rotated at position p.

Checked three ways: decode-after-cache logits equal one full forward pass at the
same position (across block boundaries and deep into the context), chunked
prefill equals a single prefill, and the rotation itself equals the formula at
chosen offsets. Faults are injected to show the checks can fail.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import kernels.rope_cache_write
from impl.engine import decode, prefill, to_numpy
from impl.paged_cache import PagedKVCache
from suites.tolerances import FP32_SAME_ENGINE_ATOL

BLOCK_SIZE = 16
POSITIONS = [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 200, 511]  # 511: the last (max 512)
CHUNKS = [1, 3, BLOCK_SIZE - 1, BLOCK_SIZE + 1]
ROPE_OFFSETS = [0, 1, 15, 16, 17, 1000]


@pytest.fixture(scope="module")
def model(trained_dir, model_factory):
    return model_factory(trained_dir)


@pytest.fixture(scope="module")
def tokens(model) -> list[int]:
    n = model.config.max_position_embeddings
    return np.random.default_rng(1).integers(3, model.config.vocab_size, n).tolist()


@pytest.fixture(scope="module")
def full_pass(model, tokens) -> np.ndarray:
    """Logits at every position of one prefill over the whole context."""
    cache = PagedKVCache.for_tokens(model.config, len(tokens), BLOCK_SIZE)
    cache.add_sequence(0)
    return to_numpy(prefill(model, cache, 0, tokens))


def decode_at(model, tokens: list[int], p: int) -> np.ndarray:
    """Logits of token p, decoded after a cache holding tokens[:p]."""
    cache = PagedKVCache.for_tokens(model.config, p + 1, BLOCK_SIZE)
    cache.add_sequence(0)
    prefill(model, cache, 0, tokens[:p])
    assert cache.tokens(0) == p
    return to_numpy(decode(model, cache, [0], [tokens[p]]))[0]


def check_decode_offsets(model, tokens, full_pass) -> None:
    for p in POSITIONS:
        np.testing.assert_allclose(
            decode_at(model, tokens, p),
            full_pass[p],
            atol=FP32_SAME_ENGINE_ATOL,
            rtol=0,
            err_msg=f"decode after {p} cached tokens differs from the full pass at position {p}",
        )


def test_decode_after_p_cached_tokens_equals_full_pass(model, tokens, full_pass):
    check_decode_offsets(model, tokens, full_pass)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_prefill_equals_single_prefill(model, tokens, full_pass, chunk):
    n = 3 * BLOCK_SIZE + 5
    cache = PagedKVCache.for_tokens(model.config, n, BLOCK_SIZE)
    cache.add_sequence(0)
    got = to_numpy(prefill(model, cache, 0, tokens[:n], chunk_size=chunk))
    np.testing.assert_allclose(got, full_pass[:n], atol=FP32_SAME_ENGINE_ATOL, rtol=0)


def formula(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF's rotate-half RoPE in float64, with the angle formed in float32 as HF does."""
    angle = (positions[:, None].astype(np.float32) * inv_freq).astype(np.float64)  # (T, D/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]  # (T, 1, D/2)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("offset", [*ROPE_OFFSETS, "max-1"])
@pytest.mark.parametrize("shape", ["tiny-hd128", "tinyllama-1.1b"])
def test_rope_equals_formula(offset, shape):
    from impl.config import LlamaConfig
    from reference.checkpoints import hf_config

    cfg = LlamaConfig.from_dict(hf_config(shape).to_dict())
    pos = cfg.max_position_embeddings - 1 if offset == "max-1" else offset
    positions = np.arange(pos, pos + 3)
    x = np.random.default_rng(pos).standard_normal((1, 3, 4, cfg.dim_per_head)).astype(np.float32)
    inv = cfg.inv_freq()
    got = kernels.rope_cache_write.rope(mx.array(x), mx.array(positions[None]), mx.array(inv))
    # float32 cos/sin of angles up to ~2000 rad carry ~1e-7 relative error each.
    np.testing.assert_allclose(np.array(got)[0], formula(x[0], positions, inv), atol=2e-5, rtol=0)


FAULTS = {
    "off by one": lambda pos: pos + 1,
    "restarts at 0": lambda pos: pos - pos[:, :1],  # every call starts counting at 0
}


@pytest.mark.parametrize("fault", FAULTS)
def test_offset_faults_are_caught(model, tokens, full_pass, monkeypatch, fault):
    real = kernels.rope_cache_write.rope
    shift = FAULTS[fault]

    def faulty(x, positions, inv_freq):
        return real(x, shift(positions) if x.shape[1] == 1 else positions, inv_freq)

    monkeypatch.setattr(kernels.rope_cache_write, "rope", faulty)
    with pytest.raises(AssertionError, match="differs from the full pass"):
        check_decode_offsets(model, tokens, full_pass)
