"""Deterministic random-weight Llama checkpoints in HF format, for named shapes.

No model can be downloaded here, so shapes are made locally: ``tinyllama-1.1b`` is
the real TinyLlama-1.1B shape; the ``tiny-*`` shapes are small enough for unit
tests and cover MHA, GQA 4:1 and 8:1, MQA, head_dim 64 and 128, Llama 3 RoPE
scaling and a RoPE base of 500000. Each tensor is drawn from its own generator
seeded by (seed, index), so a checkpoint is the same bytes on every machine and run.

Random weights give near-flat logits; parity here means numerics, not behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

# Fields common to every tiny shape; vocab 512 keeps lm_head small but non-trivial.
_TINY = dict(
    vocab_size=512, intermediate_size=352, num_hidden_layers=2, max_position_embeddings=1024
)

SHAPES: dict[str, dict] = {
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    # Llama-2-7B: 32 heads of 128, MHA.
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    # Llama-3-8B (3.1's RoPE scaling and context): GQA 32:8, a 128256-token vocabulary.
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    # SmolLM2-135M's shape: 30 thin layers, 9 heads of 64 over 3 KV heads, a tied head.
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0),
        tie_word_embeddings=True,
    ),
    "tiny-mha": dict(_TINY, hidden_size=128, num_attention_heads=8, num_key_value_heads=8),
    "tiny-gqa4": dict(_TINY, hidden_size=128, num_attention_heads=8, num_key_value_heads=2),
    "tiny-gqa8": dict(_TINY, hidden_size=256, num_attention_heads=16, num_key_value_heads=2),
    "tiny-mqa": dict(_TINY, hidden_size=128, num_attention_heads=8, num_key_value_heads=1),
    "tiny-hd64": dict(_TINY, hidden_size=256, num_attention_heads=4, num_key_value_heads=2),
    # head_dim given explicitly and != hidden_size / heads, as in some Llama variants.
    "tiny-hd128": dict(
        _TINY, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128
    ),
    "tiny-llama3-rope": dict(
        _TINY,
        hidden_size=128,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    # Linear RoPE scaling (positions interpolated by 4), under rope_parameters.
    "tiny-linear-rope": dict(
        _TINY,
        hidden_size=128,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    ),
    # YaRN (factor 4 over an original context of 256), under rope_parameters.
    "tiny-yarn-rope": dict(
        _TINY,
        hidden_size=128,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=256
        ),
    ),
    # A RoPE base other than the default, stored only under rope_parameters (as
    # transformers 5 writes every config): engines that read a top-level rope_theta
    # alone fall back to 10000 without a word.
    "tiny-rope-500k": dict(
        _TINY,
        hidden_size=128,
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0),
    ),
}
# Shapes slow enough (seconds to minutes, GBs) to deserve a progress bar.
_SLOW = {"tinyllama-1.1b", "llama-2-7b", "llama-3-8b"}


def hf_config(shape: str) -> LlamaConfig:
    if shape not in SHAPES:
        raise KeyError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    fields = dict(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    fields.update(SHAPES[shape])
    fields.setdefault("rope_parameters", dict(rope_type="default", rope_theta=10000.0))
    return LlamaConfig(**fields)


def write_random_checkpoint(
    shape: str,
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
) -> Path:
    """Write config.json + model.safetensors for ``shape``; returns ``out_dir``."""
    show = shape in _SLOW if progress is None else progress
    return write_random_weights(
        hf_config(shape), out_dir, seed, dtype, desc=shape if show else None
    )


def write_random_weights(
    config: LlamaConfig,
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    desc: str | None = None,
) -> Path:
    """Write ``config`` with random weights: Linear and embedding weights ~ N(0, 0.02)
    (HF's initializer_range), norm weights 1, biases ~ N(0, 0.02), stored in ``dtype``;
    ``shards`` > 1 splits them over that many files with HF's index. ``desc``: show a
    progress bar under that name."""
    config.dtype = dtype
    with torch.device("meta"):
        names = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:  # the output reads the embedding; HF saves no copy
        del names["lm_head.weight"]
    tensors = {}
    for i, (name, shp) in enumerate(tqdm(names.items(), desc=desc, disable=desc is None)):
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shp, dtype=dtype)
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        tensors[name] = (torch.randn(shp, generator=gen) * 0.02).to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return out
    files = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    where = {name: files[i * shards // len(tensors)] for i, name in enumerate(tensors)}
    for f in files:
        save_file(
            {n: t for n, t in tensors.items() if where[n] == f}, out / f, metadata={"format": "pt"}
        )
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": where}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def seed_arg(text: str) -> int:
    """argparse type for --seed: torch's generators take 64-bit seeds, and each tensor's
    is seed * 1_000_003 + index, so 32 bits keep every one in range."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants an integer, got {text!r}") from None
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {seed}")
    return seed


def out_dir_error(path: Path) -> str | None:
    """Why ``path`` cannot take a checkpoint (it is made if missing), or None. Asked
    before the work, so a bad path does not cost a training run or a 2 GB write."""
    if path.exists() and not path.is_dir():
        return f"{path}: exists and is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{path}: cannot create it ({e.strerror})"
    return None if os.access(path, os.W_OK | os.X_OK) else f"{path}: not writable"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="conform make-checkpoint", description="Write a random-weight HF Llama checkpoint."
    )
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    error = out_dir_error(args.out_dir)
    if error:
        p.error(f"out_dir {error}")
    path = write_random_checkpoint(args.shape, args.out_dir, args.seed, getattr(torch, args.dtype))
    print(f"wrote {args.shape} ({args.dtype}, seed {args.seed}) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
