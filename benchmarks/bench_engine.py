"""Our engine: prefill and decode latency, throughput and memory (impl/ + kernels/)."""

from __future__ import annotations

import time

import mlx.core as mx

from benchmarks import common
from impl.engine import decode, prefill
from impl.paged_cache import PagedKVCache


class _Prefill:
    params = (["float32", "float16"], [16, 128, 512])
    param_names = ["dtype", "prompt_len"]
    preset = "small"

    def setup(self, dtype, prompt_len):
        common.skip_if_too_slow_on_cpu(self.preset, prompt_len)
        self.model = common.model(self.preset, dtype)
        self.prompt = common.tokens(prompt_len, self.model.config.vocab_size)
        self.cache = PagedKVCache.for_tokens(
            self.model.config, prompt_len, common.BLOCK_SIZE, common.DTYPES[dtype]
        )

    def time_prefill(self, dtype, prompt_len):
        self.cache.add_sequence(0)
        prefill(self.model, self.cache, 0, self.prompt)  # ends in mx.eval
        self.cache.release(0)


class _Decode:
    """One decode step at a context length (cached + new token), batch 1.

    The cache is filled by reserving its slots, not by a prefill: decode cost does not
    depend on the cached values, and a 2047-token prefill takes minutes on the CPU.
    Each sample decodes one token and trims it off again, so every sample sees the
    same context. (Until the GPU work of issue 5 a sample forked the sequence and
    released the fork; the fork's copy-on-write of the last block was timed with it.)
    """

    params = (["float32", "float16"], [16, 512, 2048])
    param_names = ["dtype", "context"]
    preset = "small"

    def setup(self, dtype, context):
        self.model = common.model(self.preset, dtype)
        self.cache = PagedKVCache.for_tokens(
            self.model.config, context + common.BLOCK_SIZE, common.BLOCK_SIZE, common.DTYPES[dtype]
        )
        self.cache.add_sequence("ctx")
        self.cache.plan(["ctx"], context - 1)

    def step(self) -> None:
        decode(self.model, self.cache, ["ctx"], [5])  # ends in mx.eval
        self.cache.trim("ctx", 1)

    def time_decode(self, dtype, context):
        self.step()


class _BatchDecode:
    """One decode step for len(BATCH_CONTEXTS) sequences of mixed lengths at once."""

    params = (["float32", "float16"],)
    param_names = ["dtype"]
    preset = "small"

    def setup(self, dtype):
        self.model = common.model(self.preset, dtype)
        blocks = sum(-(-n // common.BLOCK_SIZE) + 1 for n in common.BATCH_CONTEXTS)
        self.cache = PagedKVCache(
            self.model.config, blocks, common.BLOCK_SIZE, common.DTYPES[dtype]
        )
        for i, n in enumerate(common.BATCH_CONTEXTS):
            self.cache.add_sequence(i)
            self.cache.plan([i], n - 1)
        self.ids = list(range(len(common.BATCH_CONTEXTS)))

    def time_batch_decode(self, dtype):
        decode(self.model, self.cache, self.ids, [5] * len(self.ids))
        for i in self.ids:
            self.cache.trim(i, 1)


class _Track:
    """Throughput and memory at context 512, as tracked numbers with units."""

    params = (["float32", "float16"], [512])
    param_names = ["dtype", "context"]
    preset = "small"
    setup = _Decode.setup
    step = _Decode.step

    def track_decode_tokens_per_s(self, dtype, context):
        self.step()  # warm
        t0 = time.perf_counter()
        for _ in range(3):
            self.step()
        return 3 / (time.perf_counter() - t0)

    track_decode_tokens_per_s.unit = "tokens/s"

    def track_kv_bytes_per_sequence(self, dtype, context):
        return self.cache.blocks_used("ctx") * self.cache.nbytes // self.cache.num_blocks

    track_kv_bytes_per_sequence.unit = "bytes"

    def track_mlx_peak_memory(self, dtype, context):
        mx.reset_peak_memory()
        self.step()
        return mx.get_peak_memory()

    track_mlx_peak_memory.unit = "bytes"


class SmallPrefill(_Prefill):
    pass


class SmallDecode(_Decode):
    pass


class SmallBatchDecode(_BatchDecode):
    pass


class SmallTrack(_Track):
    pass


class TinyLlamaPrefill(_Prefill):
    preset = "tinyllama"
    timeout = 1200
    repeat = (1, 3, 60.0)
    processes = 1


class TinyLlamaDecode(_Decode):
    preset = "tinyllama"
    timeout = 600
    repeat = (1, 5, 30.0)
    processes = 1


class TinyLlamaBatchDecode(_BatchDecode):
    preset = "tinyllama"
    timeout = 600
    repeat = (1, 5, 30.0)
    processes = 1


class TinyLlamaTrack(_Track):
    preset = "tinyllama"
    timeout = 600
    processes = 1


# decode / prefill with compiled=True: the same steps as one mx.compile'd graph each.
# asv's warm-up runs trace them before any timed sample.
class TinyLlamaPrefillCompiled(TinyLlamaPrefill):
    def time_prefill(self, dtype, prompt_len):
        self.cache.add_sequence(0)
        prefill(self.model, self.cache, 0, self.prompt, compiled=True)
        self.cache.release(0)


class TinyLlamaDecodeCompiled(TinyLlamaDecode):
    def step(self) -> None:
        decode(self.model, self.cache, ["ctx"], [5], compiled=True)
        self.cache.trim("ctx", 1)


class TinyLlamaBatchDecodeCompiled(TinyLlamaBatchDecode):
    def time_batch_decode(self, dtype):
        decode(self.model, self.cache, self.ids, [5] * len(self.ids), compiled=True)
        for i in self.ids:
            self.cache.trim(i, 1)


class GatePrefill(_Prefill):
    """The regression gate's quick subset (conform gate): float32, one length."""

    params = (["float32"], [128])


class GateDecode(_Decode):
    params = (["float32"], [16, 512])
