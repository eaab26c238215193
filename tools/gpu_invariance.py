"""Batch invariance, run-to-run determinism and the cost of impl's batch-invariant mode,
on one machine in one process (meant for the GPU; runs anywhere).

For ``impl`` and ``impl-batch-invariant`` (compiled steps either way, as served):
- batch invariance: a sequence's decode row alone against the same step at every place
  in a batch of ``--batch`` sequences of other lengths, bitwise and max |dlogit|;
- determinism: one batched decode step run again on the same cache (rolled back between),
  ``--repeats`` times in this process, bitwise; a second process's step against this
  one's by digest (``--digest-out`` / ``--digest-in``);
- cost: decode tokens/s of the batch, the two engines interleaved rep by rep, and their
  paired ratio.

  python tools/gpu_invariance.py --model DIR [--dtype float16] [--batch 8] --out results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import numpy as np

ENGINES = ("impl-compiled", "impl-batch-invariant")


def setup(engine, batch: int, ctx: int):
    """A cache with the target at ``ctx`` - 1 tokens and batch - 1 others of other lengths."""
    rng = np.random.default_rng(0)
    cache = engine.new_cache(ctx + 64, max_sequences=batch)
    seqs = []
    for i in range(batch):
        cache.add_sequence(i)
        engine.fill(cache, i, ctx - 1 - (37 * i) % (ctx // 2))
        seqs.append(i)
    return cache, seqs, rng.integers(3, 200, batch).tolist()


def step(engine, cache, seqs, ids) -> np.ndarray:
    out = engine.decode_batch(cache, seqs, ids)
    for s in seqs:
        cache.trim(s, 1)
    return out


def measure(engine, batch: int, ctx: int, repeats: int) -> dict:
    cache, seqs, ids = setup(engine, batch, ctx)
    alone = step(engine, cache, [0], ids[:1])[0]
    rows, worst = [], 0.0
    for place in range(batch):  # sequence 0 at every place
        order = seqs[1:][:place] + [0] + seqs[1:][place:]
        tok = ids[1:][:place] + ids[:1] + ids[1:][place:]
        row = step(engine, cache, order, tok)[place]
        rows.append(bool(np.array_equal(row, alone)))
        worst = max(worst, float(np.abs(row - alone).max()))
    first = step(engine, cache, seqs, ids)
    same = [bool(np.array_equal(step(engine, cache, seqs, ids), first)) for _ in range(repeats)]
    return {
        "batch_rows_identical": sum(rows),
        "batch_rows": batch,
        "batch_max_abs": worst,
        "repeats_identical": sum(same),
        "repeats": repeats,
        "digest": hashlib.sha256(first.tobytes()).hexdigest(),
        "cache": cache,
        "seqs": seqs,
        "ids": ids,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", type=Path)
    p.add_argument("--digest-in", type=Path, help="another process's --out: compare digests")
    args = p.parse_args()

    from conform_mlx import blas
    from conform_mlx.engines import load_engine
    from conform_mlx.models import open_model

    blas.load()
    model = open_model(args.model)
    engines = {name: load_engine(name, model, args.dtype) for name in ENGINES}
    found = {name: measure(e, args.batch, args.ctx, args.repeats) for name, e in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in ENGINES}
    for rep in range(args.reps + 3):  # interleaved; 3 warm-up rounds
        for name in ENGINES if rep % 2 == 0 else ENGINES[::-1]:
            f = found[name]
            t0 = time.perf_counter()
            engines[name].run_decode(f["cache"], f["seqs"], f["ids"])
            elapsed = time.perf_counter() - t0
            for s in f["seqs"]:
                f["cache"].trim(s, 1)
            if rep >= 3:
                times[name].append(elapsed)
    ratios = [b / a for a, b in zip(*(times[n] for n in ENGINES))]
    q = statistics.quantiles(ratios, n=4)
    result = {
        "dtype": args.dtype,
        "batch": args.batch,
        "ctx": args.ctx,
        "engines": {
            name: {k: v for k, v in f.items() if k not in ("cache", "seqs", "ids")}
            | {
                "step_ms_median": 1e3 * statistics.median(times[name]),
                "tokens_per_s": args.batch / statistics.median(times[name]),
            }  # fmt: skip
            for name, f in found.items()
        },
        "invariant_over_default": {"q1": q[0], "median": statistics.median(ratios), "q3": q[2]},
    }
    if args.digest_in:
        other = json.loads(args.digest_in.read_text())["engines"]
        for name in ENGINES:
            result["engines"][name]["same_as_other_process"] = (
                other[name]["digest"] == result["engines"][name]["digest"]
            )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    for name, r in result["engines"].items():
        print(
            f"{name:22s} batch rows identical {r['batch_rows_identical']}/{r['batch_rows']} "
            f"(max |dlogit| {r['batch_max_abs']:.3g}), repeats identical "
            f"{r['repeats_identical']}/{r['repeats']}, "
            f"{r.get('same_as_other_process', '-')} vs other process, "
            f"step {r['step_ms_median']:.3f} ms, {r['tokens_per_s']:.0f} tokens/s"
        )
    i = result["invariant_over_default"]
    print(f"batch-invariant / default step time: {i['q1']:.3f} / {i['median']:.3f} / {i['q3']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
