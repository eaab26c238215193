"""GPU timing of our engine beside mlx-lm on the TinyLlama-1.1B shape, float16.

Meant for the lent NVIDIA machine with MLX's CUDA backend (see tools/gpu_run.sh);
it also runs, slowly, on the CPU backend. Prints a table and writes JSON:

  python tools/gpu_bench.py --out results/gpu-bench.json

Every figure is the median of timed repetitions after warm-up, each ending in
mx.eval. The engines compared at one point are timed interleaved (ours, ours
compiled, mlx-lm, ours, ...), so drift in clocks or host load hits them alike:
separate runs of the same mlx-lm step differed by up to 2x on one machine. The
weights-read floor is the fp16 weight bytes divided by the read bandwidth of a
large device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from benchmarks import common
from impl.engine import decode, prefill
from impl.paged_cache import PagedKVCache

DTYPE = "float16"
CONTEXTS = [16, 512, 2048]
BATCHES = [8, 32]


def median_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    return interleaved_ms([fn], warmup, reps)[0]


def interleaved_ms(fns: list, warmup: int = 3, reps: int = 30) -> list[float]:
    """Median ms of each step function, the functions taking turns rep by rep."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def copy_gbps() -> float:
    """Bandwidth of a 1 GiB device copy, counting bytes read and written (FACTS.md's
    convention: 3.0 TB/s on an H100, giving the 0.73 ms floor for 2.2 GB)."""
    x = mx.ones((256, 1024, 1024), dtype=mx.float32)
    mx.eval(x)
    ms = median_ms(lambda: mx.eval(x + 0), warmup=2, reps=10)
    return 2 * x.nbytes / (ms / 1e3) / 1e9


