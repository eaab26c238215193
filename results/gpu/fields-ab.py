"""In one process, interleaved: how a step's fields reach the GPU, three ways, and mlx-lm.
packed: d64409e's plan (one host array of fields and tables); small: a20ce66 (fields of
<= 8 bytes, one array each, tables kept); device: 89d658d, not kept (one 8-byte array, five fields
made on the device, tables kept). Usage, from the repository root at the commit measured: PYTHONPATH=. python results/gpu/fields-ab.py OLD_TREE"""

import importlib.util
import statistics
import sys

import mlx.core as mx

import conform_mlx.impl.paged_cache as pc
from conform_bench import common
from conform_mlx.engines import resolve
from tools import gpu_bench as gb  # noqa: I001  (loads the BLAS before MLX)

spec = importlib.util.spec_from_file_location("old_pc", sys.argv[1] + "/impl/paged_cache.py")
old = importlib.util.module_from_spec(spec)
sys.modules["old_pc"] = old
spec.loader.exec_module(old)
NEW_PLAN, NEW_FIELDS = pc.PagedKVCache.plan, pc.step_fields


def small_fields(fields, block_size):
    if all(len(f) * 4 <= 8 for f in fields):
        return [mx.array(f, mx.int32) for f in fields]
    packed = mx.array([v for f in fields for v in f], mx.int32)
    out, start = [], 0
    for f in fields:
        out.append(packed[start : start + len(f)])
        start += len(f)
    return out


VARIANTS = {
    "packed": (old.PagedKVCache.plan, NEW_FIELDS),
    "small": (NEW_PLAN, small_fields),
    "device": (NEW_PLAN, NEW_FIELDS),
}


def variant(name, step):
    plan, fields = VARIANTS[name]

    def run():
        pc.PagedKVCache.plan, pc.step_fields = plan, fields
        step()

    return run


path = common.checkpoint(__import__("os").environ.get("PRESET", "tinyllama"))
ours = resolve("impl-compiled").load(path, "float16")
lm = resolve("mlx-lm").load(path, "float16")
names = [*VARIANTS, "mlx-lm"]
print(mx.default_device(), "variants:", names, flush=True)
for ctx in [16, 512, 2048]:
    steps = [variant(n, gb.decode_step(ours, [ctx])) for n in VARIANTS]
    steps.append(gb.decode_step(lm, [ctx]))
    ms = gb.interleaved_samples(steps, warmup=5, reps=int(__import__("os").environ.get("REPS", 60)))
    med = [statistics.median(t) for t in ms]
    print(
        f"decode b=1 ctx={ctx} median ms: " + ", ".join(f"{n} {m:.3f}" for n, m in zip(names, med))
    )
    for n, t in zip(names[:3], ms):
        q = gb.paired_ratios(t, ms[3])
        qp = gb.paired_ratios(t, ms[0])
        print(
            f"  {n:7s} / mlx-lm q1 med q3 {q[0]:.3f} {q[1]:.3f} {q[2]:.3f}   / packed {qp[0]:.3f} {qp[1]:.3f} {qp[2]:.3f}"
        )
for b in [8]:
    steps = [variant(n, gb.decode_step(ours, gb.mixed_contexts(b))) for n in VARIANTS]
    ms = gb.interleaved_samples(steps, warmup=3, reps=30)
    print(
        f"decode b={b} mixed median ms: "
        + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in zip(names, ms))
    )
for n in VARIANTS:
    a = gb.step_anatomy(variant(n, gb.decode_step(ours, [512])))
    print(
        f"anatomy ctx 512 {n:7s} launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}"
    )
pc.PagedKVCache.plan, pc.step_fields = NEW_PLAN, NEW_FIELDS
