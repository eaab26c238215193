"""Where a compiled batch-1 decode step's host time goes, with the engines interleaved
as tools/gpu_bench.py runs them (eager, compiled, mlx-lm) and with the compiled one
alone back to back. Parts: before (checks, plan), call (the compiled graph's replay),
marks (the early mx.async_eval), eval (encode the rest + wait), after (trim etc.)."""

import os
import statistics
import time

import mlx.core as mx

import conform_mlx.impl.engine as E
from conform_bench import common
from conform_mlx.engines import resolve
from tools import gpu_bench as gb  # noqa: I001

T = []


def lazy(self, tokens, cache, plan):
    T.append(("lazy", time.perf_counter()))
    step = self.graph(plan.fresh)
    arrays = E.step_arrays(plan)
    out, kv_pools, marks = step(tokens, *arrays, cache.kv)
    T.append(("called", time.perf_counter()))
    cache.kv[:] = kv_pools
    for mark in marks:
        mx.async_eval(mark)
    T.append(("marked", time.perf_counter()))
    return out


def call(self, tokens, cache, plan):
    out = self.lazy(tokens, cache, plan)
    mx.eval(out, cache.kv)
    T.append(("evaluated", time.perf_counter()))
    return out


E.CompiledSteps.lazy, E.CompiledSteps.__call__ = lazy, call
path = common.checkpoint(os.environ.get("PRESET", "tinyllama"))
names = ["impl", "impl-compiled", "mlx-lm"]
engines = [resolve(n).load(path, "float16") for n in names]
REPS = int(os.environ.get("REPS", 80))


def parts_of(step):
    def run():
        T.append(("start", time.perf_counter()))
        step()
        T.append(("end", time.perf_counter()))

    return run


def summary(records):
    keys = ["before", "call", "marks", "eval", "after", "total"]
    rows = {k: [] for k in keys}
    for r in records:
        d = dict(r)
        rows["before"].append(d["lazy"] - d["start"])
        rows["call"].append(d["called"] - d["lazy"])
        rows["marks"].append(d["marked"] - d["called"])
        rows["eval"].append(d["evaluated"] - d["marked"])
        rows["after"].append(d["end"] - d["evaluated"])
        rows["total"].append(d["end"] - d["start"])
    return "  ".join(f"{k} {statistics.median(v) * 1e3:.3f}" for k, v in rows.items())


for ctx in [16, 512]:
    steps = [gb.decode_step(e, [ctx]) for e in engines]
    steps[1] = parts_of(steps[1])
    for mode in ["interleaved", "alone", "interleaved"]:
        fns = steps if mode == "interleaved" else [steps[1]]
        T.clear()
        ms = gb.interleaved_samples(fns, warmup=5, reps=REPS)
        recs, cur = [], []
        for k, t in T:
            cur.append((k, t))
            if k == "end":
                recs.append(cur)
                cur = []
        recs = recs[-REPS:]
        med = [statistics.median(t) for t in ms]
        print(
            f"ctx {ctx} {mode:11s} medians "
            + ", ".join(
                f"{n} {m:.3f}" for n, m in zip(names if len(fns) == 3 else ["impl-compiled"], med)
            ),
            flush=True,
        )
        print(f"   compiled parts ms: {summary(recs)}", flush=True)
