"""The engine interface: what the suites and benchmarks need from an MLX inference engine.

An engine loads a checkpoint (a HuggingFace directory, float or quantized in mlx-lm's
format, or a GGUF file) in a dtype (the activation dtype of a quantized model), feeds tokens through
its own KV cache and returns logits as float32 numpy. Its cache reports what it can
about itself; a fact it cannot give raises ``NotApplicable`` with the reason, and
the suites show that reason as a skip.

Built in: ``impl`` (this project's paged engine), ``impl-compiled`` (the same with
each step one ``mx.compile``d graph), ``impl-dequantized`` (quantized weights turned
into floats at load: the CPU's fast path for corpus runs), ``impl-batch-invariant``
(every projection row by row: batch-invariant logits), ``mlx-lm``, ``hf``
(the HF transformers reference on torch CPU, float32) and ``llama.cpp`` (GGUF files,
through llama-cpp-python). Any other engine is named by
an entry point in the group ``conform_mlx.engines`` or by ``module:Class``; see the
README's "Engines" section for a complete example. This module is the one door: the
suites, ``conform validate``, the asv benchmarks and tools/gpu_bench.py reach every engine through
``resolve``.

Methods with a default (``decode_batch``, ``fill``, ``run_prefill``, ``run_decode``,
``greedy``, and the cache's ``trim``, ``fork``, ``block_facts``) are built on the
abstract ones or raise ``NotApplicable``, so an engine that implements only the
abstract methods runs every suite and benchmark it can.

Trace (for localizing a parity failure): a dict that ``prefill`` and ``decode`` fill
with one float32 array (tokens, hidden) per call under the names of
``conform_mlx.localize.trace_order`` (HF's module names). An engine may record a subset;
localization then looks only at what was recorded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from conform_mlx.models import ModelInput

DTYPES = ("float32", "float16", "bfloat16")
ENTRY_POINT_GROUP = "conform_mlx.engines"
BUILTIN = {
    "impl": "conform_mlx.engines.impl_engine:ImplEngine",
    "impl-compiled": "conform_mlx.engines.impl_engine:ImplCompiledEngine",
    "impl-dequantized": "conform_mlx.engines.impl_engine:ImplDequantizedEngine",
    "impl-batch-invariant": "conform_mlx.engines.impl_engine:ImplBatchInvariantEngine",
    "mlx-lm": "conform_mlx.engines.mlx_lm_engine:MlxLmEngine",
    "hf": "conform_mlx.engines.hf_engine:HfEngine",
    "llama.cpp": "conform_mlx.engines.llama_cpp_engine:LlamaCppEngine",
}

Trace = dict[str, list[np.ndarray]]


class EngineError(ValueError):
    """An engine name that does not resolve, or an engine that cannot be loaded."""


class NotApplicable(Exception):
    """The engine or its cache has no such fact, option or workload; the message says
    why. The suites show it as a skip, the benchmarks as skipped."""


@dataclass(frozen=True)
class BlockFacts:
    """Block accounting of one sequence in a paged cache.

    blocks_used == ceil(tokens / block_size); num_free <= num_blocks.
    """

    block_size: int
    blocks_used: int
    num_blocks: int
    num_free: int


@dataclass
class Greedy:
    tokens: list[int]  # generated; the last one is never fed back
    logits: np.ndarray  # (len(tokens), vocab) float32: row i chose tokens[i]
    # Wall-clock ms, each up to the chosen token on the host: the prefill (with the
    # first token), then one entry per decode step, len(tokens) - 1 of them. An engine
    # whose own greedy does not time itself leaves them None / empty.
    prefill_ms: float | None = None
    decode_ms: list[float] = field(default_factory=list)
    # (P, vocab) float32: every prompt position's row (the last is logits[0]), so a
    # report can judge each fed position; None from an engine that does not keep them.
    prompt_logits: np.ndarray | None = None


class EngineCache(ABC):
    """One engine's KV cache, holding any number of sequences.

    tokens(seq) == number of tokens fed through the model for seq.
    kv_bytes(seq) is measured from the arrays that hold seq's keys and values.
    """

    granularity: int  # tokens per allocation unit (a block, or a growth step)

    @abstractmethod
    def add_sequence(self, seq: Hashable) -> None: ...

    @abstractmethod
    def release(self, seq: Hashable) -> None: ...

    @abstractmethod
    def tokens(self, seq: Hashable) -> int: ...

    @abstractmethod
    def kv_bytes(self, seq: Hashable) -> int: ...

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """``child`` starts with a copy of ``parent``'s cached tokens."""
        raise NotApplicable(f"{type(self).__name__} cannot fork a sequence")

    def trim(self, seq: Hashable, n: int) -> int:
        """Forget the last ``n`` tokens of ``seq`` (all, if it holds fewer); returns how
        many went. It rolls a step back: rejected speculative tokens, or a benchmark's
        decode that must leave the context as it found it for the next sample."""
        raise NotApplicable(f"{type(self).__name__} cannot trim a sequence")

    def block_facts(self, seq: Hashable) -> BlockFacts:
        raise NotApplicable("unpaged cache, no block accounting")


