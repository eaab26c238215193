"""``conform validate``: the seed report's validation flow, with the numbers checked.

Loads a checkpoint into the MLX engine, generates greedily through the paged
cache, and reports what the seed reported (prefill ms, decode min/avg/max,
tokens/s, cached tokens, GQA memory) plus what it could not: the KV bytes the
pool really holds beside the formula, and logit parity against HF transformers.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conform.metrics import NMSE_LIMIT, compare_logits
from impl.config import LlamaConfig
from impl.engine import generate
from impl.loader import load, parse_dtype
from impl.paged_cache import PagedKVCache

DEFAULT_PROMPT = "The quick brown fox"


@dataclass
class Options:
    model: Path
    dtype: str = "float32"
    prompt: str = DEFAULT_PROMPT
    tokens: list[int] | None = None
    max_new_tokens: int = 5
    block_size: int = 16
    peer: str | None = None  # "mlx-lm" to time it on the same checkpoint
    out_dir: Path = Path("results")


def encode_prompt(model_dir: Path, cfg: LlamaConfig, opts: Options) -> tuple[list[int], str]:
    """Token ids and a description of where they came from."""
    if opts.tokens is not None:
        return list(opts.tokens), "given ids"
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise SystemExit(
            f"{model_dir} has no tokenizer.json, so --prompt cannot be encoded; pass --tokens IDS"
        )
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tok_file)).encode(opts.prompt).ids
    if cfg.bos_token_id is not None and ids[:1] != [cfg.bos_token_id]:
        ids = [cfg.bos_token_id, *ids]  # Llama prompts start with BOS
    return ids, f"{opts.prompt!r}"


def decode_text(model_dir: Path, ids: list[int]) -> str | None:
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_file)).decode(ids)


def kv_bytes(cfg: LlamaConfig, itemsize: int, slots: int, kv_heads: int | None = None) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x itemsize x token slots."""
    heads = cfg.num_key_value_heads if kv_heads is None else kv_heads
    return 2 * cfg.num_hidden_layers * heads * cfg.dim_per_head * itemsize * slots


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    """Index of the first step where the token lists differ (a length difference
    counts, at the shorter one's end); None when identical."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def timing_summary(prefill_ms: float, decode_ms: list[float]) -> dict:
    steps = len(decode_ms)
    return {
        "prefill_ms": prefill_ms,
        "decode_steps": steps,
        "decode_ms_min": min(decode_ms) if steps else None,
        "decode_ms_avg": sum(decode_ms) / steps if steps else None,
        "decode_ms_max": max(decode_ms) if steps else None,
        "decode_tokens_per_s": 1e3 * steps / sum(decode_ms) if steps else None,
    }


def run(opts: Options) -> dict:
    from reference.hf import Reference  # torch is slow to import; only when validating

    dtype = parse_dtype(opts.dtype)
    model = load(opts.model, dtype)
    cfg = model.config
    prompt, prompt_desc = encode_prompt(opts.model, cfg, opts)
    n_slots = len(prompt) + opts.max_new_tokens

    # One untimed run first: the first MLX call of a shape pays one-off set-up costs.
    generate(model, prompt, min(2, opts.max_new_tokens), block_size=opts.block_size)
    cache = PagedKVCache.for_tokens(cfg, n_slots, opts.block_size, dtype)
    gen = generate(model, prompt, opts.max_new_tokens, cache=cache, keep_logits=True)

    fed = prompt + gen.tokens[:-1]
    ref = Reference(opts.model)
    diff = compare_logits(gen.logits, ref.logits(fed))
    ref_tokens = ref.greedy(prompt, opts.max_new_tokens)
    agree = first_divergence(gen.tokens, ref_tokens)

    cached = cache.tokens(0)
    blocks = cache.blocks_used(0)
    itemsize = dtype.size
    report = {
        "model_dir": str(opts.model),
        "dtype": opts.dtype,
        "block_size": opts.block_size,
        "machine": f"{platform.machine()} {platform.system()}, MLX device {_mlx_device()}",
        "model": {
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "q_heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "gqa_ratio": cfg.gqa_ratio,
            "head_dim": cfg.dim_per_head,
            "vocab_size": cfg.vocab_size,
        },
        "prompt": {"source": prompt_desc, "ids": prompt},
        "generated": {
            "ids": gen.tokens,
            "text": decode_text(opts.model, gen.tokens),
            "stop_reason": gen.stop_reason,
        },
        "timing": timing_summary(gen.prefill_ms, gen.decode_ms),
        "cache": {
            "cached_tokens": cached,
            "rule": f"{len(prompt)} prompt + {len(gen.tokens)} generated - 1 (last not fed back)",
            "blocks_used": blocks,
            "blocks_expected": math.ceil(cached / opts.block_size),
            "pool_blocks": cache.num_blocks,
            "pool_nbytes_measured": cache.nbytes,
            "pool_nbytes_formula": kv_bytes(cfg, itemsize, cache.num_blocks * opts.block_size),
            "sequence_nbytes_paged": kv_bytes(cfg, itemsize, blocks * opts.block_size),
            "sequence_nbytes_unpaged": kv_bytes(cfg, itemsize, cached),
            "sequence_nbytes_if_heads_repeated": kv_bytes(
                cfg, itemsize, cached, cfg.num_attention_heads
            ),
            "gqa_saving": 1 - cfg.num_key_value_heads / cfg.num_attention_heads,
        },
        "parity": {
            "reference": "HF transformers LlamaForCausalLM, float32, eager attention, torch CPU",
            **diff.as_dict(),
            "nmse_limit": NMSE_LIMIT[opts.dtype],
            "greedy_reference_ids": ref_tokens,
            "greedy_first_divergence": agree,
        },
    }
    if opts.peer == "mlx-lm":
        from conform.peers import time_mlx_lm

        peer = time_mlx_lm(opts.model, dtype, prompt, opts.max_new_tokens)
        report["peer"] = {
            "engine": peer["engine"],
            "tokens": peer["tokens"],
            **timing_summary(peer["prefill_ms"], peer["decode_ms"]),
        }
    c = report["cache"]
    report["checks"] = {
        "parity_nmse": diff.nmse <= NMSE_LIMIT[opts.dtype],
        "cached_tokens_rule": cached == len(prompt) + len(gen.tokens) - 1,
        "blocks_used": blocks == c["blocks_expected"],
        "pool_bytes_match_formula": c["pool_nbytes_measured"] == c["pool_nbytes_formula"],
    }
    report["passed"] = all(report["checks"].values())
    return report


def _mlx_device() -> str:
    import mlx.core as mx

    return str(mx.default_device())


def write_json(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"validate-{Path(report['model_dir']).name}-{report['dtype']}.json"
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
