"""The llama.cpp adapter's own contract (``conform_mlx/engines/llama_cpp_engine.py``):
one context shared by the cache's sequences must give each sequence what it would get
alone, and an id outside the vocabulary must be refused before llama.cpp sees it (it
aborts the process). Runs where llama-cpp-python is installed (the ``llama-cpp`` extra)."""

from __future__ import annotations

import numpy as np
import pytest

from conform_mlx.engines import load_engine
from conform_mlx.models import open_model
from conform_mlx.reference import checkpoints
from conform_mlx.reference.gguf_writer import write_gguf

pytestmark = [
    pytest.mark.impl_only("tests the llama.cpp adapter itself, whatever engine the run judges"),
    pytest.mark.checkpoint_group("kquants"),
]

TOKENS = np.random.default_rng(0).integers(0, 512, 24).tolist()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (the llama-cpp extra)"
    )
    root = tmp_path_factory.mktemp("llama")
    src = checkpoints.write_random_checkpoint("tiny-gqa8", root / "float", seed=1)
    path = write_gguf(src, root / "q8.gguf", "Q8_0", vocab=True)
    return load_engine("llama.cpp", open_model(path), "float32")


def _run(engine, cache, seq) -> np.ndarray:
    first = engine.prefill(cache, seq, TOKENS[:16])
    rest = [engine.decode(cache, seq, t) for t in TOKENS[16:]]
    return np.concatenate([first, np.stack(rest)])


def test_sequences_sharing_the_context_match_one_alone(llama):
    cache = llama.new_cache(64)
    for seq in "abc":
        cache.add_sequence(seq)
    alone = _run(llama, cache, "a")
    np.testing.assert_array_equal(_run(llama, cache, "b"), alone)  # a's KV dropped first
    llama.prefill(cache, "c", TOKENS[:3])
    assert cache.trim("b", 4) == 4  # b, back to 20 tokens while c holds the context
    np.testing.assert_array_equal(llama.decode(cache, "b", TOKENS[20]), alone[20])
    assert cache.tokens("b") == 21 and cache.tokens("c") == 3


def test_an_id_outside_the_vocabulary_is_refused(llama):
    cache = llama.new_cache(8)
    cache.add_sequence(0)
    with pytest.raises(
        ValueError, match=r"token id 512 at index 1 is outside the vocabulary \[0, 512\)"
    ):
        llama.prefill(cache, 0, [5, 512])
    assert cache.tokens(0) == 0
