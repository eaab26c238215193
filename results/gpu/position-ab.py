"""Does an engine's place in the interleaved order move its time? tools/gpu_bench.py
times engines rep by rep in a fixed order (a, b, c, a, b, c, ...). Here two instances
of the same compiled engine (A, A2) and mlx-lm (M), fixed order and rotated (rep r
starts at engine r mod n), at decode b=1 ctx 512 and b=8 mixed; and A, A2 alone.
Identical engines should time alike wherever they sit. Output: position-ab.txt."""

import os
import statistics
import sys

sys.path.insert(0, os.getcwd())
import time

import mlx.core as mx

from conform_bench import common
from conform_mlx.engines import resolve
from tools import gpu_bench as gb  # noqa: binds MLX's BLAS before MLX is imported

print(mx.default_device(), flush=True)
path = common.checkpoint("tinyllama")
eng = {
    "A": resolve("impl-compiled").load(path, "float16"),
    "A2": resolve("impl-compiled").load(path, "float16"),
    "M": resolve("mlx-lm").load(path, "float16"),
}
REPS = int(os.environ.get("REPS", 60))


def samples(fns, rotate, warmup=5, reps=REPS):
    for _ in range(warmup):
        for f in fns:
            f()
    out = [[] for _ in fns]
    for r in range(reps):
        order = list(range(len(fns)))
        if rotate:
            order = order[r % len(fns) :] + order[: r % len(fns)]
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            out[i].append((time.perf_counter() - t0) * 1e3)
    return out


for label, ctxs in [
    ("b=1 ctx=512", [512]),
    ("b=8 mixed", gb.mixed_contexts(8)),
    ("b=1 ctx=16", [16]),
]:
    for names, rotate in [
        (["A", "A2", "M"], False),
        (["A", "A2", "M"], True),
        (["M", "A", "A2"], False),
        (["A", "A2"], False),
    ]:
        steps = [gb.decode_step(eng[n], ctxs) for n in names]
        ms = samples(steps, rotate)
        med = {n: statistics.median(t) for n, t in zip(names, ms)}
        tag = f"{label} {'rotated' if rotate else 'fixed  '} order {','.join(names):8s}"
        line = "  ".join(f"{n} {med[n]:.3f}" for n in names)
        d = dict(zip(names, ms))
        pr = f"A2/A {gb.paired_ratios(d['A2'], d['A'])[1]:.3f}"
        if "M" in d:
            pr += f"  A/M {gb.paired_ratios(d['A'], d['M'])[1]:.3f}  A2/M {gb.paired_ratios(d['A2'], d['M'])[1]:.3f}"
        print(f"{tag}: {line} | {pr}", flush=True)
