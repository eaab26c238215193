"""Prefill and decode latency, throughput and memory of every engine, through the
engine interface (conform_mlx.engines) only.

The engines come from CONFORM_ENGINE (see common.ENGINES; default impl) and are the
first parameter of every benchmark, so each engine has its own line in the history:

    CONFORM_ENGINE=impl,impl-compiled,mlx-lm,hf asv run --bench Small HEAD^!

An engine that cannot run a workload (NotApplicable: hf in float16, a cache that
cannot trim) raises NotImplementedError in setup, which asv reports as skipped.

Every class sets ``version``: asv keeps a benchmark's history while its version is
unchanged, whatever else in this file is edited (without it, asv hashes the code and
any edit starts a new history). Bump it on purpose when what the benchmark measures
changes (its inputs, or what the timed region includes), and only then.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

from conform_bench import common
from conform_mlx.engines import NotApplicable, resolve

_RESOLVED = [resolve(name) for name in common.ENGINES]  # a bad name fails at discovery


@contextmanager
def skipped_if_not_applicable(name: str) -> Iterator[None]:
    try:
        yield
    except NotApplicable as e:
        raise NotImplementedError(f"engine {name}: {e}") from None


class _Prefill:
    """Prefill of a prompt into an empty sequence, batch 1."""

    version = "1"
    params = (common.ENGINES, ["float32", "float16"], [16, 128, 512])
    param_names = ["engine", "dtype", "prompt_len"]
    preset = "small"

    def setup(self, name, dtype, prompt_len):
        common.skip_if_too_slow_on_cpu(self.preset, prompt_len)
        with skipped_if_not_applicable(name):
            self.engine = common.engine(name, self.preset, dtype)
        self.cache = common.new_cache(self.engine, prompt_len)
        self.prompt = common.tokens(prompt_len, common.vocab_size(self.preset))

    def time_prefill(self, name, dtype, prompt_len):
        self.cache.add_sequence(0)
        self.engine.run_prefill(self.cache, 0, self.prompt)  # evaluated, logits not copied
        self.cache.release(0)


class _Decode:
    """One decode step at a context length (cached + new token), batch 1.

    The context is made with Engine.fill (arbitrary K/V, no prefill): decode cost does
    not depend on the cached values, and a 2047-token prefill takes minutes on the
    CPU. Each sample decodes one token and trims it off again (EngineCache.trim), so
    every sample sees the same context; an engine that cannot trim is skipped.
    """

    version = "1"
    params = (common.ENGINES, ["float32", "float16"], [16, 512, 2048])
    param_names = ["engine", "dtype", "context"]
    preset = "small"

    def setup(self, name, dtype, context):
        with skipped_if_not_applicable(name):
            self.engine = common.engine(name, self.preset, dtype)
            self.cache = common.new_cache(self.engine, context)
            self.cache.add_sequence("ctx")
            self.engine.fill(self.cache, "ctx", context - 1)
            self.step()  # a cache that cannot trim says so here, not in a timed sample

    def step(self) -> None:
        self.engine.run_decode(self.cache, ["ctx"], [5])
        self.cache.trim("ctx", 1)

    def time_decode(self, name, dtype, context):
        self.step()


class _BatchDecode:
    """One decode step for len(BATCH_CONTEXTS) sequences of mixed lengths at once,
    rolled back like _Decode. An engine without a batched decode of its own runs
    the interface's default, one decode per sequence."""

    version = "1"
    params = (common.ENGINES, ["float32", "float16"])
    param_names = ["engine", "dtype"]
    preset = "small"

    def setup(self, name, dtype):
        self.ids = list(range(len(common.BATCH_CONTEXTS)))
        with skipped_if_not_applicable(name):
            self.engine = common.engine(name, self.preset, dtype)
            self.cache = common.new_cache(
                self.engine, max(common.BATCH_CONTEXTS), len(common.BATCH_CONTEXTS)
            )
            for i, n in zip(self.ids, common.BATCH_CONTEXTS):
                self.cache.add_sequence(i)
                self.engine.fill(self.cache, i, n - 1)
            self.time_batch_decode(name, dtype)

    def time_batch_decode(self, name, dtype):
        self.engine.run_decode(self.cache, self.ids, [5] * len(self.ids))
        for i in self.ids:
            self.cache.trim(i, 1)


