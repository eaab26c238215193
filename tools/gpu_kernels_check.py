"""Check and time the paged decode kernel on a GPU machine (MLX's CUDA or Metal backend).

    python tools/gpu_kernels_check.py [--skip-tests] [--calls 20] [--json PATH]

1. Runs ``pytest suites/test_kernels.py`` with the custom kernels active (the run
   fails if MLX has no GPU backend: skipped kernel cases would prove nothing).
2. Times ``paged_decode_attention`` (the kernel) against ``paged_attention_ops``
   (the ops twin) on TinyLlama's attention shape (32 q heads, 4 KV heads, head_dim
   64, float16, block size 16) for batch 1/8/32 and contexts 16/512/2048, and
   prints a table. A decode step issues one attention call per layer before it
   syncs, so ``--calls`` calls are issued back to back and evaluated together; the
   time per call is the median over 5 such rounds, after warm-up calls that also
   compile the kernels. It includes MLX's per-call overhead, on both sides.

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCHES = [1, 8, 32]
CONTEXTS = [16, 512, 2048]
N_HEADS, N_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 4, 64, 16  # TinyLlama-1.1B attention


def run_tests() -> int:
    cmd = [sys.executable, "-m", "pytest", "suites/test_kernels.py", "-q", "-ra"]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def inputs(batch: int, context: int, seed: int = 0) -> tuple:
    """Random decode inputs: every sequence at ``context`` tokens, tables shuffled."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(seed)
    per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * per_seq
    tables = rng.permutation(num_blocks).astype(np.int32).reshape(batch, per_seq)
    shape = (num_blocks, BLOCK_SIZE, N_KV_HEADS, HEAD_DIM)
    k_pool = mx.random.normal(shape, key=mx.random.key(seed)).astype(mx.float16)
    v_pool = mx.random.normal(shape, key=mx.random.key(seed + 1)).astype(mx.float16)
    q = mx.random.normal((batch, N_HEADS, 1, HEAD_DIM), key=mx.random.key(seed + 2))
    ctx = mx.full((batch,), context, dtype=mx.int32)
    args = (q.astype(mx.float16), k_pool, v_pool, mx.array(tables), ctx)
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


def time_all(calls: int) -> list[dict]:
    import mlx.core as mx

    from kernels.paged_attention import (
        num_partitions,
        paged_attention_ops,
        paged_decode_attention,
    )

    scale = HEAD_DIM**-0.5
    rows = []
    for batch in BATCHES:
        for context in CONTEXTS:
            q, k_pool, v_pool, tables, ctx = inputs(batch, context)
            positions = (ctx - 1)[:, None]

            def kernel(q=q, k_pool=k_pool, v_pool=v_pool, tables=tables, ctx=ctx):
                return paged_decode_attention(q, k_pool, v_pool, tables, ctx, scale)

            def ops(q=q, k_pool=k_pool, v_pool=v_pool, tables=tables, ctx=ctx, pos=positions):
                return paged_attention_ops(q, k_pool, v_pool, tables, ctx, pos, scale)

            err = mx.abs(kernel().astype(mx.float32) - ops().astype(mx.float32)).max().item()
            kv_bytes = 2 * batch * context * N_KV_HEADS * HEAD_DIM * 2
            t_kernel, t_ops = per_call_ms(kernel, calls), per_call_ms(ops, calls)
            rows.append(
                {
                    "batch": batch,
                    "context": context,
                    "partitions": num_partitions(batch, N_KV_HEADS, tables.shape[1], BLOCK_SIZE),
                    "kernel_ms": t_kernel,
                    "ops_ms": t_ops,
                    "speedup": t_ops / t_kernel,
                    "kernel_GBps": kv_bytes / t_kernel / 1e6,
                    "max_abs_diff": err,
                }
            )
            print(".", end="", flush=True)
    print()
    return rows


def print_table(rows: list[dict], device: str) -> None:
    print(f"\npaged decode attention, {device}: 32 q / 4 kv heads, head_dim 64, fp16, bs 16")
    print("batch  context  parts  kernel ms  ops ms  speedup  kernel GB/s  max|diff|")
    for r in rows:
        print(
            f"{r['batch']:>5}  {r['context']:>7}  {r['partitions']:>5}  {r['kernel_ms']:>9.3f}"
            f"  {r['ops_ms']:>6.3f}  {r['speedup']:>6.1f}x  {r['kernel_GBps']:>11.1f}"
            f"  {r['max_abs_diff']:>9.1e}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-tests", action="store_true", help="only time")
    parser.add_argument("--calls", type=int, default=20, help="calls per timed round")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import mlx.core as mx

    from kernels.backend import active_backend

    backend = active_backend()
    if backend == "cpu":
        print("MLX has no GPU backend here (install mlx[cuda] on an NVIDIA machine)")
        return 1
    device = f"{backend}: {mx.default_device()}"
    print("backend:", device, "| mlx", mx.__version__, flush=True)
    status = 0 if args.skip_tests else run_tests()
    rows = time_all(args.calls)
    print_table(rows, device)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    print("\ntests:", "skipped" if args.skip_tests else ("passed" if status == 0 else "FAILED"))
    return 0 if status == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
