"""Where a step's GPU time goes, per engine, under Nsight Compute (``ncu``).

    python3 tools/gpu_profile.py --engine impl-compiled --engine mlx-lm [--context 512]
        [--point decode|prefill|chunked]

The step is a batch-1 decode at ``--context`` (the default), a 512-token prefill
into an empty sequence, or a 512-token chunk after 1000 cached tokens (the points
of tools/gpu_bench.py). For each engine: the wall time of one step (measured without ncu),
then, under ``ncu``, the kernels of ``--steps`` steps marked by an NVTX range:
launches per step, the sum of kernel times per step against the wall time, and the
largest kernels grouped by name, with the threads each launched. ncu flushes the
caches before every kernel by default (``--cache-control all``), so small kernels
read long; ``--cache-control none`` keeps them warm, closer to a real step. Compare
engines within one run, not with the wall time alone. float16, the TinyLlama-1.1B shape
or ``--preset``'s (conform_bench/common.py).

Needs ``ncu`` on PATH and NVTX: torch's ``torch.cuda.nvtx`` where torch is
installed, else ``libnvToolsExt``. ``--worker`` is the process ncu profiles.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import io
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

RANGE = "conform-step"
PREFILL_TOKENS = 512  # the prefill points' chunk, as in tools/gpu_bench.py
CHUNK_PREFIX = 1000


def nvtx() -> tuple:
    """(push, pop) of an NVTX range; torch's where it imports, else libnvToolsExt."""
    try:
        import torch.cuda.nvtx as tnvtx

        return tnvtx.range_push, tnvtx.range_pop
    except ImportError:
        lib = ctypes.CDLL("libnvToolsExt.so.1")
        return (lambda name: lib.nvtxRangePushA(name.encode())), lib.nvtxRangePop


