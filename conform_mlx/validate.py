"""``conform validate``: the seed report's validation flow, with the numbers checked.

Loads a checkpoint into an engine (``--engine``, default impl; any name
``conform_mlx.engines.resolve`` takes), generates greedily through its cache, and
reports what the seed reported (prefill ms, decode min/avg/max, tokens/s, cached
tokens, GQA memory) plus what it could not: the KV bytes the cache really holds
beside the formula, and logit parity against HF transformers. Engines named with
``--compare`` are timed the same way on the same checkpoint and prompt.
"""

from __future__ import annotations

import math

import numpy as np

from conform_mlx import machine, versions
from conform_mlx.engines import Engine, EngineCache, Greedy, NotApplicable, load_engine, resolve
from conform_mlx.impl.config import LlamaConfig
from conform_mlx.metrics import NMSE_LIMIT, compare_logits, describe_non_finite
from conform_mlx.models import open_model
from conform_mlx.validate_io import (
    Options,
    check_run_size,
    check_vocab,
    encode_prompt,
    run_digest,
)

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


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


def timing_summary(prefill_ms: float | None, decode_ms: list[float]) -> dict:
    steps = len(decode_ms)
    return {
        "prefill_ms": prefill_ms,
        "decode_steps": steps,
        "decode_ms_min": min(decode_ms) if steps else None,
        "decode_ms_avg": sum(decode_ms) / steps if steps else None,
        "decode_ms_max": max(decode_ms) if steps else None,
        "decode_tokens_per_s": 1e3 * steps / sum(decode_ms) if steps else None,
    }


def timed_greedy(
    engine: Engine,
    prompt: list[int],
    max_new_tokens: int,
    eos: list[int],
    block_size: int | None = None,
) -> tuple[Greedy, EngineCache]:
    """One untimed run first (the first MLX call of a shape pays one-off set-up
    costs), then the reported one, in a fresh cache sized for it."""
    engine.greedy(prompt, min(2, max_new_tokens), eos_token_ids=eos)
    n_slots = len(prompt) + max_new_tokens
    if block_size is None:
        cache = engine.new_cache(n_slots)
    else:
        cache = engine.new_cache(n_slots, block_size=block_size)
    cache.add_sequence(0)
    return engine.greedy(prompt, max_new_tokens, cache, 0, eos_token_ids=eos), cache


def cache_report(cfg: LlamaConfig, cache: EngineCache, dtype: str, prompt: int, gen: int) -> dict:
    """What sequence 0 holds, measured by its cache, beside the formula for it."""
    cached = cache.tokens(0)
    itemsize = ITEMSIZE[dtype]
    g = cache.granularity  # slots come in whole allocation units (blocks, growth steps)
    report = {
        "cached_tokens": cached,
        "rule": f"{prompt} prompt + {gen} generated - 1 (last not fed back)",
        "granularity": g,
        "sequence_nbytes_measured": cache.kv_bytes(0),
        "sequence_nbytes_formula": kv_bytes(cfg, itemsize, math.ceil(cached / g) * g),
        "sequence_nbytes_unpaged": kv_bytes(cfg, itemsize, cached),
        "sequence_nbytes_if_heads_repeated": kv_bytes(
            cfg, itemsize, cached, cfg.num_attention_heads
        ),
        "gqa_saving": 1 - cfg.num_key_value_heads / cfg.num_attention_heads,
    }
    try:
        facts = cache.block_facts(0)
    except NotApplicable:
        return report  # unpaged: no blocks to count
    report.update(
        block_size=facts.block_size,
        blocks_used=facts.blocks_used,
        blocks_expected=math.ceil(cached / facts.block_size),
        pool_blocks=facts.num_blocks,
    )
    return report