class Engine(ABC):
    """A loaded model plus the way it runs; one instance per (checkpoint, dtype)."""

    name: ClassVar[str]
    # Reads GGUF files only (llama.cpp): the suites hand it their HF checkpoints as GGUF.
    gguf_only: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path, dtype: str) -> Engine: ...

    @classmethod
    @abstractmethod
    def version(cls) -> str:
        """Engine name and release, e.g. "mlx-lm 0.32.2"."""

    @abstractmethod
    def new_cache(
        self, max_tokens: int, max_sequences: int = 1, block_size: int | None = None
    ) -> EngineCache:
        """A cache for ``max_sequences`` sequences of up to ``max_tokens`` tokens each.

        ``block_size`` is for paged caches; an unpaged one raises NotApplicable.
        """

    @abstractmethod
    def prefill(
        self,
        cache: EngineCache,
        seq: Hashable,
        tokens: Sequence[int],
        *,
        chunk_size: int | None = None,
        trace: Trace | None = None,
    ) -> np.ndarray:
        """Feed ``tokens`` after what ``seq`` has cached; logits (len(tokens), vocab).

        With ``chunk_size``, the tokens go through the model that many at a time.
        """

    @abstractmethod
    def decode(
        self, cache: EngineCache, seq: Hashable, token: int, *, trace: Trace | None = None
    ) -> np.ndarray:
        """Feed one token to ``seq``; logits (vocab,)."""

    def weights(self) -> str | None:
        """How the loaded weights are stored and run (e.g. "GGUF Q4_1 x210, Q8_0 x1,
        F32 x61"), for reports; None when the engine does not say."""
        return None

    def known_issue(self, model_dir: Path) -> str | None:
        """Why this engine version is known to get ``model_dir`` wrong, or None.

        The suites mark such cases as strict expected failures with this reason.
        """
        return None

    def decode_batch(
        self, cache: EngineCache, seqs: Sequence[Hashable], tokens: Sequence[int]
    ) -> np.ndarray:
        """Feed ``tokens[i]`` to ``seqs[i]``, one step for all; logits (len(seqs), vocab).

        Default: one ``decode`` per sequence; an engine that batches overrides it.
        """
        if len(seqs) != len(tokens):
            raise ValueError(f"decode_batch: {len(seqs)} sequences but {len(tokens)} tokens")
        return np.stack([self.decode(cache, s, t) for s, t in zip(seqs, tokens)])

    def fill(self, cache: EngineCache, seq: Hashable, n: int) -> None:
        """Grow ``seq`` by ``n`` positions of arbitrary K/V, as if ``n`` tokens had been fed.

        A decode step costs the same whatever the cached values, so benchmarks reach a
        context this way: a 2047-token prefill takes minutes on a CPU. Default: a
        prefill of ``n`` random ids below 256 (every Llama vocabulary has them).
        """
        if n > 0:
            self.prefill(cache, seq, np.random.default_rng(0).integers(0, 256, n).tolist())

    def run_prefill(self, cache: EngineCache, seq: Hashable, tokens: Sequence[int]) -> None:
        """``prefill`` for timing: the same work, evaluated, nothing returned, so the time
        holds no copy of (tokens, vocab) logits to the host. Default: ``prefill``."""
        self.prefill(cache, seq, tokens)

    def run_decode(
        self, cache: EngineCache, seqs: Sequence[Hashable], tokens: Sequence[int]
    ) -> None:
        """``decode_batch`` for timing, likewise. Default: ``decode_batch``."""
        self.decode_batch(cache, seqs, tokens)

    def greedy(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        cache: EngineCache | None = None,
        seq: Hashable = 0,
        *,
        eos_token_ids: Collection[int] = (),
    ) -> Greedy:
        """Greedy decoding up to ``max_new_tokens``, or through the first token in
        ``eos_token_ids``; the last token is never fed back, so the cache ends with
        P + G - 1 tokens. Each step is timed (see ``Greedy``)."""
        if cache is None:
            cache = self.new_cache(len(prompt) + max_new_tokens)
            cache.add_sequence(seq)
        t0 = time.perf_counter()
        prompt_rows = self.prefill(cache, seq, prompt)
        rows = [prompt_rows[-1]]
        tokens = [int(np.argmax(rows[-1]))]
        prefill_ms = (time.perf_counter() - t0) * 1e3
        decode_ms = []
        while len(tokens) < max_new_tokens and tokens[-1] not in eos_token_ids:
            t0 = time.perf_counter()
            rows.append(self.decode(cache, seq, tokens[-1]))
            tokens.append(int(np.argmax(rows[-1])))
            decode_ms.append((time.perf_counter() - t0) * 1e3)
        return Greedy(tokens, np.stack(rows), prefill_ms, decode_ms, prompt_rows)

    def generate(
        self, prompt: Sequence[int], max_new_tokens: int, *, eos_token_ids: Collection[int] = ()
    ) -> list[int]:
        """Greedy tokens through the engine's own generation loop, as its users call it
        (no logits kept, nothing checked): what a tokens/s figure should time. The
        default is ``greedy``; an engine with a faster loop of its own overrides it."""
        return self.greedy(prompt, max_new_tokens, eos_token_ids=eos_token_ids).tokens


