"""In one process, interleaved: batch-1 compiled decode at 4275822's code (base) and
variants, each its own loaded model (a compiled graph keeps what it traced), and mlx-lm.
  fitw  : decode attention with no more warps than 32-token chunks in a partition
  m2    : the step also queued early after layer 2 (impl.engine.commit_layers)
  m2x   : ... after layers 2, 6 and 10
  m21   : ... after the last layer (21) as well
  m2fit : m2 and fitw
Usage, from the repository root: PYTHONPATH=. python results/gpu/marks-ab.py"""

import os
import statistics
import sys

import mlx.core as mx
import mlx.nn as nn

import conform_mlx.impl.engine as E
import conform_mlx.impl.kernels  # noqa: F401
import conform_mlx.impl.model as im
from tools import gpu_bench as gb  # noqa: I001

pa = sys.modules["conform_mlx.impl.kernels.paged_attention"]
kr = sys.modules["conform_mlx.impl.kernels.rope"]
from conform_bench import common
from conform_mlx.engines import resolve

BASE_ATTN, BASE_LAZY = im.Attention.__call__, E.CompiledSteps.lazy
BASE_PARTS = (pa.N_WARPS, pa.MIN_PARTITION_TOKENS)


def attn_views(self, x, layer, cache, plan, rope, context):
    B, T = plan.positions.shape
    if T != 1 or kr._KERNEL is None:
        return BASE_ATTN(self, x, layer, cache, plan, rope, context)
    qkv = self.project_qkv(x)
    pool = cache.kv[layer]
    n_kv, hd = pool.shape[3], pool.shape[4]
    n_q = self.n_heads
    q, kv = kr._KERNEL(
        inputs=[qkv, rope.cos, rope.sin],
        output_shapes=[(B, T, n_q, hd), (B * T, 2, n_kv, hd)],
        output_dtypes=[qkv.dtype] * 2,
        **kr.call_args(qkv, n_kv, hd),
    )
    pool[rope.blocks, rope.offsets] = kv
    cache.update_layer(layer, pool)
    inputs = [
        q,
        pool,
        plan.block_tables,
        plan.context_lens,
        mx.array([self.scale], dtype=mx.float32),
    ]
    n_warps, n_parts = pa.launch_plan(B, n_kv, plan.block_tables.shape[1], pool.shape[1])
    launch = pa.kernel_call_args(q, pool, n_parts, n_warps)
    final, split, combine = pa._KERNELS
    flat = (B, n_q * hd)
    if n_parts == 1:
        out = final(inputs=inputs, output_shapes=[flat], output_dtypes=[q.dtype], **launch)[0]
    else:
        acc, ml = split(
            inputs=inputs,
            output_shapes=[(B, n_q, n_parts, hd), (B, n_q, n_parts, 2)],
            output_dtypes=[mx.float32] * 2,
            **launch,
        )
        out = combine(
            inputs=[acc, ml],
            output_shapes=[flat],
            output_dtypes=[q.dtype],
            **pa.combine_call_args(q),
        )[0]
    return self.o_proj(out)


def lazy_host(self, tokens, cache, plan):
    step = self.graph(plan.fresh)
    out, kv_pools, marks = step(tokens, *E.step_arrays(plan), cache.kv)
    cache.kv[:] = kv_pools
    for mark in marks:
        mx.async_eval(mark)
    return out


class TLinear(nn.Linear):
    def __call__(self, x):
        return x @ self["_wt"]


def pre_transpose(model):
    lins = [m for _, m in model.named_modules() if type(m) is nn.Linear]
    for m in lins:
        m._wt = m.weight.T
        m.__class__ = TLinear
    mx.eval([m._wt for m in lins])
    return len(lins)


BASE_COMMIT = E.commit_layers


def marks(layers):
    return lambda n: [x for x in layers if x < n]