def run(opts: Options) -> dict:
    from conform_mlx.reference.hf import Reference  # torch is slow to import; only when validating

    engines = [resolve(name) for name in [opts.engine, *opts.compare]]  # bad names first
    model = open_model(opts.model, finite=not opts.allow_non_finite)
    cfg = model.config
    prompt, prompt_desc = encode_prompt(opts.model, model.tokenizer, opts)
    check_vocab(prompt, cfg.vocab_size)
    check_run_size(cfg, len(prompt), opts.max_new_tokens, opts.block_size)
    engine = load_engine(engines[0], model, opts.dtype)
    eos = list(cfg.eos_token_id)
    gen, cache = timed_greedy(engine, prompt, opts.max_new_tokens, eos, opts.block_size)

    # Every fed position: the prompt's rows, then each decode step's (an engine that
    # keeps no prompt rows is judged from the last prompt position on).
    fed = prompt + gen.tokens[:-1]
    ref = Reference(opts.model)
    if gen.prompt_logits is not None:
        ours, skip = np.concatenate([gen.prompt_logits[:-1], gen.logits]), 0
    else:
        ours, skip = gen.logits, len(prompt) - 1
    diff = compare_logits(ours, ref.logits(fed)[skip:], first_position=skip)
    # Tokens chosen from non-finite logits are argmaxes of NaN: comparing them says nothing.
    finite = not diff.non_finite
    ref_tokens = ref.greedy(prompt, opts.max_new_tokens)
    c = cache_report(cfg, cache, opts.dtype, len(prompt), len(gen.tokens))
    report = {
        "model_dir": str(opts.model),
        "dtype": opts.dtype,
        "max_new_tokens": opts.max_new_tokens,
        "digest": run_digest(opts.model, prompt, opts.max_new_tokens),
        "engine": {"name": engine.name, "version": engine.version(), "weights": engine.weights()},
        "known_issue": engine.known_issue(opts.model),
        "block_size": c.get("block_size"),
        "machine": machine(),
        "versions": versions(),
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
            "text": model.tokenizer.decode(gen.tokens) if model.tokenizer is not None else None,
            "stop_reason": "eos" if gen.tokens[-1] in eos else "max_new_tokens",
        },
        "timing": timing_summary(gen.prefill_ms, gen.decode_ms),
        "cache": c,
        "parity": {
            "reference": "HF transformers LlamaForCausalLM, float32, eager attention, torch CPU"
            + (", on the de-quantized weights" if ref.quantized else ""),
            **diff.as_dict(),
            "nmse_limit": NMSE_LIMIT[opts.dtype],
            "greedy_reference_ids": ref_tokens,
            "greedy_identical": gen.tokens == ref_tokens if finite else None,
            "greedy_first_divergence": first_divergence(gen.tokens, ref_tokens) if finite else None,
        },
        "compare": [],
    }
    for cls in engines[1:]:
        peer = load_engine(cls, model, opts.dtype)
        peer_gen, _ = timed_greedy(peer, prompt, opts.max_new_tokens, eos)
        report["compare"].append(
            {
                "engine": f"{peer.name} ({peer.version()})",
                "tokens": peer_gen.tokens,
                **timing_summary(peer_gen.prefill_ms, peer_gen.decode_ms),
            }
        )
    limit, cached = NMSE_LIMIT[opts.dtype], len(prompt) + len(gen.tokens) - 1
    measured, formula = c["sequence_nbytes_measured"], c["sequence_nbytes_formula"]
    checks = {  # name: (passed, why not)
        "logits_finite": (finite, f"NaN or inf in {describe_non_finite(diff.non_finite)}"),
        "parity_nmse": (
            diff.nmse <= limit,
            f"NMSE {diff.nmse:.3g} > {limit:g}" if finite else "not measured: non-finite logits",
        ),
        "cached_tokens_rule": (
            c["cached_tokens"] == cached,
            f"{c['cached_tokens']} tokens cached, the rule gives {cached}",
        ),
        "kv_bytes_match_formula": (
            measured == formula,
            f"measured {measured:,} B, formula {formula:,} B",
        ),
    }
    if "blocks_used" in c:
        checks["blocks_used"] = (
            c["blocks_used"] == c["blocks_expected"],
            f"{c['blocks_used']} blocks used, ceil(tokens / block_size) = {c['blocks_expected']}",
        )
    report["checks"] = {name: ok for name, (ok, _) in checks.items()}
    report["failures"] = {name: why for name, (ok, why) in checks.items() if not ok}
    report["passed"] = not report["failures"]
    return report