def chunks(tokens: Sequence[int], chunk_size: int | None) -> list[list[int]]:
    """``tokens`` in pieces of ``chunk_size`` (one piece when None): a chunked prefill."""
    ids = list(tokens)
    step = chunk_size or len(ids) or 1
    return [ids[i : i + step] for i in range(0, len(ids), step)]


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise EngineError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def known_engines() -> list[str]:
    """Built-in names, then installed entry points."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [*BUILTIN, *sorted(ep.name for ep in eps if ep.name not in BUILTIN)]


def resolve(spec: str) -> type[Engine]:
    """The engine class named by ``spec``: a built-in or entry-point name, or module:Class."""
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if spec in BUILTIN:
        target = BUILTIN[spec]
    elif spec in eps:
        target = eps[spec].value
    elif ":" in spec:
        target = spec
    else:
        raise EngineError(
            f"unknown engine {spec!r}; known: {', '.join(known_engines())} "
            "(or give module:Class, or register an entry point in group "
            f"{ENTRY_POINT_GROUP!r})"
        )
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = " (pip install -e '.[peers]')" if spec == "mlx-lm" else ""
        raise EngineError(f"engine {spec!r}: cannot import {module_name} ({e}){hint}") from None
    if not hasattr(module, attr):
        raise EngineError(f"engine {spec!r}: module {module_name} has no attribute {attr!r}")
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise EngineError(
            f"engine {spec!r}: {target} is not a subclass of conform_mlx.engines.Engine"
        )
    if not isinstance(getattr(cls, "name", None), str):
        raise EngineError(f"engine {spec!r}: {target} must set a class attribute `name` (str)")
    return cls


def load_engine(engine: str | type[Engine], model: ModelInput, dtype: str) -> Engine:
    """The one way to load an engine: ``model`` comes from ``conform_mlx.models.open_model``,
    so it has passed every input check before the engine's own ``load`` sees its path."""
    cls = resolve(engine) if isinstance(engine, str) else engine
    return cls.load(model.path, check_dtype(dtype))
