"""Decode kernel v2 (branch) against main's kernel (old_source.py): per call in compiled
chains at kernel points, and whole batch-1 steps interleaved with mlx-lm.
Ran on branch exp/decode-v2-preload (e718a88), with old_source.py beside it = 6023e76's
impl/kernels/paged_decode_source.py. Output: decode-kernel-variants.txt, section 3.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
import conform_mlx.impl.kernels  # noqa
import mlx.core as mx
import numpy as np
import old_source

from tools import gpu_bench as gb
from tools import gpu_kernels_check as kc

pa = sys.modules["conform_mlx.impl.kernels.paged_attention"]
NEW = pa._KERNELS
OLD = old_source.build_kernels(pa.BACKEND)
KS = {"old": OLD, "new": NEW}
print(mx.default_device(), flush=True)
PART = os.environ.get("PART", "kern,step")
if "kern" in PART:
    calls = 100
    for batch, context in [(1, 16), (1, 512), (1, 2048), (8, 512), (32, 512), (32, 2048)]:
        q, kv_pool, tables, ctx = kc.inputs(batch, context)
        scale = kc.HEAD_DIM**-0.5
        want = pa.paged_attention_ops(q, kv_pool, tables, ctx, (ctx - 1)[:, None], scale).astype(
            mx.float32
        )
        n_blocks = tables.shape[1]
        w0, p0 = pa.launch_plan(batch, kc.N_KV_HEADS, n_blocks, kc.BLOCK_SIZE)
        shapes = sorted(
            {(w0, p0), (4, 2 * p0), (2, p0), (2, 2 * p0), (8, p0), (4, max(1, p0 // 2))}
        )
        shapes = [(w, p) for w, p in shapes if p <= n_blocks]
        row = []
        for name in ["old", "new"]:
            pa._KERNELS = KS[name]
            for w, p in shapes:
                f = lambda x, w=w, p=p: pa.paged_decode_attention(
                    x, kv_pool, tables, ctx, scale, p, w
                )
                err = mx.abs(f(q).astype(mx.float32) - want).max().item()
                ms = kc.chained_ms(f, q, calls)
                row.append((ms * 1e3, f"{name}:{w}w{p}p", err))
        kc_, vc_ = (
            p[tables]
            .reshape(batch, -1, kc.N_KV_HEADS, kc.HEAD_DIM)
            .transpose(0, 2, 1, 3)[:, :, :context]
            for p in (kv_pool[:, :, 0], kv_pool[:, :, 1])
        )
        mx.eval(kc_, vc_)
        sd = kc.chained_ms(
            lambda x: mx.fast.scaled_dot_product_attention(x, kc_, vc_, scale=scale), q, calls
        )
        pol = f"{w0}w{p0}p"
        print(
            f"b={batch} ctx={context} policy {pol} cudnn {sd * 1e3:.1f} us | "
            + "  ".join(
                f"{n} {t:.1f}{'*' if n.endswith(':' + pol) else ''} ({e:.1e})"
                for t, n, e in sorted(row)
            ),
            flush=True,
        )
    pa._KERNELS = NEW
if "step" in PART:
    from conform_bench import common
    from conform_mlx.engines import resolve

    path = common.checkpoint("tinyllama")
    eng = {n: resolve("impl-compiled").load(path, "float16") for n in KS}
    lm = resolve("mlx-lm").load(path, "float16")

    def using(name, step):
        def run():
            pa._KERNELS = KS[name]
            step()

        return run

    names = [*KS, "mlx-lm"]
    REPS = int(os.environ.get("REPS", 60))
    for c in [16, 512, 2048]:
        steps = [using(n, gb.decode_step(eng[n], [c])) for n in KS] + [gb.decode_step(lm, [c])]
        ms = gb.interleaved_samples(steps, warmup=5, reps=REPS)
        print(
            f"decode b=1 ctx={c} median ms: "
            + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in zip(names, ms))
        )
        for n, t in zip(names[:2], ms):
            q1, qb = gb.paired_ratios(t, ms[-1]), gb.paired_ratios(t, ms[0])
            print(
                f"  {n:4s} / mlx-lm {q1[0]:.3f} {q1[1]:.3f} {q1[2]:.3f}   / old {qb[0]:.3f} {qb[1]:.3f} {qb[2]:.3f}",
                flush=True,
            )
    for b in [8, 32]:
        steps = [using(n, gb.decode_step(eng[n], gb.mixed_contexts(b))) for n in KS] + [
            gb.decode_step(lm, gb.mixed_contexts(b))
        ]
        ms = gb.interleaved_samples(steps, warmup=3, reps=20)
        print(
            f"decode b={b} mixed median ms: "
            + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in zip(names, ms)),
            flush=True,
        )
    for n in KS:
        a = gb.step_anatomy(using(n, gb.decode_step(eng[n], [512])))
        print(
            f"anatomy ctx 512 {n} launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}",
            flush=True,
        )
    ref = None
    for n in KS:
        pa._KERNELS = KS[n]
        e = eng[n]
        c = common.new_cache(e, 600)
        c.add_sequence(0)
        e.fill(c, 0, 511)
        out = np.asarray(e.decode_batch(c, [0], [5]))
        ref = out if ref is None else ref
        print(f"logits {n} max |diff| to old {np.abs(out - ref).max():.4g}", flush=True)
