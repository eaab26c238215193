"""Row kernels (impl.kernels.norm_linear, branch exp/row-kernels) with the step queued early
at other layers. MLX's CUDA backend submits a step's kernels in graphs of up to 100
launches; impl.engine.commit_layers queues the step at layers 15, 17 and 19 (of 22),
tuned for MLX's ops (about 13 launches a layer). With the row kernels a layer is about
8 launches, so the first graph holds 12 layers and the GPU starts late. Variants: MLX's
ops or the row kernels, each with the default marks, marks every 2 layers, every 4.
Whole decode steps interleaved with mlx-lm, generate tokens/s, anatomy. Output:
row-commit-ab.txt."""

import os
import statistics
import sys

sys.path.insert(0, os.getcwd())
import mlx.core as mx
import numpy as np

import conform_mlx.impl.engine
from conform_bench import common
from conform_mlx.engines import resolve
from conform_mlx.impl.kernels.norm_linear import BACKEND, USE_LINEAR_ROW, USE_NORM_LINEAR
from tools import gpu_bench as gb  # noqa: binds MLX's BLAS before MLX is imported

print(mx.default_device(), flush=True)
DEFAULT = conform_mlx.impl.engine.commit_layers
EVERY2 = lambda n: list(range(1, n - 2, 2))  # noqa: E731
EVERY4 = lambda n: list(range(3, n - 2, 4))  # noqa: E731
V = {
    "ops": (False, DEFAULT),
    "rows": (True, DEFAULT),
    "rows-m2": (True, EVERY2),
    "rows-m4": (True, EVERY4),
    "ops-m2": (False, EVERY2),
}
V = {k: v for k, v in V.items() if k in os.environ.get("VARIANTS", ",".join(V)).split(",")}


def apply(name):
    on, marks = V[name]
    USE_NORM_LINEAR[BACKEND] = USE_LINEAR_ROW[BACKEND] = on
    conform_mlx.impl.engine.commit_layers = marks


path = common.checkpoint(os.environ.get("PRESET", "tinyllama"))
eng = {}
for n in V:
    apply(n)
    eng[n] = resolve("impl-compiled").load(path, "float16")
lm = resolve("mlx-lm").load(path, "float16")


def using(name, step):
    def run():
        apply(name)
        step()

    return run


names = [*V, "mlx-lm"]
REPS = int(os.environ.get("REPS", 40))
for c in [16, 512, 2048]:
    steps = [using(n, gb.decode_step(eng[n], [c])) for n in V] + [gb.decode_step(lm, [c])]
    ms = gb.interleaved_samples(steps, warmup=5, reps=REPS)
    print(
        f"decode b=1 ctx={c} median ms: "
        + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in zip(names, ms))
    )
    for n, t in zip(names[:-1], ms):
        q1, qb = gb.paired_ratios(t, ms[-1]), gb.paired_ratios(t, ms[0])
        print(
            f"  {n:8s} / mlx-lm {q1[0]:.3f} {q1[1]:.3f} {q1[2]:.3f}   / ops {qb[0]:.3f} {qb[1]:.3f} {qb[2]:.3f}",
            flush=True,
        )
vocab = 32000 if "PRESET" not in os.environ else 256
gens = [using(n, gb.generate_step(eng[n], vocab)) for n in V] + [gb.generate_step(lm, vocab)]
ms = gb.interleaved_samples(gens, warmup=1, reps=int(os.environ.get("GREPS", 5)))
print(
    "generate 256 after 16 tokens/s: "
    + ", ".join(f"{n} {256 / (statistics.median(t) / 1e3):.0f}" for n, t in zip(names, ms)),
    flush=True,
)
for b in [8]:
    steps = [using(n, gb.decode_step(eng[n], gb.mixed_contexts(b))) for n in V] + [
        gb.decode_step(lm, gb.mixed_contexts(b))
    ]
    ms = gb.interleaved_samples(steps, warmup=3, reps=20)
    print(
        f"decode b={b} mixed median ms: "
        + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in zip(names, ms)),
        flush=True,
    )
for c in [16, 512]:
    for n in V:
        a = gb.step_anatomy(using(n, gb.decode_step(eng[n], [c])))
        print(
            f"anatomy ctx {c} {n:8s} launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}",
            flush=True,
        )
ref = None
for n in V:
    apply(n)
    e = eng[n]
    c = common.new_cache(e, 600)
    c.add_sequence(0)
    e.fill(c, 0, 511)
    out = np.asarray(e.decode_batch(c, [0], [5]), dtype=np.float32)
    ref = out if ref is None else ref
    print(f"logits {n} max |diff| to ops {np.abs(out - ref).max():.4g}", flush=True)