class _Track:
    """Throughput and memory at context 512, as tracked numbers with units."""

    version = "1"
    params = (common.ENGINES, ["float32", "float16"], [512])
    param_names = ["engine", "dtype", "context"]
    preset = "small"
    setup = _Decode.setup
    step = _Decode.step

    def track_decode_tokens_per_s(self, name, dtype, context):
        self.step()  # warm
        t0 = time.perf_counter()
        for _ in range(3):
            self.step()
        return 3 / (time.perf_counter() - t0)

    track_decode_tokens_per_s.unit = "tokens/s"

    def track_kv_bytes_per_sequence(self, name, dtype, context):
        return self.cache.kv_bytes("ctx")

    track_kv_bytes_per_sequence.unit = "bytes"

    def track_mlx_peak_memory(self, name, dtype, context):
        """MLX allocations only: an engine on another framework (hf) shows ~0."""
        mx.reset_peak_memory()
        self.step()
        return mx.get_peak_memory()

    track_mlx_peak_memory.unit = "bytes"


class _Quick:
    """Sampling of the small preset, sized for a history point per commit on 2 CPU
    cores: asv starts a process per parameter set (imports and model load, ~5 s), so
    one round of at most 5 samples in 2 s keeps a commit's Small run to minutes."""

    rounds = 1
    repeat = (1, 5, 2.0)
    warmup_time = 0.2


class SmallPrefill(_Quick, _Prefill):
    pass


class SmallDecode(_Quick, _Decode):
    pass


class SmallBatchDecode(_Quick, _BatchDecode):
    pass


class SmallTrack(_Quick, _Track):
    pass


class TinyLlamaPrefill(_Prefill):
    preset = "tinyllama"
    timeout = 1200
    repeat = (1, 3, 60.0)
    rounds = 1


class TinyLlamaDecode(_Decode):
    preset = "tinyllama"
    timeout = 600
    repeat = (1, 5, 30.0)
    rounds = 1


class TinyLlamaBatchDecode(_BatchDecode):
    preset = "tinyllama"
    timeout = 600
    repeat = (1, 5, 30.0)
    rounds = 1


class TinyLlamaTrack(_Track):
    preset = "tinyllama"
    timeout = 600
    rounds = 1


class TinyLlamaGenerate:
    """Greedy generation as a user runs it (``Engine.generate``, the engine's own loop:
    impl's pipelined compiled ``generate``, mlx-lm's ``generate_step``): 256 tokens
    after a 16-token prompt, in tokens/s, after one untimed run (traces, kernels).
    GPU only: on 2 CPU cores one run of the TinyLlama shape takes minutes."""

    version = "1"
    params = (common.ENGINES, ["float16"])
    param_names = ["engine", "dtype"]
    preset = "tinyllama"
    new_tokens = 256
    timeout = 600
    rounds = 1

    def setup(self, name, dtype):
        if mx.default_device() == mx.cpu:
            raise NotImplementedError("TinyLlama generation is GPU-only (see the docstring)")
        with skipped_if_not_applicable(name):
            self.engine = common.engine(name, self.preset, dtype)
        self.prompt = common.tokens(16, common.vocab_size(self.preset))
        self.engine.generate(self.prompt, self.new_tokens)

    def track_generate_tokens_per_s(self, name, dtype):
        t0 = time.perf_counter()
        n = len(self.engine.generate(self.prompt, self.new_tokens))
        return n / (time.perf_counter() - t0)

    track_generate_tokens_per_s.unit = "tokens/s"


# The regression gate's quick subset (conform gate, regex ^bench_engine\.Gate): impl
# only, whatever CONFORM_ENGINE says, since the gate guards this project's engine;
# float32 prefill of 128 tokens and decode at contexts 16 and 512, small preset.
class GatePrefill(_Prefill):
    params = (["impl"], ["float32"], [128])


class GateDecode(_Decode):
    params = (["impl"], ["float32"], [16, 512])
