"""The HF transformers reference (``reference.hf``) behind the engine interface, so
the benchmarks time it on the same workloads as every other engine.

float32 only: it is the reference's dtype, and torch's CPU half-precision matmuls
are not what anyone deploys. Its cache is one ``DynamicCache`` per sequence, which
grows by concatenation, one slot per token (granularity 1). Sequences are decoded
one at a time (the interface's default ``decode_batch``). No trace is recorded:
``reference.hf.Reference.run`` is the reference's traced path.

torch is imported here and in ``reference/`` only.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from conform_mlx.engines import Engine, EngineCache, NotApplicable, Trace, check_dtype, chunks
from conform_mlx.reference.hf import Reference


class HfCache(EngineCache):
    granularity = 1

    def __init__(self, config) -> None:
        self.config = config
        self.seqs: dict[Hashable, DynamicCache] = {}

    def add_sequence(self, seq: Hashable) -> None:
        if seq in self.seqs:
            raise KeyError(f"sequence {seq!r} already exists")
        self.seqs[seq] = DynamicCache(config=self.config)

    def release(self, seq: Hashable) -> None:
        del self.seqs[self._check(seq)]

    def tokens(self, seq: Hashable) -> int:
        return self.seqs[self._check(seq)].get_seq_length()

    def kv_bytes(self, seq: Hashable) -> int:
        layers = self.seqs[self._check(seq)].layers
        tensors = [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def trim(self, seq: Hashable, n: int) -> int:
        if n < 0:
            raise ValueError(f"cannot trim a negative number of tokens ({n})")
        n = min(n, self.tokens(seq))
        if n:
            self.seqs[seq].crop(-n)  # transformers 5: a negative length removes tokens
        return n

    def _check(self, seq: Hashable) -> Hashable:
        if seq not in self.seqs:
            raise KeyError(f"unknown sequence {seq!r}")
        return seq


class HfEngine(Engine):
    name = "hf"

    def __init__(self, ref: Reference) -> None:
        self.ref = ref

    @classmethod
    def load(cls, model_dir: Path, dtype: str) -> HfEngine:
        if check_dtype(dtype) != "float32":
            raise NotApplicable(f"the HF reference runs in float32 only, not {dtype}")
        return cls(Reference(model_dir))

    @classmethod
    def version(cls) -> str:
        versions = {p: importlib.metadata.version(p) for p in ("transformers", "torch")}
        return ", ".join(f"{p} {v}" for p, v in versions.items())

    def new_cache(
        self, max_tokens: int, max_sequences: int = 1, block_size: int | None = None
    ) -> HfCache:
        if block_size is not None:
            raise NotApplicable("unpaged cache, no block size")
        return HfCache(self.ref.config)

    @torch.inference_mode()
    def prefill(
        self,
        cache: HfCache,
        seq: Hashable,
        tokens: Sequence[int],
        *,
        chunk_size: int | None = None,
        trace: Trace | None = None,
    ) -> np.ndarray:
        return np.concatenate([self._forward(cache, seq, c) for c in chunks(tokens, chunk_size)])

    def decode(
        self, cache: HfCache, seq: Hashable, token: int, *, trace: Trace | None = None
    ) -> np.ndarray:
        return self._forward(cache, seq, [token])[0]

    @torch.inference_mode()
    def fill(self, cache: HfCache, seq: Hashable, n: int) -> None:
        """Random K/V appended to every layer, as ``Reference.random_cache`` makes them."""
        if n <= 0:
            return
        cfg, kv = self.ref.config, cache.seqs[cache._check(seq)]
        gen = torch.Generator().manual_seed(0)
        shape = (1, cfg.num_key_value_heads, n, cfg.head_dim)  # (B, kv_heads, T, head_dim)
        for layer in range(cfg.num_hidden_layers):
            k, v = (torch.randn(shape, generator=gen) for _ in "kv")
            kv.update(k, v, layer)

    @torch.inference_mode()
    def _forward(self, cache: HfCache, seq: Hashable, ids: list[int]) -> np.ndarray:
        """Logits (T, vocab) of ``ids`` fed after what ``seq`` holds."""
        kv = cache.seqs[cache._check(seq)]
        start = kv.get_seq_length()
        out = self.ref.model(
            input_ids=torch.tensor([ids]),
            position_ids=torch.arange(start, start + len(ids))[None],
            cache=kv,
            use_cache=True,
        )
        return out.logits[0].float().numpy()
