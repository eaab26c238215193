"""Any engine through the engine interface (conform.engines), on the small preset.
Class names leave out "Small" so that `asv run --bench Small` measures what it always did.

The engines come from the environment variable CONFORM_ENGINE, a comma-separated
list of names as ``pytest --engine`` takes them (default ``impl``); asv runs
benchmarks in subprocesses, which inherit it:

    CONFORM_ENGINE=impl,mlx-lm asv run --bench bench_engines HEAD^!

The engine is a benchmark parameter, so each engine has its own line in the
history; keep the same list from run to run. bench_engine (ours, through impl's
own API) and bench_peers are unaffected.
"""

from __future__ import annotations

import os

from benchmarks import common
from conform.engines import resolve

ENGINES = [e.strip() for e in os.environ.get("CONFORM_ENGINE", "impl").split(",") if e.strip()]
# A bad name fails at discovery with the list of known engines.
_CLASSES = {name: resolve(name) for name in ENGINES}
_LOADED: dict = {}


def engine(name: str, dtype: str):
    """Loaded once per benchmark process, like common.model."""
    if (name, dtype) not in _LOADED:
        _LOADED[name, dtype] = _CLASSES[name].load(common.checkpoint("small"), dtype)
    return _LOADED[name, dtype]


class EnginePrefill:
    params = (ENGINES, ["float32", "float16"], [16, 128])
    param_names = ["engine", "dtype", "prompt_len"]

    def setup(self, name, dtype, prompt_len):
        self.engine = engine(name, dtype)
        self.prompt = common.tokens(prompt_len, common.BENCH_SMALL["vocab_size"])
        self.cache = self.engine.new_cache(prompt_len)

    def time_prefill(self, name, dtype, prompt_len):
        self.cache.add_sequence(0)
        self.engine.prefill(self.cache, 0, self.prompt)  # logits come back as numpy
        self.cache.release(0)


class EngineDecode:
    """One decode step after a prefill of context - 1 tokens, batch 1. Each sample
    forks the filled sequence, decodes one token and releases the fork, so every
    sample sees the same context; an engine that cannot fork is skipped."""

    params = (ENGINES, ["float32", "float16"], [16, 512])
    param_names = ["engine", "dtype", "context"]

    def setup(self, name, dtype, context):
        from conform.engines import NotApplicable

        self.engine = engine(name, dtype)
        self.cache = self.engine.new_cache(context, max_sequences=2)
        self.cache.add_sequence("ctx")
        ids = common.tokens(context - 1, common.BENCH_SMALL["vocab_size"])
        self.engine.prefill(self.cache, "ctx", ids)
        try:
            self.cache.fork("ctx", "probe")
        except NotApplicable as e:
            raise NotImplementedError(f"engine {name}: {e}") from None  # asv: skipped
        self.cache.release("probe")

    def time_decode(self, name, dtype, context):
        self.cache.fork("ctx", "step")
        self.engine.decode(self.cache, "step", 5)
        self.cache.release("step")
