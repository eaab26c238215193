"""Decode kernel with head split (branch exp/decode-head-split-groups, 8cd9c4c / dbe2de2:
thread groups serving a slice of a KV head's query heads; TOKENS_PER_WARP exists there
only) against 6f2061a's (tmpl_pa.py beside this file): per call in compiled chains over
padded tables (PART=kern, every sweep shape; PART=pol, the policy's shapes three times),
and whole batch-1 steps interleaved with mlx-lm (PART=step). Output:
decode-kernel-variants.txt, section 7. Not kept."""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tools import gpu_bench as gb  # noqa
import mlx.core as mx
import tmpl_pa
from tools import gpu_kernels_check as kc
import conform_mlx.impl.kernels  # noqa

pa = sys.modules["conform_mlx.impl.kernels.paged_attention"]
print(mx.default_device(), flush=True)
PART = os.environ.get("PART", "kern,step")
if "kern" in PART:
    calls = 100
    for batch, context in [(1, 16), (1, 512), (1, 2048), (8, 512), (32, 512), (32, 2048)]:
        q, kv_pool, tables, ctx = kc.inputs(batch, context + 1, padded=True)
        scale = kc.HEAD_DIM**-0.5
        want = pa.paged_attention_ops(q, kv_pool, tables, ctx, (ctx - 1)[:, None], scale).astype(
            mx.float32
        )
        n_blocks = tables.shape[1]
        row = []
        f = lambda x: tmpl_pa.paged_decode_attention(x, kv_pool, tables, ctx, scale)
        err = mx.abs(f(q).astype(mx.float32) - want).max().item()
        row.append((kc.chained_ms(f, q, calls) * 1e3, "TMPL", err))
        pol = kc.plan(batch, n_blocks)
        for s in kc.sweep(batch, context + 1, n_blocks):
            f = lambda x, s=s: pa.paged_decode_attention(
                x, kv_pool, tables, ctx, scale, s[1], s[0], head_split=s[2]
            )
            err = mx.abs(f(q).astype(mx.float32) - want).max().item()
            row.append(
                (
                    kc.chained_ms(f, q, calls) * 1e3,
                    kc.shape_name(s) + ("*" if s == pol else ""),
                    err,
                )
            )
        kc_, vc_ = (
            p[tables]
            .reshape(batch, -1, kc.N_KV_HEADS, kc.HEAD_DIM)
            .transpose(0, 2, 1, 3)[:, :, : context + 1]
            for p in (kv_pool[:, :, 0], kv_pool[:, :, 1])
        )
        mx.eval(kc_, vc_)
        sd = kc.chained_ms(
            lambda x: mx.fast.scaled_dot_product_attention(x, kc_, vc_, scale=scale), q, calls
        )
        print(
            f"b={batch} ctx={context}+1 width {n_blocks} cudnn {sd * 1e3:.1f} us | "
            + "  ".join(f"{n} {t:.1f} ({e:.0e})" for t, n, e in sorted(row)[:12]),
            flush=True,
        )
        print(
            "   ",
            [f"{n} {t:.1f}" for t, n, e in row if n == "TMPL" or n.endswith("*")],
            "max err",
            max(e for _, _, e in row),
            "shapes",
            len(row),
            flush=True,
        )
if "pol" in PART:
    calls = 100
    for batch, context in [(1, 16), (1, 512), (1, 2048), (8, 512), (32, 512), (32, 2048)]:
        q, kv_pool, tables, ctx = kc.inputs(batch, context + 1, padded=True)
        scale = kc.HEAD_DIM**-0.5
        n_blocks = tables.shape[1]
        fns = {"TMPL": lambda x: tmpl_pa.paged_decode_attention(x, kv_pool, tables, ctx, scale)}
        for tpw in (64, 32):
            pa.TOKENS_PER_WARP = tpw
            s_ = kc.plan(batch, n_blocks)
            fns[f"p{tpw}:" + kc.shape_name(s_)] = lambda x, s=s_: pa.paged_decode_attention(
                x, kv_pool, tables, ctx, scale, s[1], s[0], head_split=s[2]
            )
        pa.TOKENS_PER_WARP = 64
        res = {n: [] for n in fns}
        for _ in range(3):
            for n, f in fns.items():
                res[n].append(kc.chained_ms(f, q, calls) * 1e3)
        print(
            f"b={batch} ctx={context}+1 width {n_blocks} | "
            + "  ".join(f"{n} {' '.join(f'{t:.1f}' for t in ts)}" for n, ts in res.items()),
            flush=True,
        )
if "step" in PART:
    from conform_bench import common
    from conform_mlx.engines import resolve

    NEW = pa.paged_decode_attention
    V = {"tmpl": (tmpl_pa.paged_decode_attention, 64), "p64": (NEW, 64), "p32": (NEW, 32)}
    path = common.checkpoint("tinyllama")
    eng = {n: resolve("impl-compiled").load(path, "float16") for n in V}
    lm = resolve("mlx-lm").load(path, "float16")

    def apply(n):
        pa.paged_decode_attention, pa.TOKENS_PER_WARP = V[n]

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
                f"  {n:5s} / mlx-lm {q1[0]:.3f} {q1[1]:.3f} {q1[2]:.3f}   / tmpl {qb[0]:.3f} {qb[1]:.3f} {qb[2]:.3f}",
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
    for c in [16, 512, 2048]:
        for n in V:
            a = gb.step_anatomy(using(n, gb.decode_step(eng[n], [c])))
            print(
                f"anatomy ctx {c} {n:5s} launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}",
                flush=True,
            )
