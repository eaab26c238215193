"""A/B of impl's step policies in one process, interleaved with mlx-lm.

Each variant is a named ``KernelPolicy`` (``impl.kernels.policy.VARIANTS``: which
layers a compiled step queues early, whether the fused add + RMSNorm kernel or the row
kernels run, whether the decode kernel splits the context, how a chunk over a cache is
masked) on its own ``impl-compiled``
engine, run inside ``use_policy``. Compiled graphs are kept per policy, and all the
variants and mlx-lm are timed turn by turn (``tools/gpu_bench.py``'s steps): on a
shared host separate processes drifted by up to 30%, one run does not.

  python tools/gpu_policy_ab.py                      # TinyLlama shape, float16
  python tools/gpu_policy_ab.py --preset small --reps 2   # a CPU smoke run
  python tools/gpu_policy_ab.py --quantize 4 --variant default --variant no-row-kernels

On the CPU backend no kernel runs, so the variants differ only in what they queue.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from conform_mlx import blas  # noqa: E402

blas.load()  # before MLX is imported: MLX binds its BLAS then (conform_mlx/blas.py)

import mlx.core as mx  # noqa: E402

from conform_bench import common  # noqa: E402
from conform_mlx.engines import load_engine  # noqa: E402
from conform_mlx.impl.kernels.policy import VARIANTS, KernelPolicy, use_policy, variant  # noqa: E402
from conform_mlx.models import open_model  # noqa: E402
from tools import gpu_bench  # noqa: E402


def under(policy: KernelPolicy | None, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` run under ``policy`` (None: a peer engine, which has none)."""

    def run() -> None:
        with use_policy(policy) if policy else contextlib.nullcontext():
            step()

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(common.PRESETS), default="tinyllama")
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="repeatable")
    ap.add_argument("--reps", type=int, default=40, help="interleaved decode repetitions")
    ap.add_argument(
        "--quantize",
        type=int,
        choices=[4, 8],
        help="an mlx-lm-format copy of the preset, quantized to BITS by mlx-lm, group 64",
    )
    ap.add_argument(
        "--contexts", type=int, nargs="+", default=gpu_bench.CONTEXTS, help="decode b=1 contexts"
    )
    ap.add_argument("--cached", type=int, default=1000, help="tokens before the chunk")
    ap.add_argument("--batch", type=int, default=32, help="the batched decode point, mixed")
    ap.add_argument("--chunk", type=int, default=512, help="chunked prefill length")
    args = ap.parse_args()
    names = args.variant or ["no-early", "default", "dense", "fused-norm"]
    path = common.checkpoint(args.preset)
    if args.quantize:
        path = gpu_bench.quantized_copy(path, args.quantize, 64)
    checked = open_model(path)
    engines = {n: load_engine("impl-compiled", checked, "float16") for n in names}
    engines["mlx-lm"] = load_engine("mlx-lm", checked, "float16")
    policies = {n: variant(n) for n in names} | {"mlx-lm": None}
    vocab = common.vocab_size(args.preset)

    def timed(make: Callable, reps: int, warmup: int = 3) -> list[float]:
        steps = [under(policies[n], make(e)) for n, e in engines.items()]
        ms = gpu_bench.interleaved_ms(steps, warmup=warmup, reps=reps)
        steps.clear()  # the point's caches, given back before the next point's
        mx.clear_cache()
        return ms

    rows = []
    for c in args.contexts:
        ms = timed(lambda e, c=c: gpu_bench.decode_step(e, [c]), args.reps)
        rows.append((f"decode b=1 ctx={c} ms", ms))
    ms = timed(
        lambda e: gpu_bench.chunked_prefill_step(e, args.cached, args.chunk, vocab),
        max(1, args.reps // 4),
    )
    rows.append((f"prefill {args.chunk} after {args.cached} cached ms", ms))
    mixed = gpu_bench.mixed_contexts(args.batch)
    ms = timed(lambda e: gpu_bench.decode_step(e, mixed), max(1, args.reps // 2))
    rows.append((f"decode b={args.batch} tokens/s", [args.batch * 1e3 / m for m in ms]))
    ms = timed(lambda e: gpu_bench.generate_step(e, vocab), max(1, args.reps // 8), warmup=1)
    rows.append(
        (
            f"generate {gpu_bench.GENERATE_TOKENS} tokens/s",
            [gpu_bench.GENERATE_TOKENS * 1e3 / m for m in ms],
        )
    )
    floor_ms = gpu_bench.weight_bytes(path) / (gpu_bench.copy_gbps() * 1e9) * 1e3
    gpu_bench.print_table(list(engines), rows, floor_ms)
    print("\none decode step b=1 ctx=512, ms")
    for n, e in engines.items():
        with use_policy(policies[n]) if policies[n] else contextlib.nullcontext():
            a = gpu_bench.step_anatomy(gpu_bench.decode_step(e, [512]))
        print(
            f"{n:12s} launches {a['launches']:4d} wall {a['wall_ms']:.3f} python "
            f"{a['python_ms']:.3f} encode {a['encode_ms']:.3f} wait {a['wait_ms']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
