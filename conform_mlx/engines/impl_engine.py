"""This project's engine (``impl/``) behind the engine interface: a paged KV cache
that stores only the K/V heads, with block accounting.

``impl-compiled`` is the same engine with every step one ``mx.compile``d graph (the
engine's ``CompiledSteps``; see ``impl.engine.decode``), and ``impl-dequantized`` the
same with quantized weights turned into floats at load, so the suites and benchmarks
take them as more engine names. ``greedy`` is ``impl.engine.generate``, pipelined and
compiled on every engine here; prefill and decode stay eager on ``impl``, so faults
the suites patch into impl reach them.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Collection, Hashable, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from conform_mlx.engines import (
    BlockFacts,
    Engine,
    EngineCache,
    Greedy,
    NotApplicable,
    Trace,
    check_dtype,
)
from conform_mlx.impl import engine as impl_engine
from conform_mlx.impl.kernels.policy import current_policy, use_policy
from conform_mlx.impl.loader import load
from conform_mlx.impl.model import Model
from conform_mlx.impl.paged_cache import PagedKVCache

DEFAULT_BLOCK_SIZE = 16  # the block size of `conform validate` and the parity suite


class ImplCache(EngineCache):
    """A PagedKVCache. A sequence holds whole blocks, so
    kv_bytes(seq) == blocks_used(seq) * (pool bytes / num_blocks)."""

    def __init__(self, paged: PagedKVCache) -> None:
        self.paged = paged
        self.granularity = paged.block_size

    def add_sequence(self, seq: Hashable) -> None:
        self.paged.add_sequence(seq)

    def release(self, seq: Hashable) -> None:
        self.paged.release(seq)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        self.paged.fork(parent, child)

    def trim(self, seq: Hashable, n: int) -> int:
        return self.paged.trim(seq, n)

    def tokens(self, seq: Hashable) -> int:
        return self.paged.tokens(seq)

    def kv_bytes(self, seq: Hashable) -> int:
        return self.paged.blocks_used(seq) * (self.paged.nbytes // self.paged.num_blocks)

    def block_facts(self, seq: Hashable) -> BlockFacts:
        return BlockFacts(
            block_size=self.paged.block_size,
            blocks_used=self.paged.blocks_used(seq),
            num_blocks=self.paged.num_blocks,
            num_free=self.paged.allocator.num_free,
        )


class ImplEngine(Engine):
    name = "impl"
    compiled = False  # prefill and decode through the engine's compiled steps
    dequantize = False  # passed to impl.loader.load
    policy_changes: dict = {}  # to the kernel policy, for every step this engine runs

    def __init__(self, model: Model) -> None:
        self.model = model
        self.steps = impl_engine.CompiledSteps(model)  # compiled here, at the call site
        self.step_graphs = self.steps if self.compiled else None  # prefill and decode

    @classmethod
    def load(cls, model_dir: Path, dtype: str) -> ImplEngine:
        # finite=False: load_engine's door (conform_mlx.models.open_model) checked the
        # weights for NaN/Inf, or was told not to (--allow-non-finite).
        return cls(load(model_dir, check_dtype(dtype), dequantize=cls.dequantize, finite=False))

    @classmethod
    def version(cls) -> str:
        try:  # a source tree on PYTHONPATH (the GPU machine) has no installed metadata
            return f"conform-mlx {importlib.metadata.version('conform-mlx')}"
        except importlib.metadata.PackageNotFoundError:
            return "conform-mlx (source tree)"

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.dtype

    def weights(self) -> str:
        return self.model.weights_format

    def new_cache(
        self, max_tokens: int, max_sequences: int = 1, block_size: int | None = None
    ) -> ImplCache:
        bs = block_size or DEFAULT_BLOCK_SIZE
        blocks = max_sequences * -(-max_tokens // bs)
        return ImplCache(PagedKVCache(self.model.config, blocks, bs, self.dtype))

    def prefill(
        self,
        cache: ImplCache,
        seq: Hashable,
        tokens: Sequence[int],
        *,
        chunk_size: int | None = None,
        trace: Trace | None = None,
    ) -> np.ndarray:
        step: dict[str, list[mx.array]] | None = {} if trace is not None else None
        with self._policy():
            out = impl_engine.prefill(
                self.model, cache.paged, seq, tokens, chunk_size, step, steps=self.step_graphs
            )
        _join(step, trace)
        return impl_engine.to_numpy(out)

    def decode(
        self, cache: ImplCache, seq: Hashable, token: int, *, trace: Trace | None = None
    ) -> np.ndarray:
        step: dict[str, list[mx.array]] | None = {} if trace is not None else None
        with self._policy():
            out = impl_engine.decode(
                self.model, cache.paged, [seq], [token], step, steps=self.step_graphs
            )
        _join(step, trace)
        return impl_engine.to_numpy(out)[0]

    def decode_batch(
        self, cache: ImplCache, seqs: Sequence[Hashable], tokens: Sequence[int]
    ) -> np.ndarray:
        return impl_engine.to_numpy(self._decode(cache, seqs, tokens))

    def run_decode(self, cache: ImplCache, seqs: Sequence[Hashable], tokens: Sequence[int]) -> None:
        self._decode(cache, seqs, tokens)  # evaluated inside impl.engine.decode

    def run_prefill(self, cache: ImplCache, seq: Hashable, tokens: Sequence[int]) -> None:
        with self._policy():
            impl_engine.prefill(self.model, cache.paged, seq, tokens, steps=self.step_graphs)

    def fill(self, cache: ImplCache, seq: Hashable, n: int) -> None:
        """Reserves the slots (``PagedKVCache.plan``) and leaves their K/V as they are."""
        if n > 0:
            cache.paged.plan([seq], n)

    def _decode(
        self, cache: ImplCache, seqs: Sequence[Hashable], tokens: Sequence[int]
    ) -> mx.array:
        with self._policy():
            return impl_engine.decode(self.model, cache.paged, seqs, tokens, steps=self.step_graphs)

    def _policy(self):
        """The kernel policy this engine's steps run under (``policy_changes``)."""
        return use_policy(current_policy().but(**self.policy_changes))

    def greedy(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        cache: ImplCache | None = None,
        seq: Hashable = 0,
        *,
        eos_token_ids: Collection[int] = (),
    ) -> Greedy:
        """Through impl.engine.generate (pipelined, on-device greedy), so its loop and
        timing are what gets checked."""
        with self._policy():
            gen = impl_engine.generate(
                self.model,
                prompt,
                max_new_tokens,
                cache=cache.paged if cache is not None else None,
                seq=seq,
                eos_token_ids=list(eos_token_ids),
                keep_logits=True,
                steps=self.steps,
            )
        p = len(prompt)
        return Greedy(
            gen.tokens, gen.logits[p - 1 :], gen.prefill_ms, gen.decode_ms, gen.logits[:p]
        )

    def generate(
        self, prompt: Sequence[int], max_new_tokens: int, *, eos_token_ids: Collection[int] = ()
    ) -> list[int]:
        """impl.engine.generate as a user calls it: pipelined, compiled, no logits kept."""
        with self._policy():
            gen = impl_engine.generate(
                self.model, prompt, max_new_tokens, eos_token_ids=list(eos_token_ids),
                steps=self.steps,
            )  # fmt: skip
        return gen.tokens