def worker(args: argparse.Namespace) -> int:
    """Load the engine, warm up, print the median wall ms of a step as JSON; with
    --mark, run --steps more steps inside the NVTX range for ncu."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conform_bench import common  # loads the BLAS before MLX
    from tools.gpu_bench import chunked_prefill_step, decode_step, median_ms, prefill_step

    engine = common.engine(args.engine[0], args.preset, "float16")
    vocab = common.vocab_size(args.preset)
    step = {
        "decode": lambda: decode_step(engine, [args.context]),
        "prefill": lambda: prefill_step(engine, PREFILL_TOKENS, vocab),
        "chunked": lambda: chunked_prefill_step(engine, CHUNK_PREFIX, PREFILL_TOKENS, vocab),
    }[args.point]()
    ms = median_ms(step, warmup=5, reps=20)
    if args.mark:
        push, pop = nvtx()
        for _ in range(args.steps):
            push(RANGE)
            step()
            pop()
    print(json.dumps({"engine": args.engine[0], "wall_ms": ms}))
    return 0


METRICS = ["gpu__time_duration.sum", "launch__grid_size", "launch__block_size"]


def kernels(csv_text: str) -> list[tuple[str, float, int]]:
    """(kernel name, ns, threads launched) per launch from ``ncu --csv`` output (its
    log lines skipped): one CSV row per (launch, metric)."""
    start = csv_text.find('"ID"')
    if start < 0:
        return []
    launches: dict[str, dict] = {}
    for r in csv.DictReader(io.StringIO(csv_text[start:])):
        one = launches.setdefault(r["ID"], {"name": r["Kernel Name"]})
        value = float(r["Metric Value"].replace(",", ""))
        if r["Metric Name"] == "gpu__time_duration.sum":
            value *= {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(r["Metric Unit"], 1)
        one[r["Metric Name"]] = value
    return [
        (
            k["name"],
            k.get("gpu__time_duration.sum", 0.0),
            int(k.get("launch__grid_size", 0) * k.get("launch__block_size", 0)),
        )
        for k in launches.values()
        if "gpu__time_duration.sum" in k
    ]


def short(name: str, width: int = 70) -> str:
    name = name.split("(")[0]
    return name if len(name) <= width else name[: width - 3] + "..."


def profile(engine: str, args: argparse.Namespace) -> dict:
    me = [sys.executable, __file__, "--worker", "--engine", engine]
    me += ["--context", str(args.context), "--steps", str(args.steps), "--point", args.point]
    me += ["--preset", args.preset]
    plain = subprocess.run(me, capture_output=True, text=True, check=True)
    wall = json.loads(plain.stdout.strip().splitlines()[-1])["wall_ms"]
    ncu = ["ncu", "--csv", "--metrics", ",".join(METRICS), "--nvtx"]
    ncu += ["--nvtx-include", f"{RANGE}/", "--cache-control", args.cache_control]
    run = subprocess.run([*ncu, *me, "--mark"], capture_output=True, text=True)
    launches = kernels(run.stdout)
    if run.returncode or not launches:
        tail = (run.stdout + run.stderr)[-2000:]
        raise RuntimeError(f"ncu found no kernels for {engine} (exit {run.returncode}):\n{tail}")
    by_name: dict[str, list[float]] = defaultdict(list)
    threads: dict[str, list[int]] = defaultdict(list)
    for name, ns, n_threads in launches:
        by_name[short(name)].append(ns)
        threads[short(name)].append(n_threads)
    per_step = args.steps
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]
    return {
        "engine": engine,
        "point": args.point,
        "wall_ms": wall,
        "launches_per_step": len(launches) / per_step,
        "kernel_ms_per_step": sum(ns for _, ns, _ in launches) / per_step / 1e6,
        "cache_control": args.cache_control,
        "top": [
            {
                "kernel": name,
                "launches_per_step": len(ns) / per_step,
                "ms_per_step": sum(ns) / per_step / 1e6,
                "median_us": statistics.median(ns) / 1e3,
                "threads": max(threads[name]),
            }
            for name, ns in top
        ],
    }


def what(args: argparse.Namespace) -> str:
    """The profiled step in words."""
    if args.point == "decode":
        return f"decode b=1 ctx={args.context}"
    if args.point == "prefill":
        return f"prefill {PREFILL_TOKENS}"
    return f"prefill {PREFILL_TOKENS} after {CHUNK_PREFIX} cached"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", default=None, help="repeatable")
    p.add_argument("--context", type=int, default=512, help="the decode point's context")
    p.add_argument(
        "--preset", default="tinyllama", help="conform_bench.common's preset (default tinyllama)"
    )
    p.add_argument(
        "--point",
        choices=["decode", "prefill", "chunked"],
        default="decode",
        help=f"the step profiled: decode, prefill {PREFILL_TOKENS}, or {PREFILL_TOKENS} "
        f"after {CHUNK_PREFIX} cached",
    )
    p.add_argument("--steps", type=int, default=3, help="profiled steps per engine")
    p.add_argument("--top", type=int, default=12, help="kernels listed per engine")
    p.add_argument(
        "--cache-control",
        choices=["all", "none"],
        default="all",
        help="ncu's: flush the caches before every kernel (all), or not (none)",
    )
    p.add_argument("--out", type=Path, help="JSON of the whole table")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mark", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.engine = args.engine or ["impl-compiled", "mlx-lm"]
    if args.worker:
        return worker(args)
    results = []
    for engine in args.engine:
        t0 = time.perf_counter()
        r = profile(engine, args)
        results.append(r)
        print(
            f"{engine}: {what(args)}: wall {r['wall_ms']:.3f} ms; "
            f"{r['launches_per_step']:.0f} launches, kernels {r['kernel_ms_per_step']:.3f} ms "
            f"per step (ncu, cache control {args.cache_control}; {time.perf_counter() - t0:.0f} s)"
        )
        for k in r["top"]:
            print(
                f"  {k['ms_per_step']:7.3f} ms  {k['launches_per_step']:5.0f} x "
                f"{k['median_us']:7.1f} us  {k['threads']:>8} thr  {k['kernel']}"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