def fit_plan(batch, n_kv, max_blocks, block_size):
    parts = pa.num_partitions(batch, n_kv, max_blocks, block_size)
    tokens = -(-max_blocks * block_size // parts)
    return max(1, min(BASE_PARTS[0], -(-tokens // 32))), parts


BASE_PLAN = pa.launch_plan
VARIANTS = {
    "base": dict(),
    "fitw": dict(plan=fit_plan),
    "m2": dict(commit=marks([2, 15, 17, 19])),
    "m2x": dict(commit=marks([2, 6, 10, 15, 17, 19])),
    "m21": dict(commit=marks([15, 17, 19, 21])),
    "m2fit": dict(commit=marks([2, 15, 17, 19]), plan=fit_plan),
}
ONLY = os.environ.get("VARIANTS")
if ONLY:
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in ONLY.split(",")}

path = common.checkpoint(os.environ.get("PRESET", "tinyllama"))
engines = {}
for name, v in VARIANTS.items():
    engines[name] = resolve("impl-compiled").load(path, "float16")
    if v.get("preT"):
        print(name, "pre-transposed linears:", pre_transpose(engines[name].model), flush=True)
lm = resolve("mlx-lm").load(path, "float16")


def using(name, step):
    v = VARIANTS[name]

    def run():
        im.Attention.__call__ = v.get("attn", BASE_ATTN)
        E.CompiledSteps.lazy = v.get("lazy", BASE_LAZY)
        pa.N_WARPS, pa.MIN_PARTITION_TOKENS = v.get("parts", BASE_PARTS)
        E.commit_layers = v.get("commit", BASE_COMMIT)
        pa.launch_plan = v.get("plan", BASE_PLAN)
        step()

    return run


names = [*VARIANTS, "mlx-lm"]
REPS = int(os.environ.get("REPS", 60))
print(mx.default_device(), "variants:", names, "reps", REPS, flush=True)
for ctx in [16, 512, 2048]:
    steps = [using(n, gb.decode_step(engines[n], [ctx])) for n in VARIANTS]
    steps.append(gb.decode_step(lm, [ctx]))
    ms = gb.interleaved_samples(steps, warmup=5, reps=REPS)
    med = [statistics.median(t) for t in ms]
    print(
        f"decode b=1 ctx={ctx} median ms: " + ", ".join(f"{n} {m:.3f}" for n, m in zip(names, med))
    )
    for n, t in zip(names[:-1], ms):
        q, qb = gb.paired_ratios(t, ms[-1]), gb.paired_ratios(t, ms[0])
        print(
            f"  {n:6s} / mlx-lm {q[0]:.3f} {q[1]:.3f} {q[2]:.3f}   / base {qb[0]:.3f} {qb[1]:.3f} {qb[2]:.3f}",
            flush=True,
        )
for b in [8, 32]:
    steps = [using(n, gb.decode_step(engines[n], gb.mixed_contexts(b))) for n in VARIANTS]
    ms = gb.interleaved_samples(steps, warmup=3, reps=20)
    print(
        f"decode b={b} mixed median ms: "
        + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in zip(names, ms)),
        flush=True,
    )
for n in VARIANTS:
    a = gb.step_anatomy(using(n, gb.decode_step(engines[n], [512])))
    print(
        f"anatomy ctx 512 {n:6s} launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f} views {sum(v for k, v in a['primitives'].items() if k in gb.VIEWS)}",
        flush=True,
    )
a = gb.step_anatomy(gb.decode_step(lm, [512]))
print(
    f"anatomy ctx 512 mlx-lm launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f} views {sum(v for k, v in a['primitives'].items() if k in gb.VIEWS)}",
    flush=True,
)
# correctness of each variant against base: one decode step's logits at ctx 512
import numpy as np  # noqa: E402

ref = None
for n in VARIANTS:
    e = engines[n]
    im.Attention.__call__ = VARIANTS[n].get("attn", BASE_ATTN)
    E.CompiledSteps.lazy = VARIANTS[n].get("lazy", BASE_LAZY)
    pa.N_WARPS, pa.MIN_PARTITION_TOKENS = VARIANTS[n].get("parts", BASE_PARTS)
    E.commit_layers = VARIANTS[n].get("commit", BASE_COMMIT)
    pa.launch_plan = VARIANTS[n].get("plan", BASE_PLAN)
    c = common.new_cache(e, 600)
    c.add_sequence(0)
    e.fill(c, 0, 511)
    out = np.asarray(e.decode_batch(c, [0], [5]))
    ref = out if ref is None else ref
    print(f"logits {n:6s} max |diff| to base {np.abs(out - ref).max():.4g}", flush=True)