class ImplCompiledEngine(ImplEngine):
    """impl with every step compiled. A compiled graph keeps what it traced, so a
    fault patched into impl afterwards does not reach it (see impl.engine.decode)."""

    name = "impl-compiled"
    compiled = True


class ImplBatchInvariantEngine(ImplCompiledEngine):
    """impl with every projection multiplying each row alone (``KernelPolicy.batch_invariant``):
    a sequence's logits are bitwise the same whatever else is in its batch, and a prompt's
    rows the same through prefill or decode, at the cost of one matmul a row. Compiled, as
    served; decode attention splits no sequence (``launch_plan``)."""

    name = "impl-batch-invariant"
    compiled = True

    @classmethod
    def load(cls, model_dir: Path, dtype: str) -> ImplEngine:
        engine = super().load(model_dir, dtype)
        if any(isinstance(m, nn.QuantizedLinear) for _, m in engine.model.named_modules()):
            raise NotApplicable(
                "the batch-invariant mode runs float weights only: MLX's quantized matmul "
                "takes a batch's rows together"
            )
        return engine

    # norm_linear off: one row would take the fused kernel and a batch's rows would not.
    policy_changes = {"batch_invariant": True, "norm_linear": False}


class ImplDequantizedEngine(ImplEngine):
    """impl with quantized weights de-quantized to floats at load. MLX's CPU quantized
    matmul is ~100x slower than its BLAS on 512 rows, so long corpus runs on the CPU
    use this; reports name it, and the quantized path is judged by ``impl``."""

    name = "impl-dequantized"
    dequantize = True


def _join(step: dict[str, list[mx.array]] | None, trace: Trace | None) -> None:
    """impl's trace holds (1, T, hidden) arrays per forward call; ours (T, hidden)."""
    if step is None or trace is None:
        return
    for name, arrays in step.items():
        trace.setdefault(name, []).extend(impl_engine.to_numpy(a[0]) for a in arrays)
