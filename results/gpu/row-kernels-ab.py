"""Row kernels (impl.kernels.norm_linear: the residual add + RMSNorm fused into the q/k/v
and gate/up projections, gate/up's activation too, and a plain row kernel for the o
and down projections and lm_head's) against MLX's add, rms_norm and matmul, on an
H200. PART=kern: 22 TinyLlama-shaped layers' projections chained in one compiled
function (no attention: a layer's qkv rows, sliced to the hidden width, stand in
for its attention output), and single projections. PART=step: whole decode steps,
the model with MLX's ops ("ops"), with the fused kernels only ("fused"), with both
kernels ("rows"), interleaved with mlx-lm. Output: row-kernels-ab.txt."""

import os
import statistics
import sys

sys.path.insert(0, os.getcwd())
import mlx.core as mx
import numpy as np

from conform_mlx.impl.kernels.norm_linear import (
    BACKEND,
    USE_LINEAR_ROW,
    USE_NORM_LINEAR,
    linear_row,
    linear_row_ops,
    norm_linear,
    norm_linear_ops,
)
from tools import gpu_bench as gb  # noqa: binds MLX's BLAS before MLX is imported
from tools import gpu_kernels_check as kc

print(mx.default_device(), flush=True)
H, F, QKV, V, L = 2048, 5632, 2560, 32000, 22
EPS = 1e-5
PART = os.environ.get("PART", "kern,step")


def rand(*shape, scale=1.0, seed=0):
    return (mx.random.normal(shape, key=mx.random.key(seed)) * scale).astype(mx.float16)


if "kern" in PART:
    layers = [
        dict(
            qkv=rand(QKV, H, scale=H**-0.5, seed=4 * i),
            o=rand(H, H, scale=H**-0.5, seed=4 * i + 1),
            gu=rand(2 * F, H, scale=H**-0.5, seed=4 * i + 2),
            down=rand(H, F, scale=F**-0.5, seed=4 * i + 3),
            n1=1 + 0.1 * rand(H, seed=900 + i),
            n2=1 + 0.1 * rand(H, seed=950 + i),
        )
        for i in range(L)
    ]
    head, nf = rand(V, H, scale=H**-0.5, seed=999), 1 + 0.1 * rand(H, seed=998)
    mx.eval(layers, head, nf)

    def chain(kern):
        nl, lin = (norm_linear, linear_row) if kern else (norm_linear_ops, linear_row_ops)

        def run(h):
            pending = None
            for w in layers:
                h, qkv = nl(h, pending, w["n1"], EPS, w["qkv"])
                attn = lin(qkv[:, :H], w["o"])
                h, act = nl(h, attn, w["n2"], EPS, w["gu"], True)
                pending = lin(act, w["down"])
            return nl(h, pending, nf, EPS, head)[1]

        return run

    x = rand(1, H, seed=7)
    outs = [chain(k)(x) for k in (True, False)]
    err = mx.abs(outs[0].astype(mx.float32) - outs[1]).max().item()
    print(
        f"22 layers' projections + lm_head: max |kernels - ops| {err:.3g} (logit scale {mx.abs(outs[1]).max().item():.3g})"
    )
    for rnd in range(3):
        t = {k: kc.chained_ms(chain(k == "kernels"), x, 1, rounds=20) for k in ("kernels", "ops")}
        print(
            f"  round {rnd}: chain ms kernels {t['kernels']:.3f}  ops {t['ops']:.3f}  ops/kernels {t['ops'] / t['kernels']:.2f}x",
            flush=True,
        )
    # single projections, each in a compiled chain of 22 distinct weights (o: square)
    for name, fk, fo in [
        ("o 2048x2048 row", lambda a, w: linear_row(a, w), lambda a, w: linear_row_ops(a, w)),
        (
            "qkv norm (resid) 2048->2560",
            lambda a, w: norm_linear(a, a, layers[0]["n1"], EPS, w)[1][:, :H],
            lambda a, w: norm_linear_ops(a, a, layers[0]["n1"], EPS, w)[1][:, :H],
        ),
    ]:
        key = "o" if name.startswith("o") else "qkv"

        def mk(f):
            def run(a):
                for w in layers:
                    a = f(a, w[key])
                return a

            return run

        t = {
            k: kc.chained_ms(mk(f), x, 1, rounds=20) / L * 1e3
            for k, f in (("kernel", fk), ("ops", fo))
        }
        print(f"  {name}: us a call kernel {t['kernel']:.1f}  ops {t['ops']:.1f}", flush=True)

