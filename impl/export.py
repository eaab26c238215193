"""Write a checkpoint in mlx-lm's format (``config.json`` with ``quantization``, HF-named
``model.safetensors``): a GGUF file reaches mlx-lm as the arrays impl runs, still quantized."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mlx.core as mx

from conform_mlx.impl.loader import Checkpoint


def mlx_lm_config(ckpt: Checkpoint) -> dict:
    """config.json for ``ckpt``: its own fields, RoPE base at the top level (where
    mlx-lm reads it), and the quantization most modules use plus per-module overrides."""
    raw = {k: v for k, v in ckpt.raw_config.items() if k != "quantization"}
    raw.setdefault("rope_theta", ckpt.config.rope_theta)
    raw.setdefault("architectures", ["LlamaForCausalLM"])
    if ckpt.quantization:
        common = Counter(tuple(sorted(q.items())) for q in ckpt.quantization.values())
        default = dict(common.most_common(1)[0][0])
        others = {m: q for m, q in ckpt.quantization.items() if q != default}
        raw["quantization"] = {**default, **others}
    return raw


def write_mlx_lm(ckpt: Checkpoint, out_dir: Path) -> Path:
    """Write ``ckpt`` to ``out_dir`` (made if missing); returns it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(mlx_lm_config(ckpt), indent=2) + "\n")
    arrays = {name: arr for name, (arr, _) in ckpt.weights.items()}
    mx.save_safetensors(str(out_dir / "model.safetensors"), arrays, metadata={"format": "mlx"})
    return out_dir
