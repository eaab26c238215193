"""In one process, interleaved: the MLP's gate/up split at one row, as before (slices
of the row: strided) or as now (halves of a (2, f) view), both compiled; and mlx-lm."""

import statistics

import mlx.nn as nn

import conform_mlx.impl.model as im
from conform_bench import common
from conform_mlx.engines import resolve
from tools import gpu_bench as gb  # noqa: I001

NEW = im.MLP.__call__


def old_call(self, x):
    gate_up = self.gate_up_proj(x)
    f = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :f], gate_up[..., f:]
    return self.down_proj(nn.silu(gate) * up)


path = common.checkpoint("tinyllama")
old = resolve("impl-compiled").load(path, "float16")
new = resolve("impl-compiled").load(path, "float16")
lm = resolve("mlx-lm").load(path, "float16")


def using(call, step):
    def run():
        im.MLP.__call__ = call
        step()

    return run


names = ["strided", "halves", "mlx-lm"]
for ctx in [16, 512, 2048]:
    steps = [
        using(old_call, gb.decode_step(old, [ctx])),
        using(NEW, gb.decode_step(new, [ctx])),
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
            f"  {n:8s} / mlx-lm {q[0]:.3f} {q[1]:.3f} {q[2]:.3f}   / strided {qo[0]:.3f} {qo[1]:.3f} {qo[2]:.3f}"
        )
gens = [
    using(old_call, gb.generate_step(old, 32000)),
    using(NEW, gb.generate_step(new, 32000)),
    gb.generate_step(lm, 32000),
]
ms = gb.interleaved_samples(gens, warmup=1, reps=7)
print(
    "generate 256 tokens/s: "
    + ", ".join(f"{n} {256 / (statistics.median(t) / 1e3):.1f}" for n, t in zip(names, ms))
)
for n, e, call in [("strided", old, old_call), ("halves", new, NEW)]:
    a = gb.step_anatomy(using(call, gb.decode_step(e, [512])))
    print(
        f"anatomy ctx 512 {n:8s} launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}"
    )
im.MLP.__call__ = NEW
