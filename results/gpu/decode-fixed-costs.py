"""Where the decode kernel's fixed time goes: main's kernel against variants made by
text edits, in compiled chains; then ncu runs this with NCU=1 on a few launches.
Ran at 6023e76's code with old_source.py beside it = 6023e76's
impl/kernels/paged_decode_source.py (the kernel as it was). Output: decode-kernel-variants.txt,
section 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tools import gpu_bench as gb  # noqa
import mlx.core as mx
import old_source as src
from tools import gpu_kernels_check as kc
from conform_mlx.impl.kernels.backend import make_kernel
import conform_mlx.impl.kernels  # noqa

pa = sys.modules["conform_mlx.impl.kernels.paged_attention"]
B = pa.BACKEND


def build(body_edit=lambda s: s, final_edit=lambda s: s):
    body = body_edit(src._BODY)
    return (
        make_kernel(B, "pda_f", src.INPUTS, ["out"], body + final_edit(src._FINAL)),
        make_kernel(B, "pda_s", src.INPUTS, ["part_acc", "part_ml"], body + src._PARTIAL),
        make_kernel(B, "pda_c", ["part_acc", "part_ml"], ["out"], src._COMBINE),
    )


TRIVIAL = """
  if (tid < 64 && group_y == 0 && group_z == 0) out[tid] = q[tid];
"""
V = {
    "old": build(),
    "noscale": build(lambda s: s.replace("const float sc = scale[0];", "const float sc = 0.125f;")),
    "noctx": build(
        lambda s: s.replace("const int ctx = context_lens[seq];", "const int ctx = CTXC;")
    ),
    "both": build(
        lambda s: s.replace("const float sc = scale[0];", "const float sc = 0.125f;").replace(
            "const int ctx = context_lens[seq];", "const int ctx = CTXC;"
        )
    ),
    "trivial": (make_kernel(B, "pda_t", src.INPUTS, ["out"], TRIVIAL), None, None),
    "qonly": (
        make_kernel(
            B,
            "pda_q",
            src.INPUTS,
            ["out"],
            """
  const size_t h0 = static_cast<size_t>(group_z) * 32 + group_y * 8;
  for (int j = tid; j < 8 * 64; j += 128) out[h0 * 64 + j] = kstore<T>(0.125f * kload(q[h0 * 64 + j]));
""",
        ),
        None,
        None,
    ),
}
NCU = os.environ.get("NCU")
calls = 20 if NCU else 100
for batch, context in [(1, 16), (1, 512)]:
    q, kv_pool, tables, ctx = kc.inputs(batch, context)
    scale = kc.HEAD_DIM**-0.5
    want = pa.paged_attention_ops(q, kv_pool, tables, ctx, (ctx - 1)[:, None], scale).astype(
        mx.float32
    )
    w0, p0 = pa.launch_plan(batch, kc.N_KV_HEADS, tables.shape[1], kc.BLOCK_SIZE)
    out = []
    for name, ks in V.items():
        if ks[1] is None and p0 > 1:
            ks = (ks[0], ks[0], None)
        pa._KERNELS = ks
        if name in ("noctx", "both"):
            # CTXC baked as a template constant: patch kernel_call_args for this run
            orig = pa.kernel_call_args
            pa.kernel_call_args = lambda *a, **k: (
                lambda d: {**d, "template": d["template"] + [("CTXC", context)]}
            )(orig(*a, **k))
        if ks[2] is None and p0 > 1:
            f = lambda x: pa._KERNELS[1](
                inputs=[x, kv_pool, tables, ctx, mx.array([scale], dtype=mx.float32)],
                output_shapes=[x.shape],
                output_dtypes=[x.dtype],
                **pa.kernel_call_args(x, kv_pool, p0, w0),
            )[0]
        else:
            f = lambda x: pa.paged_decode_attention(x, kv_pool, tables, ctx, scale, p0, w0)
        err = mx.abs(f(q).astype(mx.float32) - want).max().item()
        ms = kc.chained_ms(f, q, calls, rounds=2 if NCU else 5, warmup=1 if NCU else 3)
        if name in ("noctx", "both"):
            pa.kernel_call_args = orig
        out.append(f"{name} {ms * 1e3:.1f} ({err:.0e})")
    print(f"b={batch} ctx={context} {w0}w{p0}p: " + "  ".join(out), flush=True)
