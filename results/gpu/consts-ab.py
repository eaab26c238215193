"""Step A/B in one process, interleaved with mlx-lm: main's kernels (scale and eps as
input arrays) against the branch's (template constants), with the fused add + RMSNorm
kernel off and on.
  base      : 6023e76's decode kernel and wrapper
  tmpl      : the scale and eps as template constants (6f2061a)
  tmpl+norm : tmpl, and the fused add + RMSNorm kernel dispatched
  norm-old  : base, and 6023e76's fused add + RMSNorm kernel (eps an input array)
Needs, beside it: old_source.py = 6023e76's impl/kernels/paged_decode_source.py; old_pa.py =
6023e76's impl/kernels/paged_attention.py importing build_kernels from old_source; old_norm.py =
6023e76's impl/kernels/add_rms_norm.py. Usage, from the repository root at 6f2061a:
PYTHONPATH=. python results/gpu/consts-ab.py"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tools import gpu_bench as gb  # noqa: I001
import mlx.core as mx
import numpy as np
import conform_mlx.impl.kernels  # noqa: F401
import old_pa
import old_norm

pa = sys.modules["conform_mlx.impl.kernels.paged_attention"]
anm = sys.modules["conform_mlx.impl.kernels.add_rms_norm"]
from conform_bench import common
from conform_mlx.engines import resolve

NEW_PDA, NEW_NORMK = pa.paged_decode_attention, anm.add_rms_norm_kernel
VARIANTS = {
    "base": dict(pda=old_pa.paged_decode_attention, norm=False),
    "tmpl": dict(pda=NEW_PDA, norm=False),
    "tmpl+norm": dict(pda=NEW_PDA, norm=True, normk=NEW_NORMK),
    "norm-old": dict(
        pda=old_pa.paged_decode_attention, norm=True, normk=old_norm.add_rms_norm_kernel
    ),
}
ONLY = os.environ.get("VARIANTS")
if ONLY:
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in ONLY.split(",")}


def apply(name):
    v = VARIANTS[name]
    pa.paged_decode_attention = v["pda"]
    anm.USE_KERNEL = v["norm"]
    anm.add_rms_norm_kernel = v.get("normk", NEW_NORMK)


path = common.checkpoint("tinyllama")
eng = {n: resolve("impl-compiled").load(path, "float16") for n in VARIANTS}
lm = resolve("mlx-lm").load(path, "float16")


def using(name, step):
    def run():
        apply(name)
        step()

    return run


names = [*VARIANTS, "mlx-lm"]
REPS = int(os.environ.get("REPS", 50))
print(mx.default_device(), "variants:", names, "reps", REPS, flush=True)
for ctx in [16, 512, 2048]:
    steps = [using(n, gb.decode_step(eng[n], [ctx])) for n in VARIANTS] + [
        gb.decode_step(lm, [ctx])
    ]
    ms = gb.interleaved_samples(steps, warmup=5, reps=REPS)
    print(
        f"decode b=1 ctx={ctx} median ms: "
        + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in zip(names, ms))
    )
    for n, t in zip(names[:-1], ms):
        q, qb = gb.paired_ratios(t, ms[-1]), gb.paired_ratios(t, ms[0])
        print(
            f"  {n:9s} / mlx-lm {q[0]:.3f} {q[1]:.3f} {q[2]:.3f}   / base {qb[0]:.3f} {qb[1]:.3f} {qb[2]:.3f}",
            flush=True,
        )
for b in [8, 32]:
    steps = [using(n, gb.decode_step(eng[n], gb.mixed_contexts(b))) for n in VARIANTS] + [
        gb.decode_step(lm, gb.mixed_contexts(b))
    ]
    ms = gb.interleaved_samples(steps, warmup=3, reps=20)
    print(
        f"decode b={b} mixed median ms: "
        + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in zip(names, ms)),
        flush=True,
    )
for n in VARIANTS:
    a = gb.step_anatomy(using(n, gb.decode_step(eng[n], [512])))
    print(
        f"anatomy ctx 512 {n:9s} launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}",
        flush=True,
    )
ref = None
for n in VARIANTS:
    apply(n)
    e = eng[n]
    c = common.new_cache(e, 600)
    c.add_sequence(0)
    e.fill(c, 0, 511)
    out = np.asarray(e.decode_batch(c, [0], [5]))
    ref = out if ref is None else ref
    print(f"logits {n:9s} max |diff| to base {np.abs(out - ref).max():.4g}", flush=True)