if "sweep" in PART:
    # Each projection chained through the residual stream it feeds: a = h + 1e-3 * y[:, :H],
    # 22 distinct weights (8 for lm_head), kernel shapes (warps a group, loads a batch)
    # against MLX's ops; us a call, GPU-bound for all but the smallest.
    nlmod = sys.modules["conform_mlx.impl.kernels.norm_linear"]
    N = {
        "qkv": (QKV, False, 22),
        "gate_up": (2 * F, True, 22),
        "lm_head": (V, False, 8),
        "o": (H, None, 22),
    }
    ws = {
        k: [rand(n, H, scale=H**-0.5, seed=100 * j + i) for i in range(c)]
        for j, (k, (n, g, c)) in enumerate(N.items())
    }
    nw, r = 1 + 0.1 * rand(H, seed=5), 0.01 * rand(1, H, seed=6)
    mx.eval(ws, nw, r)
    x = rand(1, H, seed=7)

    def chain(kind, kern):
        n, gated, _ = N[kind]

        def run(a):
            for w in ws[kind]:
                if gated is None:
                    y = (linear_row if kern else linear_row_ops)(a, w)
                    a = a + 1e-3 * y
                else:
                    h, y = (norm_linear if kern else norm_linear_ops)(a, r, nw, EPS, w, gated)
                    a = h + 1e-3 * y[:, :H]
            return a

        return run

    for kind, (n, g, c) in N.items():
        ops = kc.chained_ms(chain(kind, False), x, 1, rounds=20) / c * 1e3
        res = []
        for nwp, un in [(8, 8), (4, 8), (4, 4), (8, 4), (2, 8)]:
            nlmod.N_WARPS, nlmod.UNROLL = nwp, un
            t = kc.chained_ms(chain(kind, True), x, 1, rounds=20) / c * 1e3
            res.append(f"{nwp}w{un}u {t:.1f}")
        nlmod.N_WARPS, nlmod.UNROLL = 8, 8
        mb = n * H * 2 / 1e6
        print(f"  {kind:8s} {mb:6.1f} MB: ops {ops:.1f} us | " + "  ".join(res), flush=True)

if "step" in PART:
    from conform_bench import common
    from conform_mlx.engines import resolve

    V = {"ops": (False, False), "fused": (True, False), "rows": (True, True)}
    path = common.checkpoint("tinyllama")
    eng = {}
    for n, (a, b) in V.items():
        USE_NORM_LINEAR[BACKEND], USE_LINEAR_ROW[BACKEND] = a, b
        eng[n] = resolve("impl-compiled").load(path, "float16")
    lm = resolve("mlx-lm").load(path, "float16")

    def using(name, step):
        def run():
            USE_NORM_LINEAR[BACKEND], USE_LINEAR_ROW[BACKEND] = V[name]
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
                f"  {n:5s} / mlx-lm {q1[0]:.3f} {q1[1]:.3f} {q1[2]:.3f}   / ops {qb[0]:.3f} {qb[1]:.3f} {qb[2]:.3f}",
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
        USE_NORM_LINEAR[BACKEND], USE_LINEAR_ROW[BACKEND] = V[n]
        e = eng[n]
        c = common.new_cache(e, 600)
        c.add_sequence(0)
        e.fill(c, 0, 511)
        out = np.asarray(e.decode_batch(c, [0], [5]), dtype=np.float32)
        ref = out if ref is None else ref
        print(
            f"logits {n} max |diff| to ops {np.abs(out - ref).max():.4g}, argmax {out.argmax()} vs {ref.argmax()}",
            flush=True,
        )
