"""A/B of two source trees' compiled batch-1 decode step, on one host.

Two versions of the project cannot share a process, so each round runs one worker
process per version (the installed package, and the ``--base`` tree put first on the
path), in alternating order, and each worker times the same step (an engine
of the tree, the same checkpoint, contexts 16 / 512 / 2048). A round's ratio is its
two medians' ratio; the table gives the median ratio and its quartiles over the rounds.

  git archive 244ea50 | tar x -C /tmp/before          # the tree to compare against
  python tools/gpu_commit_ab.py --base /tmp/before --rounds 8

The worker uses only the engine interface both trees share (``resolve(name).load``,
``new_cache``, ``fill``, ``run_decode``), so any two commits since the engine door work.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTEXTS = (16, 512, 2048)


def worker(model: str, engine: str, dtype: str, reps: int, contexts: list[int]) -> dict[str, float]:
    """Median ms of one decode step at each context, in this process's tree."""
    # The package's import name in this process's tree: conform_mlx, or conform in a
    # tree from before it (named as a string: that tree is not this one).
    try:
        package = importlib.import_module("conform_mlx")
    except ImportError:
        package = importlib.import_module("conform")
    importlib.import_module(f"{package.__name__}.blas").load()
    engines = importlib.import_module(f"{package.__name__}.engines")
    eng = engines.resolve(engine).load(Path(model), dtype)
    out = {}
    for ctx in contexts:
        # As tools/gpu_bench.decode_step: the step at context ctx, rolled back after each.
        cache = eng.new_cache(ctx)
        cache.add_sequence(0)
        eng.fill(cache, 0, ctx - 1)
        times = []
        for rep in range(5 + reps):  # 5 warm-up steps: traces, first launches
            t0 = time.perf_counter()
            eng.run_decode(cache, [0], [5])
            if rep >= 5:
                times.append((time.perf_counter() - t0) * 1e3)
            cache.trim(0, 1)
        out[str(ctx)] = statistics.median(times)
    return out


def run_worker(tree: Path | None, args: argparse.Namespace) -> dict[str, float]:
    """A worker on ``tree`` (put first on the path), or on the installed package (None:
    this tree's import names exist only installed)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", args.model]
    cmd += ["--engine", args.engine, "--dtype", args.dtype, "--reps", str(args.reps)]
    cmd += ["--contexts", ",".join(map(str, args.contexts))]
    if args.cpus:  # every worker on the same cores: a host's cores differ in speed
        cmd = ["taskset", "-c", args.cpus, *cmd]
    path = os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), path]) if tree else path)
    done = subprocess.run(cmd, cwd=tree or ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker on {tree or 'the installed package'} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, help="the other tree (the 'before')")
    p.add_argument("--model", required=True, help="checkpoint directory both trees load")
    p.add_argument("--engine", default="impl-compiled")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--contexts", type=lambda v: [int(c) for c in v.split(",")], default=CONTEXTS)
    p.add_argument("--cpus", help="pin every worker to these cores (taskset -c list)")
    p.add_argument("--out", type=Path, help="JSON of every round")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.engine, args.dtype, args.reps, args.contexts)))
        return 0
    if args.base is None:
        p.error("--base is required")
    rounds = []
    for r in range(args.rounds):
        order = [("before", args.base), ("after", None)]
        if r % 2:
            order.reverse()
        got = {name: run_worker(tree, args) for name, tree in order}
        rounds.append(got)
        print(f"round {r}: " + json.dumps(got), file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(rounds, indent=1))
    print(f"{args.engine} {args.dtype} b=1 decode, {args.rounds} rounds x {args.reps} reps")
    print("ctx    before ms  after ms   after/before: q1 / median / q3")
    for ctx in map(str, args.contexts):
        ratios = [r["after"][ctx] / r["before"][ctx] for r in rounds]
        before = statistics.median(r["before"][ctx] for r in rounds)
        after = statistics.median(r["after"][ctx] for r in rounds)
        q1, med, q3 = quartiles(ratios)
        print(f"{ctx:>5}  {before:9.3f}  {after:8.3f}   {q1:.3f} / {med:.3f} / {q3:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
