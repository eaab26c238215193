"""Experiment (device only): attention of a 512-token chunk after 1000 cached tokens,
TinyLlama heads, fp16, block 16: variants timed as 22 chained layers in one compiled graph."""

import math
import statistics
import time

import mlx.core as mx
import numpy as np

from conform_mlx.impl.engine import pad_block_tables
from conform_mlx.impl.kernels import paged_prefill
from conform_mlx.impl.kernels.paged_attention import causal_self_attention, paged_attention_ops

H, KV, D, BS, P, T, LAYERS = 32, 4, 64, 16, 1000, 512, 22
CTX = P + T
scale = 1 / math.sqrt(D)
rng = np.random.default_rng(0)
nblk = 256
width = -(-CTX // BS)
perm = rng.permutation(nblk)[:width]
tables = mx.array(perm[None].astype(np.int32))
tables128 = pad_block_tables(tables)
pool = mx.array(rng.standard_normal((nblk, BS, 2, KV, D)).astype(np.float16))
qs = [mx.array(rng.standard_normal((1, H, T, D)).astype(np.float16)) for _ in range(LAYERS)]
ctx = mx.array([CTX], dtype=mx.int32)
pos = mx.arange(P, CTX, dtype=mx.int32)[None]
tok = np.arange(CTX)
slots = mx.array((perm[tok // BS] * BS + tok % BS).astype(np.int32))
pslots = slots[:P]
flat = pool.reshape(nblk * BS, 2, KV, D)
own = flat[slots[P:]][None]  # (1, T, 2, KV, D)
mx.eval(tables, tables128, pool, qs, slots, own, flat)


def bias_of(tab):
    L = tab.shape[1] * BS
    kp = mx.arange(L, dtype=mx.int32)
    vis = (kp[None, None, :] <= pos[:, :, None]) & (kp[None, None, :] < ctx[:, None, None])
    return mx.where(vis, mx.array(0, mx.float16), mx.array(-mx.inf, mx.float16))[:, None]


def gathered(tab, zero=True):
    L = tab.shape[1] * BS
    rows = pool[tab].reshape(1, L, 2, KV, D)
    if zero:
        inseq = mx.arange(L)[None] < ctx[:, None]
        rows = mx.where(inseq[:, :, None, None, None], rows, mx.zeros((), mx.float16))
    rows = rows.transpose(2, 0, 3, 1, 4)
    return rows[0], rows[1]


def v_ops(q, tab):
    return paged_attention_ops(q, pool, tab, ctx, pos, scale)


def v_kernel(q):
    return paged_prefill.paged_prefill_attention(q, pool, tables, ctx, pos, scale)


def v_exact(q):
    rows = flat[slots][None].transpose(2, 0, 3, 1, 4)
    return mx.fast.scaled_dot_product_attention(q, rows[0], rows[1], scale=scale, mask="causal")


def v_split(q):
    pre = flat[pslots][None]
    rows = mx.concatenate([pre, own], axis=1).transpose(2, 0, 3, 1, 4)
    return mx.fast.scaled_dot_product_attention(q, rows[0], rows[1], scale=scale, mask="causal")


kc = flat[slots][None].transpose(2, 0, 3, 1, 4)
kcont, vcont = mx.contiguous(kc[0]), mx.contiguous(kc[1])
mx.eval(kcont, vcont)

variants = {
    "ops95 (eager path)": lambda: [v_ops(q, tables) for q in qs],
    "ops128 (compiled path)": lambda: [v_ops(q, tables128) for q in qs],
    "kernel": lambda: [v_kernel(q) for q in qs],
    "bias once + gather/where 128": lambda: (
        lambda b: [
            mx.fast.scaled_dot_product_attention(q, *gathered(tables128), scale=scale, mask=b)
            for q in qs
        ]
    )(bias_of(tables128)),
    "bias once + gather 128, no where": lambda: (
        lambda b: [
            mx.fast.scaled_dot_product_attention(
                q, *gathered(tables128, False), scale=scale, mask=b
            )
            for q in qs
        ]
    )(bias_of(tables128)),
    "bias once + gather/where 95": lambda: (
        lambda b: [
            mx.fast.scaled_dot_product_attention(q, *gathered(tables), scale=scale, mask=b)
            for q in qs
        ]
    )(bias_of(tables)),
    "exact slots + causal": lambda: [v_exact(q) for q in qs],
    "prefix slots + own + causal": lambda: [v_split(q) for q in qs],
    "contiguous k/v + causal (floor)": lambda: [
        mx.fast.scaled_dot_product_attention(q, kcont, vcont, scale=scale, mask="causal")
        for q in qs
    ],
    "own only causal (fresh prefill)": lambda: [causal_self_attention(q, own, scale) for q in qs],
}
ref = paged_attention_ops(
    qs[0].astype(mx.float32), pool.astype(mx.float32), tables, ctx, pos, scale
)
for name, fn in variants.items():
    try:
        out = fn()
        mx.eval(out)
        diff = (
            mx.abs(out[0].astype(mx.float32) - ref).max().item()
            if "fresh" not in name
            else float("nan")
        )
        res = {}
        for mode, f in (("eager", fn), ("compiled", mx.compile(fn))):
            for _ in range(3):
                mx.eval(f())
            ts = []
            for _ in range(15):
                t = time.perf_counter()
                mx.eval(f())
                ts.append(time.perf_counter() - t)
            res[mode] = statistics.median(ts) * 1e3 / LAYERS
        print(
            f"{name:36s} eager {res['eager']:.4f} ms/layer  compiled {res['compiled']:.4f} ms/layer  max|diff| {diff:.1e}",
            flush=True,
        )
    except Exception as e:
        print(f"{name:36s} FAILED {type(e).__name__}: {e}", flush=True)
