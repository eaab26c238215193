"""Tree-merge decode kernel (branch exp/decode-tree, merged as 6296306: warps merged in
a tree through shared memory, warp 0 writes; partitions split each sequence's own
blocks) against 6f2061a's (tmpl_pa.py / tmpl_source.py beside this file, as in
decode-head-split-ab.py). PART=kern: kernel points with block tables padded to the
compiled step's width bucket (run at ff9216e: "o" = 6f2061a's policy, "w" = wide_plan).
PART=step: whole batch-1 steps interleaved with mlx-lm. Section 6b ran the variants
tmpl / tree4 (new kernel, 6f2061a's policy) / plan (new kernel and policy); 6c ran
tmpl / new, as written here. Output: decode-kernel-variants.txt, section 6."""

import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tools import gpu_bench as gb  # noqa
import mlx.core as mx
import numpy as np
import tmpl_pa
from tools import gpu_kernels_check as kc
import conform_mlx.impl.kernels  # noqa
from conform_mlx.impl.engine import pad_block_tables

pa = sys.modules["conform_mlx.impl.kernels.paged_attention"]
print(mx.default_device(), flush=True)
OLD_PLAN = pa.launch_plan
WIDE_WARPS = int(os.environ.get("WIDE_WARPS", 2048))


def wide_plan(batch, n_kv, max_blocks, block_size):
    # one 32-token chunk a warp, for a table assumed half full (width buckets are powers of two)
    chunks = max(1, math.ceil(max_blocks * block_size / 64))
    per_pair = max(1, min(chunks, math.ceil(WIDE_WARPS / (batch * n_kv))))
    w = min(16, 1 << (per_pair - 1).bit_length())
    return w, max(1, min(max_blocks, math.ceil(per_pair / w)))


PART = os.environ.get("PART", "kern,step")
if "kern" in PART:
    calls = 100
    for batch, context in [(1, 16), (1, 512), (1, 2048), (8, 512), (32, 512), (32, 2048)]:
        q, kv_pool, tables, ctx = kc.inputs(batch, context + 1)
        tables = pad_block_tables(tables)
        mx.eval(tables)
        scale = kc.HEAD_DIM**-0.5
        want = pa.paged_attention_ops(q, kv_pool, tables, ctx, (ctx - 1)[:, None], scale).astype(
            mx.float32
        )
        n_blocks = tables.shape[1]
        row = []
        f = lambda x: tmpl_pa.paged_decode_attention(x, kv_pool, tables, ctx, scale)
        err = mx.abs(f(q).astype(mx.float32) - want).max().item()
        row.append((kc.chained_ms(f, q, calls) * 1e3, "TMPL", err))
        pols = {
            OLD_PLAN(batch, kc.N_KV_HEADS, n_blocks, kc.BLOCK_SIZE): "o",
            wide_plan(batch, kc.N_KV_HEADS, n_blocks, kc.BLOCK_SIZE): "w",
        }
        shapes = set(pols) | {
            (w, p)
            for w in (1, 2, 4, 8, 16)
            for p in (1, 2, 4, 8, 16)
            if p <= n_blocks and p * w * 32 <= max(32, 2 * context)
        }
        for w, p in sorted(shapes):
            f = lambda x, w=w, p=p: pa.paged_decode_attention(x, kv_pool, tables, ctx, scale, p, w)
            err = mx.abs(f(q).astype(mx.float32) - want).max().item()
            row.append((kc.chained_ms(f, q, calls) * 1e3, f"{w}w{p}p" + pols.get((w, p), ""), err))
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
            + "  ".join(f"{n} {t:.1f} ({e:.0e})" for t, n, e in sorted(row)[:9]),
            flush=True,
        )
        print(
            "   ",
            [f"{n} {t:.1f}" for t, n, e in row if n == "TMPL" or n[-1] in "ow"],
            "max err",
            max(e for _, _, e in row),
            flush=True,
        )
if "step" in PART:
    from conform_bench import common
    from conform_mlx.engines import resolve

    NEW = pa.paged_decode_attention
    NEW_PLAN = pa.launch_plan
    V = {"tmpl": (tmpl_pa.paged_decode_attention, NEW_PLAN), "new": (NEW, NEW_PLAN)}
    path = common.checkpoint("tinyllama")
    eng = {n: resolve("impl-compiled").load(path, "float16") for n in V}
    lm = resolve("mlx-lm").load(path, "float16")

    def apply(n):
        pa.paged_decode_attention, pa.launch_plan = V[n]

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
    for c in [16, 512]:
        for n in V:
            a = gb.step_anatomy(using(n, gb.decode_step(eng[n], [c])))
            print(
                f"anatomy ctx {c} {n:5s} launches {a['launches']} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}",
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
        print(f"logits {n} max |diff| to tmpl {np.abs(out - ref).max():.4g}", flush=True)
