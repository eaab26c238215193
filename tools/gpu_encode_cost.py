"""Host time MLX spends encoding one op of each kind, per graph node.

A batch-1 decode step is bound by the host: MLX encodes every kernel on the calling
thread. For each kind, a chain of N ops is built (not timed), then ``mx.async_eval``
(encoding and submission) is timed, then the wait. View ops launch nothing but are
still graph nodes; the two custom kernels differ only in the length of their source
text (MLX's CUDA backend hashes it at every launch).

  python tools/gpu_encode_cost.py
  MLX_MAX_OPS_PER_BUFFER=20 python tools/gpu_encode_cost.py   # smaller CUDA graphs

Needs a GPU backend (the custom kernels are CUDA).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

import mlx.core as mx  # noqa: E402

from conform_mlx.impl.kernels.backend import CUDA_HEADER  # noqa: E402

N = 200  # graph nodes per timed chain
HIDDEN = 2048


def copy_kernel(name: str, padding: str) -> Callable[[mx.array], mx.array]:
    kernel = mx.fast.cuda_kernel(
        name=name,
        input_names=["x"],
        output_names=["y"],
        header=CUDA_HEADER if padding else "",
        source=padding
        + "int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < 2048) y[i] = x[i];",
    )
    return lambda x: kernel(
        inputs=[x],
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
        grid=(HIDDEN, 1, 1),
        threadgroup=(256, 1, 1),
    )[0]


def per_node_us(chain: Callable[[], mx.array], nodes: int, reps: int = 10) -> tuple[float, float]:
    """(encode, encode + wait) in us per node, medians over ``reps`` chains."""
    enc, tot = [], []
    for _ in range(reps + 2):
        out = chain()
        t0 = time.perf_counter()
        mx.async_eval(out)
        t1 = time.perf_counter()
        mx.eval(out)
        t2 = time.perf_counter()
        enc.append((t1 - t0) * 1e6 / nodes)
        tot.append((t2 - t0) * 1e6 / nodes)
    return statistics.median(enc[2:]), statistics.median(tot[2:])


def main() -> int:
    if mx.default_device() == mx.cpu or not mx.cuda.is_available():
        print("needs MLX's CUDA backend", file=sys.stderr)
        return 2
    x0 = mx.random.normal((1, HIDDEN)).astype(mx.float16)
    w = (mx.random.normal((HIDDEN, HIDDEN)) * 0.01).astype(mx.float16)
    norm_w = mx.ones((HIDDEN,), mx.float16)
    pool0 = mx.zeros((256, 16, 4, 64), mx.float16)
    blocks, offsets = mx.array([3], mx.int32), mx.array([5], mx.int32)
    rows = mx.ones((1, 4, 64), mx.float16)
    mx.eval(x0, w, norm_w, pool0, blocks, offsets, rows)
    # (name, op, graph nodes per op)
    ops: list[tuple[str, Callable[[mx.array], mx.array], int]] = [
        ("reshape (view)", lambda x: x.reshape(1, 1, HIDDEN).reshape(1, HIDDEN), 2),
        ("add", lambda x: x + x, 1),
        ("rms_norm", lambda x: mx.fast.rms_norm(x, norm_w, 1e-5), 1),
        ("gemv (+ transpose view)", lambda x: x @ w.T, 2),
        ("custom, 1-line source", copy_kernel("cost_short", ""), 1),
        ("custom, 9 KB source", copy_kernel("cost_long", "// " + "padding " * 800 + "\n"), 1),
    ]
    graph_ops = os.environ.get("MLX_MAX_OPS_PER_BUFFER", "MLX's default")
    print(f"device {mx.default_device()}; MLX_MAX_OPS_PER_BUFFER={graph_ops}")
    print(f"{'op':26s}{'encode us/node':>16s}{'+ wait':>10s}")
    for name, op, nodes in ops:

        def chain(op=op, nodes=nodes) -> mx.array:
            x = x0
            for _ in range(N // nodes):
                x = op(x)
            return x

        enc, tot = per_node_us(chain, N)
        print(f"{name:26s}{enc:16.2f}{tot:10.2f}")

    def writes() -> mx.array:
        pool = mx.array(pool0)
        for _ in range(N // 5):
            pool[blocks, offsets] = rows  # Squeeze, Broadcast, Reshape (views), Scatter
        return pool

    enc, tot = per_node_us(writes, N // 5)
    print(f"{'pool row write (scatter)':26s}{enc:16.2f}{tot:10.2f}  (per write)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
