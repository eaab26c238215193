"""Head-split decode kernel (branch) against main's (old_pa.py / old_source.py):
per call in compiled chains at kernel points (PART=kern), and whole batch-1 steps
interleaved with mlx-lm with the partition floor at 32 / 64 / 128 tokens (PART=step).
Ran on branch exp/decode-head-split (36ed2ef), with beside it: old_source.py / old_pa.py =
6023e76's impl/kernels/paged_decode_source.py / impl/kernels/paged_attention.py (importing
build_kernels from old_source), tmpl_source.py / tmpl_pa.py = the same files at 6f2061a
(tmpl_pa importing from tmpl_source). Output: decode-kernel-variants.txt, section 5.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tools import gpu_bench as gb  # noqa
import mlx.core as mx
import numpy as np
import old_pa
import tmpl_pa
from tools import gpu_kernels_check as kc
import conform_mlx.impl.kernels  # noqa

pa = sys.modules["conform_mlx.impl.kernels.paged_attention"]
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
        row = []
        f = lambda x: old_pa.paged_decode_attention(x, kv_pool, tables, ctx, scale)
        err = mx.abs(f(q).astype(mx.float32) - want).max().item()
        row.append((kc.chained_ms(f, q, calls) * 1e3, "OLD", err))
        f = lambda x: tmpl_pa.paged_decode_attention(x, kv_pool, tables, ctx, scale)
        err = mx.abs(f(q).astype(mx.float32) - want).max().item()
        row.append((kc.chained_ms(f, q, calls) * 1e3, "TMPL", err))
        pol = pa.launch_plan(batch, kc.N_HEADS, kc.N_KV_HEADS, n_blocks, kc.BLOCK_SIZE)
        for w, p in kc.sweep(batch, context, n_blocks):
            f = lambda x, w=w, p=p: pa.paged_decode_attention(x, kv_pool, tables, ctx, scale, p, w)
            err = mx.abs(f(q).astype(mx.float32) - want).max().item()
            row.append(
                (
                    kc.chained_ms(f, q, calls) * 1e3,
                    f"{w}w{p}p" + ("*" if (w, p) == pol else ""),
                    err,
                )
            )
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
        print(
            f"b={batch} ctx={context} cudnn {sd * 1e3:.1f} us | "
            + "  ".join(f"{n} {t:.1f} ({e:.0e})" for t, n, e in sorted(row)[:9]),
            flush=True,
        )
        print(
            "   ",
            [f"{n} {t:.1f}" for t, n, e in row if n in ("OLD", "TMPL") or n.endswith("*")],
            "max err",
            max(e for _, _, e in row),
            flush=True,
        )
if "step" in PART:
    from conform_bench import common
    from conform_mlx.engines import resolve

    NEW = pa.paged_decode_attention
    V = {
        "base": (old_pa.paged_decode_attention, 128),
        "tmpl": (tmpl_pa.paged_decode_attention, 128),
        "hs32": (NEW, 32),
        "hs64": (NEW, 64),
    }
    path = common.checkpoint("tinyllama")
    eng = {n: resolve("impl-compiled").load(path, "float16") for n in V}
    lm = resolve("mlx-lm").load(path, "float16")

    def apply(n):
        pa.paged_decode_attention, pa.MIN_PARTITION_TOKENS = V[n]

    def using(name, step):
        def run():
            apply(name)
            step()

        return run

    names = [*V, "mlx-lm"]
    REPS = int(os.environ.get("REPS", 50))
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
                f"  {n:5s} / mlx-lm {q1[0]:.3f} {q1[1]:.3f} {q1[2]:.3f}   / base {qb[0]:.3f} {qb[1]:.3f} {qb[2]:.3f}",
                flush=True,
            )
    for b in [8, 32]:
        steps = [using(n, gb.decode_step(eng[n], gb.mixed_contexts(b))) for n in V] + [
            gb.decode_step(lm, gb.mixed_contexts(b))
        ]
        ms = gb.interleaved_samples(steps, warmup=3, reps=20)
        print(
            f"decode b={b} mixed median ms: "
            + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in zip(names, ms)),
            flush=True,
        )
    for n in V:
        a = gb.step_anatomy(using(n, gb.decode_step(eng[n], [512])))
        print(
            f"anatomy ctx 512 {n:5s} launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}",
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
        print(f"logits {n} max |diff| to base {np.abs(out - ref).max():.4g}", flush=True)