def ours_decode(model, contexts: list[int], spare_blocks: int = 0, compiled: bool = False):
    """A step function: one decode step for len(contexts) sequences at those contexts, rolled back
    (``trim``) after each timed step so every repetition sees the same contexts.
    ``spare_blocks`` enlarges the pool: the step time must not grow with it, or the
    cache write copies the pool instead of updating it in place."""
    bs = common.BLOCK_SIZE
    blocks = sum(-(-c // bs) for c in contexts) + spare_blocks
    cache = PagedKVCache(model.config, blocks, bs, common.DTYPES[DTYPE])
    for i, c in enumerate(contexts):
        cache.add_sequence(i)
        cache.plan([i], c - 1)
    seqs = list(range(len(contexts)))

    def step():
        decode(model, cache, seqs, [5] * len(seqs), compiled=compiled)
        for i in seqs:
            cache.trim(i, 1)

    return step


def build_ms(model, context: int, peer: bool) -> float:
    """Host time to build one decode step's graph (no evaluation), batch 1: the part of
    a step that is Python and MLX bookkeeping rather than GPU work."""
    from mlx_lm.models.cache import make_prompt_cache

    times = []
    if peer:
        args = model.args
        shape = (
            1,
            args.num_key_value_heads,
            context - 1,
            args.hidden_size // args.num_attention_heads,
        )
        cache = make_prompt_cache(model)
        for c in cache:
            c.update_and_fetch(mx.zeros(shape, mx.float16), mx.zeros(shape, mx.float16))
    else:
        cache = PagedKVCache.for_tokens(model.config, context, common.BLOCK_SIZE, mx.float16)
        cache.add_sequence(0)
        cache.plan([0], context - 1)
    tok = mx.array([[5]])
    for _ in range(23):
        t0 = time.perf_counter()
        if peer:
            out = model(tok, cache=cache)
        else:
            out = model(tok, cache, cache.plan([0], 1))
        times.append((time.perf_counter() - t0) * 1e3)
        mx.eval(out, *([c.keys for c in cache] if peer else cache.k + cache.v))
        for c in cache if peer else []:
            c.trim(1)
        if not peer:
            cache.trim(0, 1)
    return statistics.median(times[3:])


def profile_build(model, context: int = 512, steps: int = 20) -> None:
    """Print where the host time of building our decode graphs goes (cProfile)."""
    import cProfile
    import pstats

    cache = PagedKVCache.for_tokens(model.config, context, common.BLOCK_SIZE, mx.float16)
    cache.add_sequence(0)
    cache.plan([0], context - 1)
    tok = mx.array([[5]])
    prof = cProfile.Profile()
    for _ in range(steps):
        prof.enable()
        out = model(tok, cache, cache.plan([0], 1))
        prof.disable()
        mx.eval(out, cache.k, cache.v)
        cache.trim(0, 1)
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def ours_prefill(model, n: int, compiled: bool = False):
    """A step function: prefill n tokens into an empty sequence."""
    cache = PagedKVCache.for_tokens(model.config, n, common.BLOCK_SIZE, common.DTYPES[DTYPE])
    prompt = common.tokens(n, model.config.vocab_size)

    def run():
        cache.add_sequence(0)
        prefill(model, cache, 0, prompt, compiled=compiled)
        cache.release(0)

    return run


def mlx_lm_decode(model, contexts: list[int]):
    """A step function: mlx-lm's decode step at these contexts: its KVCache for one sequence, its
    left-padded BatchKVCache for a batch; rolled back with its own ``trim``."""
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    args = model.args
    head_dim = args.hidden_size // args.num_attention_heads
    longest = max(contexts) - 1
    shape = (len(contexts), args.num_key_value_heads, longest, head_dim)
    if len(contexts) == 1:
        cache = make_prompt_cache(model)
    else:
        cache = [BatchKVCache([longest - (c - 1) for c in contexts]) for _ in model.layers]
    for c in cache:
        c.update_and_fetch(mx.zeros(shape, mx.float16), mx.zeros(shape, mx.float16))
    tok = mx.array([[5]] * len(contexts))

    def step():
        mx.eval(model(tok, cache=cache))
        for c in cache:
            c.trim(1)

    return step


def mlx_lm_prefill(model, n: int):
    from mlx_lm.models.cache import make_prompt_cache

    prompt = mx.array(common.tokens(n, model.args.vocab_size))[None]
    return lambda: mx.eval(model(prompt, cache=make_prompt_cache(model)))


def mixed_contexts(batch: int) -> list[int]:
    """Deterministic mixed lengths between 16 and 2048."""
    return [16 + (i * 997) % 2032 for i in range(batch)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("results/gpu-bench.json"))
    p.add_argument("--preset", choices=list(common.PRESETS), default="tinyllama")
    args = p.parse_args()
    ours = common.model(args.preset, DTYPE)
    peer = common.mlx_lm_model(args.preset, DTYPE)
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(ours.parameters()))
    gbps = copy_gbps()
    floor_ms = weight_bytes / (gbps * 1e9) * 1e3
    # (point, ours, ours compiled, mlx-lm); ms, or tokens/s for the batched rows.
    rows: list[tuple[str, float, float | None, float | None]] = []
    for c in CONTEXTS:
        steps = [ours_decode(ours, [c]), ours_decode(ours, [c], compiled=True)]
        rows.append((f"decode b=1 ctx={c} ms", *interleaved_ms([*steps, mlx_lm_decode(peer, [c])])))
    steps = [ours_prefill(ours, 512), ours_prefill(ours, 512, compiled=True)]
    rows.append(("prefill 512 ms", *interleaved_ms([*steps, mlx_lm_prefill(peer, 512)], reps=15)))
    for b in BATCHES:
        ctx = mixed_contexts(b)
        steps = [ours_decode(ours, ctx), ours_decode(ours, ctx, compiled=True)]
        ms = interleaved_ms([*steps, mlx_lm_decode(peer, ctx)])
        rows.append((f"decode b={b} mixed tokens/s", *(b / (m / 1e3) for m in ms)))
    # The pool size must not show in the step time: the cache write is in place.
    small, big = interleaved_ms([ours_decode(ours, [512]), ours_decode(ours, [512], 8192)])
    rows.append(("decode b=1 ctx=512 ms, pool just big enough", small, None, None))
    rows.append(("decode b=1 ctx=512 ms, pool +8192 blocks", big, None, None))
    rows.append(
        ("graph build b=1 ctx=512 ms", build_ms(ours, 512, False), None, build_ms(peer, 512, True))
    )
    device = f"{mx.default_device()} {platform.node()}"
    print(
        f"device {device}; weights {weight_bytes / 1e9:.2f} GB; copy {gbps:.0f} GB/s;"
        f" weights-read floor {floor_ms:.3f} ms"
    )
    head = ["ours", "compiled", "mlx-lm", "best/mlx-lm", "best/floor"]
    print(f"{'point':44s}" + "".join(f"{h:>12s}" for h in head))
    for name, a, c, b in rows:
        per_s = name.endswith("tokens/s")
        best = a if c is None else (max(a, c) if per_s else min(a, c))
        cells = [a, c, b]
        cells += [
            best / b if b else None,
            best / floor_ms if "decode" in name and not per_s else None,
        ]
        print(
            f"{name:44s}" + "".join(f"{x:12.3f}" if x is not None else f"{'-':>12s}" for x in cells)
        )
    profile_build(ours)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "device": device,
                "mlx": mx.__version__,
                "dtype": DTYPE,
                "weight_bytes": weight_bytes,
                "copy_gbps": gbps,
                "floor_ms": floor_ms,
                "rows": [
                    {"point": n, "ours": a, "ours_compiled": c, "mlx_lm": b} for n, a, c, b in rows
                ],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
