"""A/B inside one process (rope-qkv branch): the cache-write policy's upper bounds.
Each variant is its own compiled impl engine traced under its patch; all timed
interleaved with mlx-lm (tools/gpu_bench.py's steps). Timing only: 'onewrite' and
'nowrite' skip writes, so their outputs are wrong by design."""

import contextlib
import os
import sys

from conform_mlx import blas

blas.load()
import mlx.core as mx

sys.path.insert(0, "tools")
import gpu_bench as gb

from conform_bench import common
from conform_mlx.engines import resolve
from conform_mlx.impl import kernels

ROPE = sys.modules["conform_mlx.impl.kernels.rope"]
ATT = sys.modules["conform_mlx.impl.kernels.paged_attention"]
REAL = kernels.rope_and_cache_write


def onewrite(qkv, tokens, step, k_pool, v_pool):
    q, k, v = ROPE.rope_qkv(qkv, tokens, *k_pool.shape[2:], step.cos, step.sin)
    return q, k, v, ROPE.write_rows(k_pool, k, step), v_pool


def nowrite(qkv, tokens, step, k_pool, v_pool):
    q, k, v = ROPE.rope_qkv(qkv, tokens, *k_pool.shape[2:], step.cos, step.sin)
    return q, k, v, k_pool, v_pool


VARIANTS = {
    "base": {},
    "onewrite": {"rw": onewrite},
    "nowrite": {"rw": nowrite},
    "nosplit": {"nosplit": True},
}


@contextlib.contextmanager
def patched(p):
    old = ATT.MIN_PARTITION_TOKENS
    kernels.rope_and_cache_write = p.get("rw", REAL)
    if p.get("nosplit"):
        ATT.MIN_PARTITION_TOKENS = 10**9
    try:
        yield
    finally:
        ATT.MIN_PARTITION_TOKENS = old
        kernels.rope_and_cache_write = REAL


def wrap(fn, p):
    def step():
        with patched(p):
            fn()

    return step


REPS = int(os.environ.get("REPS", "40"))
path = common.checkpoint("tinyllama")
names = list(VARIANTS) + ["mlx-lm"]
engines = {n: resolve("impl-compiled").load(path, "float16") for n in VARIANTS}
engines["mlx-lm"] = resolve("mlx-lm").load(path, "float16")
vocab = common.vocab_size("tinyllama")


def steps(make):
    return [wrap(make(engines[n]), VARIANTS.get(n, {})) for n in names]


print("variants", names, "device", mx.default_device(), flush=True)
rows = []
for c in (16, 512, 2048):
    ms = gb.interleaved_ms(steps(lambda e: gb.decode_step(e, [c])), reps=REPS)
    rows.append((f"decode b=1 ctx={c} ms", ms))
    print(rows[-1], flush=True)
ms = gb.interleaved_ms(
    steps(lambda e: gb.generate_step(e, vocab)), warmup=1, reps=max(1, REPS // 8)
)
rows.append(("generate 256 tokens/s", [256 / (m / 1e3) for m in ms]))
print(rows[-1], flush=True)
print(
    f"\n{'point':28s}"
    + "".join(f"{n:>11s}" for n in names)
    + "".join(f"{n + '/lm':>14s}" for n in names[:-1])
)
for point, vs in rows:
    print(
        f"{point:28s}"
        + "".join(f"{v:11.3f}" for v in vs)
        + "".join(f"{v / vs[-1]:14.3f}" for v in vs[:-1])
    )
for n in names:
    with patched(VARIANTS.get(n, {})):
        a = gb.step_anatomy(gb.decode_step(engines[n], [512]))
    print(
        f"anatomy {n:10s} launches {a['launches']:4d} wall {a['wall_ms']:.3f} python {a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}"
    )
