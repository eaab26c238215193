"""The reference: HF transformers' ``LlamaForCausalLM`` on torch CPU, in float32.

This package is the only place that imports torch or transformers. Everything
leaves it as numpy. Eager attention is used: it is the plainest implementation
HF has, which is what a reference should be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, LlamaForCausalLM
from transformers.utils import logging as hf_logging

# HF's per-load progress bar is noise in a test log.
hf_logging.disable_progress_bar()


@dataclass
class ReferenceRun:
    logits: np.ndarray  # (T, vocab) float32
    trace: dict[str, np.ndarray]  # name -> (T, hidden), same names as impl.model's trace
    keys: list[np.ndarray]  # per layer (n_kv_heads, T, head_dim), after RoPE
    values: list[np.ndarray]  # per layer (n_kv_heads, T, head_dim)


def affine_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers of MLX's affine format, int64 (rows, cols * 32 / bits): each row's
    uint32 words are one little-endian bit stream (bit k of the row is bit k % 32 of
    word k // 32) and value j fills its bits j * bits to (j + 1) * bits - 1, lowest
    first. For 2, 4 and 8 bits no value crosses a word; for 3, 5 and 6 bits some
    straddle two."""
    if not 1 <= bits <= 8:
        raise ValueError(f"the reference unpacks 1 to 8 bits per value, not {bits}")
    words = packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # (rows, W)
    n = words.shape[-1] * 32 // bits
    start = torch.arange(n, dtype=torch.int64) * bits  # first bit of each value
    # Each value lies within the 64 bits of its first word and the next one.
    pairs = torch.cat([words, torch.zeros_like(words[..., :1])], dim=-1)
    lo, hi = pairs[..., start // 32], pairs[..., start // 32 + 1]
    return (((hi << 32) | lo) >> (start % 32)) & ((1 << bits) - 1)


def unpack_affine(
    packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """float32 weights of MLX's affine quantization: w = q * scale + bias per group of
    ``group_size`` along a row, q from ``affine_codes``. Written here from the format,
    not taken from MLX, so the reference does not share the engine's de-quantization
    code (suites/test_quantized.py checks it against ``mx.dequantize``)."""
    q = affine_codes(packed, bits).to(torch.float32)
    rows, cols = q.shape
    groups = (rows, cols // group_size)
    if cols % group_size or tuple(scales.shape) != groups or tuple(biases.shape) != groups:
        raise ValueError(
            f"{bits}-bit packed weights of shape {tuple(packed.shape)} hold {cols} values a "
            f"row; scales {tuple(scales.shape)} and biases {tuple(biases.shape)} do not "
            f"make groups of {group_size} of them"
        )
    q = q.view(rows, cols // group_size, group_size)
    w = q * scales.float()[..., None] + biases.float()[..., None]
    return w.view(rows, cols)


def dequantized_state_dict(model_dir: Path, quantization: dict) -> dict[str, torch.Tensor]:
    """An mlx-lm-format checkpoint's tensors with every quantized module de-quantized."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    out = {}
    for name, t in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.removesuffix(".weight")
        if f"{module}.scales" in tensors:
            # A per-module entry overrides the default; mlx-lm writes ``false`` only for
            # modules it left unquantized, which hold no scales.
            q = quantization.get(module, quantization)
            if not isinstance(q, dict):
                raise ValueError(
                    f"{model_dir}: quantization.{module} is {q!r}, but {module} is quantized"
                )
            t = unpack_affine(
                t,
                tensors[f"{module}.scales"],
                tensors[f"{module}.biases"],
                q["bits"],
                q["group_size"],
            )
        out[name] = t.float()
    return out


def load_hf_model(path: Path, dtype: torch.dtype) -> LlamaForCausalLM:
    """HF's model of a checkpoint directory or GGUF file. A GGUF file goes through
    transformers' own GGUF loader (gguf-py de-quantizes it); an mlx-lm-quantized
    directory is de-quantized by ``unpack_affine``. Quantized models are references
    only on their de-quantized weights, in float32."""
    if path.suffix == ".gguf":
        return LlamaForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation="eager"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    quantization = getattr(config, "quantization", None)
    if not quantization:
        return LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    state = dequantized_state_dict(path, quantization)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.to(dtype)


class Reference:
    """A loaded HF model; ``run`` and ``greedy`` take plain lists of token ids."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.model_dir = Path(model_dir)
        self.model = load_hf_model(self.model_dir, dtype)
        self.model.eval()
        # Judged on de-quantized weights: a GGUF file or an mlx-lm-quantized directory.
        self.quantized = self.model_dir.suffix == ".gguf" or bool(
            getattr(self.model.config, "quantization", None)
        )
        self.config = self.model.config

    @torch.inference_mode()
    def run(self, tokens: list[int]) -> ReferenceRun:
        """One forward pass over ``tokens``: logits, per-layer activations and the KV cache."""
        ids = torch.tensor([tokens], dtype=torch.long)
        trace: dict[str, np.ndarray] = {}
        hooks = []

        def keep(name: str):
            def hook(_module, _inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                trace[name] = out[0].float().numpy().copy()

            return hook

        inner = self.model.model
        hooks.append(inner.embed_tokens.register_forward_hook(keep("embed_tokens")))
        for i, layer in enumerate(inner.layers):
            for part in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
                module = getattr(layer, part)
                hooks.append(module.register_forward_hook(keep(f"layers.{i}.{part}")))
            hooks.append(layer.register_forward_hook(keep(f"layers.{i}")))
        hooks.append(inner.norm.register_forward_hook(keep("norm")))
        try:
            cache = DynamicCache(config=self.config)
            out = self.model(input_ids=ids, cache=cache, use_cache=True)
        finally:
            for h in hooks:
                h.remove()
        keys = [layer.keys[0].float().numpy().copy() for layer in cache.layers]
        values = [layer.values[0].float().numpy().copy() for layer in cache.layers]
        return ReferenceRun(out.logits[0].float().numpy().copy(), trace, keys, values)

    @torch.inference_mode()
    def prefill_last(self, tokens: list[int]) -> np.ndarray:
        """Last position's logits of one forward pass; for timing prefill."""
        out = self.model(input_ids=torch.tensor([tokens]), use_cache=False, logits_to_keep=1)
        return out.logits[0, -1].numpy()

    @torch.inference_mode()
    def random_cache(self, tokens: int, seed: int = 0) -> DynamicCache:
        """A KV cache holding ``tokens`` positions of random K/V, for timing decode at a
        context length without paying for the prefill that would fill it."""
        cfg = self.config
        gen = torch.Generator().manual_seed(seed)
        shape = (1, cfg.num_key_value_heads, tokens, cfg.head_dim)
        cache = DynamicCache(config=cfg)
        for layer in range(cfg.num_hidden_layers):
            k, v = (torch.randn(shape, generator=gen, dtype=self.model.dtype) for _ in "kv")
            cache.update(k, v, layer)
        return cache

    @torch.inference_mode()
    def decode_step(self, token: int, cache: DynamicCache) -> np.ndarray:
        """Logits of one token fed after ``cache``; the cache is cropped back after, so
        repeated calls measure the same context length."""
        length = cache.get_seq_length()
        out = self.model(
            input_ids=torch.tensor([[token]]),
            position_ids=torch.tensor([[length]]),
            cache=cache,
            use_cache=True,
        )
        cache.crop(-1)  # drop the token just appended
        return out.logits[0, -1].numpy()

    def logits(self, tokens: list[int]) -> np.ndarray:
        return self.run(tokens).logits

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """HF's own greedy generation; returns only the new tokens (EOS ends it early)."""
        ids = torch.tensor([prompt], dtype=torch.long)
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.config.eos_token_id or 0,
        )
        return out[0, len(prompt) :].tolist()


def hf_inv_freq(model_dir: str | Path) -> np.ndarray:
    """The RoPE inverse frequencies HF derives from a checkpoint's config.json."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(model_dir)
    return LlamaRotaryEmbedding(config).inv_freq.float().numpy().copy()
