"""Peers on the same checkpoints and workloads as bench_engine, so every report
holds our ratio to them from one run: mlx-lm (the MLX engine most people run)
and the HF transformers torch-CPU reference (float32 only: it is the reference's
dtype, and torch's CPU half-precision matmuls are not what anyone deploys)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from benchmarks import common


class _MlxLmPrefill:
    params = (["float32", "float16"], [16, 128, 512])
    param_names = ["dtype", "prompt_len"]
    preset = "small"

    def setup(self, dtype, prompt_len):
        from mlx_lm.models.cache import make_prompt_cache

        common.skip_if_too_slow_on_cpu(self.preset, prompt_len)
        self.model = common.mlx_lm_model(self.preset, dtype)
        self.prompt = mx.array(common.tokens(prompt_len, self.model.args.vocab_size))[None]
        self.make_cache = make_prompt_cache

    def time_prefill(self, dtype, prompt_len):
        mx.eval(self.model(self.prompt, cache=self.make_cache(self.model)))


class _MlxLmDecode:
    """As bench_engine's decode: the cache holds context - 1 random positions."""

    params = (["float32", "float16"], [16, 512, 2048])
    param_names = ["dtype", "context"]
    preset = "small"

    def setup(self, dtype, context):
        from mlx_lm.models.cache import make_prompt_cache

        self.model = common.mlx_lm_model(self.preset, dtype)
        args = self.model.args
        head_dim = args.hidden_size // args.num_attention_heads
        shape = (1, args.num_key_value_heads, context - 1, head_dim)
        self.cache = make_prompt_cache(self.model)
        for c in self.cache:
            c.update_and_fetch(*(mx.random.normal(shape).astype(common.DTYPES[dtype]),) * 2)
        mx.eval([c.state for c in self.cache])
        self.token = mx.array([[5]])

    def time_decode(self, dtype, context):
        mx.eval(self.model(self.token, cache=self.cache))
        for c in self.cache:
            c.trim(1)  # back to the same context for the next sample


class _TorchPrefill:
    params = ([16, 128, 512],)
    param_names = ["prompt_len"]
    preset = "small"

    def setup(self, prompt_len):
        self.ref = common.reference(self.preset)
        self.prompt = common.tokens(prompt_len, self.ref.config.vocab_size)

    def time_prefill(self, prompt_len):
        self.ref.prefill_last(self.prompt)


class _TorchDecode:
    params = ([16, 512, 2048],)
    param_names = ["context"]
    preset = "small"

    def setup(self, context):
        self.ref = common.reference(self.preset)
        self.cache = self.ref.random_cache(context - 1)

    def time_decode(self, context):
        np.asarray(self.ref.decode_step(5, self.cache))


class SmallMlxLmPrefill(_MlxLmPrefill):
    pass


class SmallMlxLmDecode(_MlxLmDecode):
    pass


class SmallTorchPrefill(_TorchPrefill):
    pass


class SmallTorchDecode(_TorchDecode):
    pass


_SLOW = dict(preset="tinyllama", timeout=1200, repeat=(1, 3, 60.0), processes=1)
TinyLlamaMlxLmPrefill = type("TinyLlamaMlxLmPrefill", (_MlxLmPrefill,), dict(_SLOW))
TinyLlamaMlxLmDecode = type("TinyLlamaMlxLmDecode", (_MlxLmDecode,), dict(_SLOW))
TinyLlamaTorchPrefill = type("TinyLlamaTorchPrefill", (_TorchPrefill,), dict(_SLOW))
TinyLlamaTorchDecode = type("TinyLlamaTorchDecode", (_TorchDecode,), dict(_SLOW))
