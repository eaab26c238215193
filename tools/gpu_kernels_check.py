"""Check and time the paged decode kernel on a GPU machine (MLX's CUDA or Metal backend).

    python tools/gpu_kernels_check.py [--skip-tests] [--calls 20] [--json PATH]
    python tools/gpu_kernels_check.py --only-rows            # the row kernels alone
    python tools/gpu_kernels_check.py --decode-at llama3-8b --contexts 512 4096 32768
    python tools/gpu_kernels_check.py --pool-io llama2-7b --contexts 1000 3584 8192

1. Runs ``pytest suites/test_kernels.py`` with the custom kernels active (the run
   fails if MLX has no GPU backend: skipped kernel cases would prove nothing).
2. Times each custom kernel beside what it replaces, on TinyLlama's shapes (32 q
   heads, 4 KV heads, head_dim 64, hidden 2048, float16, block size 16):
   ``paged_decode_attention`` at the launch shape its policy picks and at a sweep
   of (warps, partitions), against ``paged_attention_ops`` (the ops twin) and MLX's
   attention over a contiguous cache (mlx-lm's path), at batch 1 and 32 and
   several contexts, with block tables padded to the width bucket a compiled step
   is traced for (``impl.engine.bucket_width``), as the model runs them;
   ``paged_prefill_attention`` against the ops twin for chunks of 7 to 512 tokens
   after a cached prefix; ``add_rms_norm_kernel`` against MLX's add then rms_norm
   at 1 to 512 rows. A decode step issues one call per layer before it syncs, so
   ``--calls`` calls are issued back to back and evaluated together; the time per
   call is the median over 5 such rounds, after warm-up calls that also compile the
   kernels. It includes MLX's per-call overhead, on both sides.

Exit status: 0 when the tests pass, 1 otherwise (timings are reported either way).
Import-safe: nothing runs until ``main``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (batch, context) points: batch-1 decode and a full batch.
POINTS = [(1, 16), (1, 512), (1, 2048), (8, 512), (32, 512), (32, 2048)]
N_HEADS, N_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 4, 64, 16  # TinyLlama-1.1B attention


@dataclass(frozen=True)
class Heads:
    """The attention heads the decode and prefill kernels are timed at (``--heads``)."""

    n_heads: int = N_HEADS
    n_kv: int = N_KV_HEADS
    head_dim: int = HEAD_DIM


# Llama-3-8B's heads (GQA 32:8, head_dim 128) and Llama-2-7B's (MHA 32, 128).
HEADS = {"tinyllama": Heads(), "llama3-8b": Heads(32, 8, 128), "llama2-7b": Heads(32, 32, 128)}
# (batch, chunk, cached prefix) points of the prefill kernel: small chunks to long ones.
PREFILL_POINTS = [
    (1, 7, 1000),
    (1, 64, 1000),
    (8, 16, 2000),
    (4, 64, 500),
    (1, 128, 1000),
    (1, 256, 1000),
    (8, 64, 1000),
    (1, 512, 1000),
]
HIDDEN = 2048  # TinyLlama-1.1B's residual width
NORM_ROWS = [1, 8, 32, 512]
ROPE_TOKENS = [1, 32]  # decode batch 1 and 32


def run_tests() -> int:
    cmd = [sys.executable, "-m", "pytest", "suites/test_kernels.py", "-q", "-ra"]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def inputs(
    batch: int, context: int, seed: int = 0, padded: bool = False, heads: Heads = Heads()
) -> tuple:
    """Random decode inputs (q, kv_pool, tables, context_lens): every sequence at
    ``context`` tokens, tables shuffled, K and V in one pool. ``padded`` widens the
    tables to the width bucket a compiled step is traced for, as in a model step."""
    import mlx.core as mx
    import numpy as np

    from conform_mlx.impl.engine import pad_block_tables

    rng = np.random.default_rng(seed)
    per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * per_seq
    tables = rng.permutation(num_blocks).astype(np.int32).reshape(batch, per_seq)
    shape = (num_blocks, BLOCK_SIZE, heads.n_kv, heads.head_dim)
    k_pool = mx.random.normal(shape, key=mx.random.key(seed)).astype(mx.float16)
    v_pool = mx.random.normal(shape, key=mx.random.key(seed + 1)).astype(mx.float16)
    kv_pool = mx.stack([k_pool, v_pool], axis=2)  # (num_blocks, BLOCK_SIZE, 2, n_kv, D)
    q = mx.random.normal((batch, heads.n_heads, 1, heads.head_dim), key=mx.random.key(seed + 2))
    ctx = mx.full((batch,), context, dtype=mx.int32)
    tables = pad_block_tables(mx.array(tables)) if padded else mx.array(tables)
    args = (q.astype(mx.float16), kv_pool, tables, ctx)
    mx.eval(*args)
    return args


def per_call_ms(fn, calls: int, rounds: int = 5, warmup: int = 3) -> float:
    import mlx.core as mx

    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        mx.eval([fn() for _ in range(calls)])
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def chained_ms(step, x0, calls: int, rounds: int = 5, warmup: int = 3) -> float:
    """Per-call ms of ``calls`` calls of ``step`` chained (each output is the next
    input) inside one ``mx.compile``d function: what a call costs inside a compiled
    model step, MLX's encoding included and Python's graph building left out."""
    import mlx.core as mx

    def chain(x):
        for _ in range(calls):
            x = step(x)
        return x

    run = mx.compile(chain)
    for _ in range(warmup):
        mx.eval(run(x0))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        mx.eval(run(x0))
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def sweep(batch: int, context: int, n_blocks: int, heads: Heads = Heads()) -> list[tuple[int, int]]:
    """(warps, partitions) launch shapes tried at one point, the policy's among them:
    every split that leaves each warp at least half a 32-token chunk, within the warps the
    heads' registers allow (``max_warps``)."""
    from conform_mlx.impl.kernels.paged_attention import max_warps

    tried = {plan(batch, n_blocks, heads)}
    top = max_warps(heads.n_heads // heads.n_kv, heads.head_dim)
    for warps in (w for w in (1, 2, 4, 8, 16) if w <= top):
        for parts in (1, 2, 4, 8, 16, 32, 64):
            if parts <= n_blocks and parts * warps * 32 <= max(32, 2 * context):
                tried.add((warps, parts))
    return sorted(tried)


def plan(batch: int, n_blocks: int, heads: Heads = Heads()) -> tuple[int, int]:
    """The launch policy's (warps, partitions) at these heads."""
    from conform_mlx.impl.kernels.paged_attention import launch_plan

    h = heads
    return launch_plan(batch, h.n_kv, n_blocks, BLOCK_SIZE, h.n_heads // h.n_kv, h.head_dim)


def time_decode(calls: int, points=POINTS, heads: Heads = Heads()) -> list[dict]:
    """The decode kernel at each point: the policy's launch shape, the best of a sweep
    of (warps, partitions), the ops twin, and MLX's attention over a contiguous cache
    (what mlx-lm runs: no block table, no gather)."""
    rows = []
    for batch, context in points:
        rows.append(time_point(batch, context, calls, heads))
        print(".", end="", flush=True)
    print()
    return rows


def time_point(batch: int, context: int, calls: int, heads: Heads) -> dict:
    """One row of ``time_decode``."""
    import mlx.core as mx

    from conform_mlx.impl.kernels.paged_attention import paged_attention_ops, paged_decode_attention

    scale = heads.head_dim**-0.5
    q, kv_pool, tables, ctx = inputs(batch, context, padded=True, heads=heads)
    positions = (ctx - 1)[:, None]
    n_blocks = tables.shape[1]
    # The same keys and values laid out contiguously, (B, n_kv, L, D).
    k_contig, v_contig = (
        p[tables]
        .reshape(batch, -1, heads.n_kv, heads.head_dim)
        .transpose(0, 2, 1, 3)[:, :, :context]
        for p in (kv_pool[:, :, 0], kv_pool[:, :, 1])
    )
    mx.eval(k_contig, v_contig)

    def ops():
        return paged_attention_ops(q, kv_pool, tables, ctx, positions, scale)

    def contiguous():
        return mx.fast.scaled_dot_product_attention(q, k_contig, v_contig, scale=scale)

    want = ops().astype(mx.float32)
    # Each launch shape timed inside a compiled chain: on the GPU's time when that
    # is the larger, as in a model step (eager calls time mostly the host).
    shapes = {}
    for warps, parts in sweep(batch, context, n_blocks, heads):

        def kernel(x, w=warps, p=parts):
            return paged_decode_attention(x, kv_pool, tables, ctx, scale, p, w)

        err = mx.abs(kernel(q).astype(mx.float32) - want).max().item()
        shapes[f"{warps}w{parts}p"] = {"ms": chained_ms(kernel, q, calls), "max_abs_diff": err}
    policy = "{}w{}p".format(*plan(batch, n_blocks, heads))
    compiled = {
        "kernel": shapes[policy]["ms"],
        "ops": chained_ms(
            lambda x: paged_attention_ops(x, kv_pool, tables, ctx, positions, scale),
            q,
            calls,
        ),
        "contiguous": chained_ms(
            lambda x: mx.fast.scaled_dot_product_attention(x, k_contig, v_contig, scale=scale),
            q,
            calls,
        ),
    }
    best = min(shapes, key=lambda k: shapes[k]["ms"])
    kv_bytes = 2 * batch * context * heads.n_kv * heads.head_dim * 2

    def eager_kernel():
        parts_warps = plan(batch, n_blocks, heads)[::-1]
        return paged_decode_attention(q, kv_pool, tables, ctx, scale, *parts_warps)

    kernel_ms = per_call_ms(eager_kernel, calls)
    return {
        "batch": batch,
        "context": context,
        "policy": policy,
        "kernel_ms": kernel_ms,
        "best": best,
        "best_ms": shapes[best]["ms"],
        "ops_ms": per_call_ms(ops, calls),
        "contiguous_sdpa_ms": per_call_ms(contiguous, calls),
        "compiled_ms": compiled,
        "kernel_GBps": kv_bytes / compiled["kernel"] / 1e6,
        "max_abs_diff": shapes[policy]["max_abs_diff"],
        "shapes": shapes,
    }


def time_pool_io(calls: int, contexts: list[int], heads: Heads, chunk: int = 512) -> list[dict]:
    """The KV pool traffic of a ``chunk``-token step after each context: its cache write
    (``write_rows``) and the gather of its context (``gathered_attention``'s), impl's way
    (rows as 4-byte words) against element by element (the way before: MLX's gather and
    scatter run a thread an element)."""
    return [pool_io_point(calls, context, chunk, heads) for context in contexts]


def pool_io_point(calls: int, context: int, chunk: int, heads: Heads) -> dict:
    import mlx.core as mx

    from conform_mlx.impl.kernels.rope import RopeStep, as_words, write_rows

    total = context + chunk
    row = (2, heads.n_kv, heads.head_dim)
    pool = mx.random.normal((total // BLOCK_SIZE + 2, BLOCK_SIZE, *row)).astype(mx.float16)
    new = mx.random.normal((chunk, *row)).astype(mx.float16)
    slots = mx.arange(context, total, dtype=mx.int32)
    step = RopeStep(None, None, slots // BLOCK_SIZE, slots % BLOCK_SIZE, BLOCK_SIZE)
    seen = mx.arange(total, dtype=mx.int32)[None]  # the chunk's context, in order
    flat = pool.reshape(-1, *row)
    mx.eval(pool, new, step.blocks, step.offsets, seen)

    def write_elements(p: mx.array) -> mx.array:
        p[step.blocks, step.offsets] = new
        return p

    def write_words(p: mx.array) -> mx.array:
        return write_rows(p, new, step)

    def gather_elements() -> mx.array:
        return flat[seen]

    def gather_words() -> mx.array:
        return as_words(flat)[seen].view(flat.dtype)

    same = mx.array_equal(write_elements(pool), write_words(pool)) & mx.array_equal(
        gather_elements(), gather_words()
    )
    return {
        "context": context,
        "chunk": chunk,
        "gather_mb": total * math.prod(row) * 2 / 1e6,
        "write_ms": {
            "elements": chained_ms(write_elements, pool, calls),
            "words": chained_ms(write_words, pool, calls),
        },
        "gather_ms": {
            "elements": per_call_ms(gather_elements, calls),
            "words": per_call_ms(gather_words, calls),
        },
        "bitwise_same": bool(same.item()),
    }


def print_pool_io(rows: list[dict], device: str, heads: Heads) -> None:
    print(
        f"\nKV pool traffic, {device}: {heads.n_kv} KV heads, head_dim {heads.head_dim}, fp16, "
        f"bs {BLOCK_SIZE}; ms a call, element by element vs as words"
    )
    print(
        "context  chunk  write: elements   words  ratio  gather MB  elements   words  ratio  same"
    )
    for r in rows:
        w, g = r["write_ms"], r["gather_ms"]
        print(
            f"{r['context']:>7}  {r['chunk']:>5}  {w['elements']:>15.4f}  {w['words']:>6.4f}"
            f"  {w['elements'] / w['words']:>4.2f}x  {r['gather_mb']:>9.1f}  {g['elements']:>8.4f}"
            f"  {g['words']:>6.4f}  {g['elements'] / g['words']:>4.2f}x  {r['bitwise_same']}"
        )


def time_prefill(calls: int) -> list[dict]:
    """The paged prefill kernel against the ops twin and the gathered path (MLX's fused
    attention over the gathered rows), a chunk of new tokens after a cached prefix per
    sequence."""
    import mlx.core as mx

    from conform_mlx.impl.kernels.paged_attention import (
        context_rows,
        gathered_attention,
        paged_attention_ops,
        uses_prefill_kernel,
    )
    from conform_mlx.impl.kernels.paged_prefill import paged_prefill_attention

    def point(batch: int, chunk: int, prefix: int) -> dict:
        _, kv_pool, tables, ctx = inputs(batch, prefix + chunk)
        key = mx.random.key(chunk)
        q = mx.random.normal((batch, N_HEADS, chunk, HEAD_DIM), key=key).astype(mx.float16)
        positions = (
            prefix + mx.arange(chunk, dtype=mx.int32)[None, :] + mx.zeros((batch, 1), mx.int32)
        )
        args = (q, kv_pool, tables, ctx, positions, HEAD_DIM**-0.5)
        # Built once a step by the model, so outside the timed call.
        rows = context_rows(tables, ctx, positions, kv_pool.shape[1], q.dtype)
        mx.eval(q, positions, rows.slots, rows.mask)
        err = mx.abs(paged_prefill_attention(*args) - paged_attention_ops(*args)).max().item()
        gathered = lambda: gathered_attention(q, kv_pool, rows, HEAD_DIM**-0.5)  # noqa: E731
        err_g = mx.abs(gathered() - paged_attention_ops(*args)).max().item()
        return {
            "batch": batch,
            "chunk": chunk,
            "prefix": prefix,
            "dispatched_to_kernel": uses_prefill_kernel(q, kv_pool),
            "kernel_ms": per_call_ms(lambda: paged_prefill_attention(*args), calls),
            "ops_ms": per_call_ms(lambda: paged_attention_ops(*args), calls),
            "gathered_ms": per_call_ms(gathered, calls),
            "max_abs_diff": max(err, err_g),
        }

    return [point(*p) for p in PREFILL_POINTS]


def time_rope(calls: int) -> list[dict]:
    """The RoPE kernel (q | k | v rows in; rotated q, and the pool rows of rotated k
    and v out) against its ops twin (the split into views, the rotation, then the
    stack into pool rows), batch 1 and 32."""
    import mlx.core as mx

    from conform_mlx.impl.kernels.rope import apply_rope, rope_cos_sin, rope_qkv, split_qkv

    def point(tokens: int) -> dict:
        key = mx.random.key(tokens)
        width = (N_HEADS + 2 * N_KV_HEADS) * HEAD_DIM
        qkv = mx.random.normal((tokens, width), key=key).astype(mx.float16)
        positions = mx.arange(tokens, dtype=mx.int32)[:, None] + 500
        cos, sin = rope_cos_sin(positions, mx.array(1e4 ** (-mx.arange(0, 1, 2 / HEAD_DIM))))
        mx.eval(qkv, cos, sin)

        def kernel(x):
            return rope_qkv(x, (tokens, 1), N_KV_HEADS, HEAD_DIM, cos, sin)

        def ops(x):
            q, k, v = split_qkv(x, (tokens, 1), N_KV_HEADS, HEAD_DIM)
            kv = mx.stack([apply_rope(k, cos, sin), v], axis=2)
            return apply_rope(q, cos, sin), kv.reshape(tokens, 2, N_KV_HEADS, HEAD_DIM)

        err = max(
            mx.abs(a.astype(mx.float32) - b).max().item() for a, b in zip(kernel(qkv), ops(qkv))
        )

        def chained(fn):
            # The chain carries the rows; both outputs are part of every call.
            return lambda x: x + sum(o.sum() for o in fn(x))

        return {
            "tokens": tokens,
            "kernel_ms": per_call_ms(lambda: kernel(qkv), calls),
            "ops_ms": per_call_ms(lambda: ops(qkv), calls),
            "compiled_ms": {
                "kernel": chained_ms(chained(kernel), qkv, calls),
                "ops": chained_ms(chained(ops), qkv, calls),
            },
            "max_abs_diff": err,
        }

    return [point(n) for n in ROPE_TOKENS]


def time_norm(calls: int) -> list[dict]:
    """The fused add + RMSNorm kernel against MLX's add then rms_norm (what it replaces)."""
    import mlx.core as mx

    from conform_mlx.impl.kernels.add_rms_norm import add_rms_norm_kernel, add_rms_norm_ops

    def point(n_rows: int) -> dict:
        key = mx.random.key(n_rows)
        x, r = mx.random.normal((2, n_rows, HIDDEN), key=key).astype(mx.float16)
        w = mx.ones((HIDDEN,), dtype=mx.float16)
        mx.eval(x, r, w)
        got, want = add_rms_norm_kernel(x, r, w, 1e-5), add_rms_norm_ops(x, r, w, 1e-5)
        err = max(mx.abs(a.astype(mx.float32) - b).max().item() for a, b in zip(got, want))
        kernel_ms = per_call_ms(lambda: add_rms_norm_kernel(x, r, w, 1e-5), calls)
        ops_ms = per_call_ms(lambda: add_rms_norm_ops(x, r, w, 1e-5), calls)
        compiled = {
            "kernel": chained_ms(lambda a: add_rms_norm_kernel(a, r, w, 1e-5)[1], x, calls),
            "ops": chained_ms(lambda a: add_rms_norm_ops(a, r, w, 1e-5)[1], x, calls),
        }
        return {
            "rows": n_rows,
            "kernel_ms": kernel_ms,
            "ops_ms": ops_ms,
            "compiled_ms": compiled,
            "max_abs_diff": err,
        }

    return [point(n) for n in NORM_ROWS]


# One row through TinyLlama's projections (impl.kernels.norm_linear): (name, rows of the
# weight, its input width, fused add + norm, gated); o and down take the plain row kernel.
ROW_PROJECTIONS = [
    ("qkv", 2560, HIDDEN, True, False),
    ("gate_up", 2 * 5632, HIDDEN, True, True),
    ("o", HIDDEN, HIDDEN, False, False),
    ("down", HIDDEN, 5632, False, False),
    ("lm_head", 32000, HIDDEN, True, False),
]
ROW_WEIGHTS = ["float16", "4bit-g64", "8bit-g64"]  # mlx-lm's default group size
ROW_BYTES = 256 << 20  # weight bytes a timed round reads, spread over copies


def time_rows(calls: int) -> list[dict]:
    """The row kernels against their ops twins (MLX's add, rms_norm, then matmul or
    quantized_matmul), per projection and weight kind, float16 activations: ``calls``
    calls on one input in one compiled function, evaluated together (device time and
    MLX's encoding; no Python)."""
    rows = []
    for kind in ROW_WEIGHTS:
        rows += [row_point(kind, *projection, calls) for projection in ROW_PROJECTIONS]
        print(".", end="", flush=True)
    print()
    return rows


def row_point(kind: str, name: str, n: int, k: int, fused: bool, gated: bool, calls: int) -> dict:
    """One row of ``time_rows``."""
    import mlx.core as mx

    from conform_mlx.impl.kernels.norm_linear import (
        Quantized,
        linear_row,
        linear_row_ops,
        norm_linear,
        norm_linear_ops,
    )

    w = (mx.random.normal((n, k), key=mx.random.key(n + k)) / k**0.5).astype(mx.float16)
    x, r = mx.random.normal((2, 1, k), key=mx.random.key(1)).astype(mx.float16)
    nw = mx.ones((k,), dtype=mx.float16)
    if kind != "float16":
        bits, group = int(kind[0]), int(kind.split("-g")[1])
        words, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        w = Quantized(words, scales.astype(mx.float16), biases.astype(mx.float16), group, bits)
    mx.eval(x, r, nw, w.words if kind != "float16" else w)

    def copy(v):
        if isinstance(v, Quantized):
            return Quantized(v.words + 0, v.scales + 0, v.biases + 0, v.group_size, v.bits)
        return v + 0

    # Copies of the weight, call i reading copy i % len: more bytes than the L2 cache holds
    # (50 MB on an H100), so each call reads its weight from memory, as in a model step.
    nbytes = sum(a.nbytes for a in ([w] if kind == "float16" else [w.words, w.scales, w.biases]))
    copies = [w] + [copy(w) for _ in range(-(-ROW_BYTES // nbytes) - 1)]
    mx.eval([c if kind == "float16" else [c.words, c.scales, c.biases] for c in copies])
    calls = max(calls, len(copies))  # every copy read once a round

    def many(fn):
        run = mx.compile(lambda a: [fn(a, copies[i % len(copies)]) for i in range(calls)])
        return lambda: run(x)

    if fused:
        kernel = many(lambda a, v: norm_linear(a, r, nw, 1e-5, v, gated)[1])
        ops = many(lambda a, v: norm_linear_ops(a, r, nw, 1e-5, v, gated)[1])
    else:
        kernel, ops = many(linear_row), many(linear_row_ops)
    got, want = kernel()[0].astype(mx.float32), ops()[0].astype(mx.float32)
    return {
        "weight": kind,
        "projection": name,
        "shape": [n, k],
        "kernel_ms": per_call_ms(kernel, 1) / calls,
        "ops_ms": per_call_ms(ops, 1) / calls,
        "max_abs_diff": mx.abs(got - want).max().item(),
    }


def print_rows(rows: list[dict], device: str) -> None:
    print(f"\none row through a projection, {device}: fp16 activations, ms a call, compiled")
    print("(ops: MLX's add + rms_norm + matmul / quantized_matmul; fused rows add and normalize)")
    print("weight     projection  shape        kernel ms  ops ms  ops/kernel  max|diff|")
    for r in rows:
        print(
            f"{r['weight']:<10} {r['projection']:<11} {'x'.join(map(str, r['shape'])):<12}"
            f" {r['kernel_ms']:>9.4f}  {r['ops_ms']:>6.4f}  {r['ops_ms'] / r['kernel_ms']:>9.2f}x"
            f"  {r['max_abs_diff']:>9.1e}"
        )


def print_decode(decode: list[dict], device: str, heads: Heads = Heads()) -> None:
    h = heads
    print(
        f"\npaged decode attention, {device}: {h.n_heads} q / {h.n_kv} kv heads, head_dim "
        f"{h.head_dim}, fp16, bs {BLOCK_SIZE}"
    )
    print("(policy/best: warps per group, context partitions; contiguous: MLX SDPA, no paging;")
    print(" compiled: ms a call in a compiled chain of calls; best: of the sweep, compiled)")
    print(
        "batch  context  policy  kernel ms  best      ms  ops ms  contiguous ms"
        "  compiled: kernel     ops  contig  max|diff|"
    )
    for r in decode:
        c = r["compiled_ms"]
        print(
            f"{r['batch']:>5}  {r['context']:>7}  {r['policy']:>6}  {r['kernel_ms']:>9.4f}"
            f"  {r['best']:>6}  {r['best_ms']:.4f}  {r['ops_ms']:>6.3f}"
            f"  {r['contiguous_sdpa_ms']:>13.4f}  {c['kernel']:>16.4f}  {c['ops']:.4f}"
            f"  {c['contiguous']:.4f}  {r['max_abs_diff']:>9.1e}"
        )


def print_tables(
    decode: list[dict], prefill: list[dict], rope: list[dict], norm: list[dict], device: str
) -> None:
    print_decode(decode, device)
    print(f"\npaged prefill attention, {device}: same heads; a chunk after a cached prefix")
    print(
        "batch  chunk  prefix  kernel ms  ops ms  gathered ms  gathered/kernel  dispatched"
        "  max|diff|"
    )
    for r in prefill:
        print(
            f"{r['batch']:>5}  {r['chunk']:>5}  {r['prefix']:>6}  {r['kernel_ms']:>9.4f}"
            f"  {r['ops_ms']:>6.4f}  {r['gathered_ms']:>11.4f}"
            f"  {r['gathered_ms'] / r['kernel_ms']:>14.2f}x"
            f"  {'kernel' if r['dispatched_to_kernel'] else 'gathered':>10}"
            f"  {r['max_abs_diff']:>9.1e}"
        )
    print_vs_ops(f"RoPE of Q and K, {device}: kernel vs its ops twin", "tokens", rope)
    title = f"add + RMSNorm, {device}: hidden {HIDDEN}, fp16 (ops: MLX add, then rms_norm)"
    print_vs_ops(title, "rows", norm)


def print_vs_ops(title: str, size: str, rows: list[dict]) -> None:
    """A kernel against its ops, eager and compiled, one row per ``r[size]``."""
    print(f"\n{title}")
    print(
        f"{size:>6}  kernel ms  ops ms  ops/kernel  compiled: kernel     ops  ops/kernel  max|diff|"
    )
    for r in rows:
        c = r["compiled_ms"]
        print(
            f"{r[size]:>6}  {r['kernel_ms']:>9.4f}  {r['ops_ms']:>6.4f}"
            f"  {r['ops_ms'] / r['kernel_ms']:>9.2f}x  {c['kernel']:>16.4f}  {c['ops']:.4f}"
            f"  {c['ops'] / c['kernel']:>9.2f}x  {r['max_abs_diff']:>9.1e}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-tests", action="store_true", help="only time")
    parser.add_argument("--calls", type=int, default=20, help="calls per timed round")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--only-rows", action="store_true", help="time the row kernels alone (no grid, no tests)"
    )
    parser.add_argument(
        "--decode-at",
        choices=list(HEADS),
        help="time only the decode kernel, at these heads, batch 1 at --contexts",
    )
    parser.add_argument(
        "--pool-io",
        choices=list(HEADS),
        help="time only the KV pool's write and gather at these heads: 512 after --contexts",
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[512, 4096, 16384, 32768], metavar="N"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import mlx.core as mx

    from conform_mlx.impl.kernels.backend import active_backend

    backend = active_backend()
    if backend == "cpu":
        print("MLX has no GPU backend here (install mlx[cuda] on an NVIDIA machine)")
        return 1
    device = f"{backend}: {mx.default_device()}"
    print("backend:", device, "| mlx", mx.__version__, flush=True)
    if args.decode_at:
        heads = HEADS[args.decode_at]
        decode = time_decode(args.calls, [(1, c) for c in args.contexts], heads)
        print_decode(decode, device, heads)
        if args.json:
            args.json.write_text(json.dumps({"device": device, "decode": decode}, indent=1))
        return 0
    if args.pool_io:
        heads = HEADS[args.pool_io]
        pool_io = time_pool_io(args.calls, args.contexts, heads)
        print_pool_io(pool_io, device, heads)
        if args.json:
            args.json.write_text(json.dumps({"device": device, "pool_io": pool_io}, indent=1))
        return 0 if all(r["bitwise_same"] for r in pool_io) else 1
    if args.only_rows:
        rows = time_rows(args.calls)
        print_rows(rows, device)
        if args.json:
            args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
        return 0
    status = 0 if args.skip_tests else run_tests()
    decode, prefill = time_decode(args.calls), time_prefill(args.calls)
    rope, norm = time_rope(args.calls), time_norm(args.calls)
    rows = time_rows(args.calls)
    print_tables(decode, prefill, rope, norm, device)
    print_rows(rows, device)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": device,
                    "decode": decode,
                    "prefill": prefill,
                    "rope": rope,
                    "norm": norm,
                    "rows": rows,
                },
                indent=1,
            )
        )
    print("\ntests:", "skipped" if args.skip_tests else ("passed" if status == 0 else "FAILED"))
    return 0 if status == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
