"""The engine interface: what the suites and benchmarks need from an MLX inference engine.

An engine loads a HuggingFace checkpoint directory in a dtype, feeds tokens through
its own KV cache and returns logits as float32 numpy. Its cache reports what it can
about itself; a fact it cannot give raises ``NotApplicable`` with the reason, and
the suites show that reason as a skip.

Built in: ``impl`` (this project's paged engine) and ``mlx-lm``. Any other engine is
named by an entry point in the group ``conform.engines`` or by ``module:Class``;
see the README's "Engines" section for a complete example.

Trace (for localizing a parity failure): a dict that ``prefill`` and ``decode`` fill
with one float32 array (tokens, hidden) per call under the names of
``conform.localize.trace_order`` (HF's module names). An engine may record a subset;
localization then looks only at what was recorded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")
ENTRY_POINT_GROUP = "conform.engines"
BUILTIN = {
    "impl": "conform.engines.impl_engine:ImplEngine",
    "mlx-lm": "conform.engines.mlx_lm_engine:MlxLmEngine",
}

Trace = dict[str, list[np.ndarray]]


class EngineError(ValueError):
    """An engine name that does not resolve, or an engine that cannot be loaded."""


class NotApplicable(Exception):
    """The engine's cache has no such fact or option; the message says why."""


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

    def block_facts(self, seq: Hashable) -> BlockFacts:
        raise NotApplicable("unpaged cache, no block accounting")


class Engine(ABC):
    """A loaded model plus the way it runs; one instance per (checkpoint, dtype)."""

    name: ClassVar[str]

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

    def known_issue(self, model_dir: Path) -> str | None:
        """Why this engine version is known to get ``model_dir`` wrong, or None.

        The suites mark such cases as strict expected failures with this reason.
        """
        return None

    def greedy(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        cache: EngineCache | None = None,
        seq: Hashable = 0,
    ) -> Greedy:
        """Greedy decoding without EOS; the cache ends with P + G - 1 tokens."""
        if cache is None:
            cache = self.new_cache(len(prompt) + max_new_tokens)
            cache.add_sequence(seq)
        rows = [self.prefill(cache, seq, prompt)[-1]]
        tokens = [int(np.argmax(rows[-1]))]
        while len(tokens) < max_new_tokens:
            rows.append(self.decode(cache, seq, tokens[-1]))
            tokens.append(int(np.argmax(rows[-1])))
        return Greedy(tokens, np.stack(rows))


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
        raise EngineError(f"engine {spec!r}: {target} is not a subclass of conform.engines.Engine")
    if not isinstance(getattr(cls, "name", None), str):
        raise EngineError(f"engine {spec!r}: {target} must set a class attribute `name` (str)")
    return cls
