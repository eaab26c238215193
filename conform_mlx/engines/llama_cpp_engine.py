"""llama.cpp (through llama-cpp-python) behind the engine interface: the engine GGUF
files are made for, judged by the same reference and corpus as ours.

GGUF files only, float32 only (llama.cpp picks its own compute types; for quantized
weights it rounds the activations to 8 bits for its dot products, so its logits are
not float32-exact: ``known_issue`` says so and the parity suites expect the failure).
One llama.cpp context holds one sequence's KV at a time; the cache keeps each
sequence's tokens, and a step on a sequence other than the one in the context
re-feeds that sequence's tokens first (a benchmark switches sequence rarely). Its
memory is one buffer for the whole context, so there is no per-sequence KV size.

Install: ``pip install -e '.[llama-cpp]'`` builds llama.cpp from source (docs/engines.md
gives the build flags this machine needs).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from conform_mlx.engines import (
    Engine,
    EngineCache,
    EngineError,
    NotApplicable,
    Trace,
    check_dtype,
    chunks,
)

# The context llama.cpp is given: with every position's logits kept, it holds an
# (n_ctx, vocab) float32 array (SmolLM2: 400 MB at 2048).
N_CTX = 2048
# general.file_type of all-float files: ALL_F32, MOSTLY_F16, MOSTLY_BF16 (llama.cpp's enum).
FLOAT_FILE_TYPES = (0, 1, 32)


class LlamaCppCache(EngineCache):
    granularity = 1

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.history: dict[Hashable, list[int]] = {}

    def add_sequence(self, seq: Hashable) -> None:
        if seq in self.history:
            raise KeyError(f"sequence {seq!r} already exists")
        self.history[seq] = []

    def release(self, seq: Hashable) -> None:
        del self.history[self._check(seq)]

    def tokens(self, seq: Hashable) -> int:
        return len(self.history[self._check(seq)])

    def kv_bytes(self, seq: Hashable) -> int:
        raise NotApplicable("llama.cpp's KV cache is one buffer for the context, not per sequence")

    def fork(self, parent: Hashable, child: Hashable) -> None:
        if child in self.history:
            raise KeyError(f"sequence {child!r} already exists")
        self.history[child] = list(self.history[self._check(parent)])

    def trim(self, seq: Hashable, n: int) -> int:
        if n < 0:
            raise ValueError(f"cannot trim a negative number of tokens ({n})")
        held = self.history[self._check(seq)]
        n = min(n, len(held))
        del held[len(held) - n :]
        return n

    def _check(self, seq: Hashable) -> Hashable:
        if seq not in self.history:
            raise KeyError(f"unknown sequence {seq!r}")
        return seq


class LlamaCppEngine(Engine):
    name = "llama.cpp"
    gguf_only = True

    def __init__(self, llm, path: Path) -> None:
        self.llm = llm
        self.path = path
        self.held: list[int] = []  # the tokens whose KV the context holds, in order

    @classmethod
    def load(cls, model_dir: Path, dtype: str) -> LlamaCppEngine:
        if check_dtype(dtype) != "float32":
            raise NotApplicable(
                f"llama.cpp picks its own compute types; run it as float32, not {dtype}"
            )
        path = Path(model_dir)
        if path.suffix != ".gguf":
            raise NotApplicable("llama.cpp reads GGUF files only")
        try:
            from llama_cpp import GGML_TYPE_F32, Llama
        except ImportError:
            raise NotApplicable(
                "llama-cpp-python is not installed (pip install -e '.[llama-cpp]'; docs/engines.md)"
            ) from None
        try:
            llm = Llama(
                str(path),
                n_ctx=N_CTX,
                logits_all=True,  # every position's logits, for parity and the corpus
                # K and V in float32, as the run's dtype says (llama.cpp's default float16
                # cache put an F32 file at NMSE 2.9e-7 from HF: docs/engines.md)
                type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32,
                n_threads=os.cpu_count(),
                verbose=False,
            )
        except ValueError:  # llama.cpp logs why; the Python side says only that it failed
            import gguf

            if "tokenizer.ggml.model" not in gguf.GGUFReader(path).fields:
                raise NotApplicable(
                    "llama.cpp loads only GGUF files that carry a tokenizer (tokenizer.ggml.*)"
                ) from None
            raise EngineError(f"llama.cpp could not load {path} (its log says why)") from None
        return cls(llm, path)

    @classmethod
    def version(cls) -> str:
        return f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}"

    def weights(self) -> str:
        import llama_cpp

        ftype = self._file_type()
        names = [n for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_")]
        name = next((n for n in names if getattr(llama_cpp, n) == ftype), "of unnamed type")
        return f"GGUF {name.removeprefix('LLAMA_FTYPE_')}, llama.cpp's own kernels"

    def known_issue(self, model_dir: Path) -> str | None:
        if self._file_type() in FLOAT_FILE_TYPES:
            return None
        return (
            "llama.cpp rounds activations to 8 bits for its quantized dot products, so its "
            "logits are not float32-exact (KL mean 4.5e-3 to 5.8e-3 on SmolLM2-135M K-quants, "
            "results/quantized/README.md)"
        )

    def _file_type(self) -> int:
        """GGUF's general.file_type (llama.cpp's LLAMA_FTYPE_*); -1 where the file has none."""
        return int(self.llm.metadata.get("general.file_type", -1))

    def new_cache(
        self, max_tokens: int, max_sequences: int = 1, block_size: int | None = None
    ) -> LlamaCppCache:
        if block_size is not None:
            raise NotApplicable("unpaged cache, no block size")
        if max_tokens > self.llm.n_ctx():
            raise ValueError(
                f"{max_tokens} tokens exceed llama.cpp's context n_ctx={self.llm.n_ctx()}"
            )
        return LlamaCppCache(max_tokens)

    def prefill(
        self,
        cache: LlamaCppCache,
        seq: Hashable,
        tokens: Sequence[int],
        *,
        chunk_size: int | None = None,
        trace: Trace | None = None,
    ) -> np.ndarray:
        held, n_ctx = cache.history[cache._check(seq)], self.llm.n_ctx()
        if len(held) + len(tokens) > n_ctx:  # checked whole, so no chunk is fed first
            raise ValueError(
                f"sequence {seq!r}: {len(held)} cached + {len(tokens)} new tokens exceed "
                f"llama.cpp's context n_ctx={n_ctx}"
            )
        return np.concatenate([self._forward(cache, seq, c) for c in chunks(tokens, chunk_size)])

    def decode(
        self, cache: LlamaCppCache, seq: Hashable, token: int, *, trace: Trace | None = None
    ) -> np.ndarray:
        return self._forward(cache, seq, [token])[0]

    def _forward(self, cache: LlamaCppCache, seq: Hashable, ids: list[int]) -> np.ndarray:
        """Logits (T, vocab) float32 of ``ids`` fed after what ``seq`` holds."""
        held = cache.history[cache._check(seq)]
        vocab, n_ctx = self.llm.n_vocab(), self.llm.n_ctx()
        bad = [i for i, t in enumerate(ids) if not 0 <= int(t) < vocab]
        if bad:  # llama.cpp aborts the process on an id outside its vocabulary
            raise ValueError(
                f"token id {ids[bad[0]]} at index {bad[0]} is outside the vocabulary [0, {vocab})"
            )
        if len(held) + len(ids) > n_ctx:
            raise ValueError(
                f"sequence {seq!r}: {len(held)} cached + {len(ids)} new tokens exceed "
                f"llama.cpp's context n_ctx={n_ctx}"
            )
        ids = [int(t) for t in ids]
        # The context holds this sequence, perhaps with tokens since trimmed: keep its
        # KV up to what the sequence holds. Otherwise start over with this sequence.
        start = len(held) if self.held[: len(held)] == held else 0
        if start == 0:
            self.llm.reset()
        self.llm.n_tokens = start  # eval drops the KV past n_tokens, then appends
        self.held = held[:start]  # what the context holds should eval fail part way
        self.llm.eval(held[start:] + ids)
        held.extend(ids)
        self.held = list(held)
        return np.array(self.llm.scores[len(held) - len(ids) : len(held)], dtype=np.float32)
