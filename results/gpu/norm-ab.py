"""In one process, interleaved: add + RMSNorm as MLX's two kernels (ops) or the fused
custom kernel (fused), both compiled, and mlx-lm."""

import statistics
import sys

from conform_bench import common
from conform_mlx.engines import resolve
from tools import gpu_bench as gb  # noqa: I001

arn = sys.modules["conform_mlx.impl.kernels.add_rms_norm"]
path = common.checkpoint("tinyllama")
ops = resolve("impl-compiled").load(path, "float16")
fused = resolve("impl-compiled").load(path, "float16")
lm = resolve("mlx-lm").load(path, "float16")


def flagged(use, step):
    def run():
        arn.USE_KERNEL = use
        step()

    return run


names = ["ops", "fused", "mlx-lm"]
for ctx in [16, 512, 2048]:
    steps = [
        flagged(False, gb.decode_step(ops, [ctx])),
        flagged(True, gb.decode_step(fused, [ctx])),
        gb.decode_step(lm, [ctx]),
    ]
    ms = gb.interleaved_samples(steps, warmup=5, reps=60)
    med = [statistics.median(t) for t in ms]
    print(
        f"decode b=1 ctx={ctx} median ms: " + ", ".join(f"{n} {m:.3f}" for n, m in zip(names, med))
    )
    for n, t in zip(names[:2], ms):
        q, qo = gb.paired_ratios(t, ms[2]), gb.paired_ratios(t, ms[0])
        print(
            f"  {n:6s} / mlx-lm {q[0]:.3f} {q[1]:.3f} {q[2]:.3f}   / ops {qo[0]:.3f} {qo[1]:.3f} {qo[2]:.3f}"
        )
for b in [8, 32]:
    steps = [
        flagged(False, gb.decode_step(ops, gb.mixed_contexts(b))),
        flagged(True, gb.decode_step(fused, gb.mixed_contexts(b))),
    ]
    ms = gb.interleaved_samples(steps, warmup=3, reps=30)
    qo = gb.paired_ratios(ms[1], ms[0])
    print(
        f"decode b={b} mixed median ms: ops {statistics.median(ms[0]):.3f} fused {statistics.median(ms[1]):.3f}  fused/ops {qo[0]:.3f} {qo[1]:.3f} {qo[2]:.3f}"
    )
for n, e, use in [("ops", ops, False), ("fused", fused, True)]:
    a = gb.step_anatomy(flagged(use, gb.decode_step(e, [512])))
    print(
        f"anatomy ctx 512 {n:6s} launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}"
    )
