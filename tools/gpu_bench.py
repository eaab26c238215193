"""GPU timing of engines side by side on the TinyLlama-1.1B shape, float16, or on any
checkpoint (``--model``: a directory, a GGUF file or a named real model; ``--quantize
BITS``: an mlx-lm-format copy of the preset, made by mlx-lm; ``--float-peer NAME``: NAME
on the float16 preset too, in the same interleaved run, to judge a quantized step by).

Meant for the lent NVIDIA machine with MLX's CUDA backend (see tools/gpu_run.sh);
it also runs, slowly, on the CPU backend. Every engine is reached through
conform_mlx.engines (names as ``resolve`` takes them). Prints a table and writes JSON:

  python tools/gpu_bench.py --engine impl --engine mlx-lm --out results/gpu-bench.json
  python tools/gpu_bench.py --model smollm2-135m --quick --out reports/smollm2.json

Every figure is the median of timed repetitions after warm-up, each ending in an
evaluated step (``Engine.run_prefill`` / ``run_decode``). The engines compared at one
point are timed interleaved (a, b, c, then a, c, b, ...: the reps go through every
order, so each engine follows each other alike), so drift in clocks or host load hits
them alike: separate runs of the same mlx-lm step differed by up to 2x on one machine.
Ratios are to the last engine named. The weights-read floor is the checkpoint's weight
bytes (as stored, quantized or not) divided by the read bandwidth of a large device
copy measured in the same run. Each engine's KV bytes for one sequence at each decode
context are printed beside the formula's (``kv_bytes`` in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import os
import platform
import pstats
import re
import statistics
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from conform_mlx import blas

blas.load()  # before MLX is imported: MLX binds its BLAS then (conform_mlx/blas.py)

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from conform_bench import common  # noqa: E402
from conform_mlx.engines import Engine, load_engine  # noqa: E402
from conform_mlx.impl.loader import read_config  # noqa: E402
from conform_mlx.models import open_model, resolve_model  # noqa: E402
from conform_mlx.validate import ITEMSIZE, kv_bytes  # noqa: E402

DTYPE = "float16"
CONTEXTS = [16, 512, 2048]
BATCHES = [8, 32]
GENERATE_TOKENS = 256  # after a 16-token prompt
DEFAULT_ENGINES = ["impl", "impl-compiled", "mlx-lm"]
Step = Callable[[], None]
# Primitives that make a view (or nothing) rather than launch a kernel.
VIEWS = {
    "AsStrided", "Broadcast", "Depends", "ExpandDims", "Flatten", "Reshape", "Slice",
    "Split", "Squeeze", "StopGradient", "Transpose", "Unflatten",
}  # fmt: skip


def median_ms(fn: Step, warmup: int = 3, reps: int = 20) -> float:
    return interleaved_ms([fn], warmup, reps)[0]


def interleaved_ms(fns: list[Step], warmup: int = 3, reps: int = 30) -> list[float]:
    """Median ms of each step function, the functions taking turns rep by rep."""
    return [statistics.median(t) for t in interleaved_samples(fns, warmup, reps)]


def rep_order(n: int, rep: int) -> tuple[int, ...]:
    """The order the ``n`` step functions take turns in at repetition ``rep``. Up to 4
    functions the reps cycle through every order (3 engines: 6 orders), so within the
    reps each function runs right after each other one equally often; past 4, the
    order rotates by one each rep. On an H200 a compiled step timed right after
    mlx-lm's took 2-3% (batch 1) to 5% (batch 8) longer than the same engine's twin
    timed after it in a fixed order (docs/gpu-history.md)."""
    if n <= 4:
        orders = list(itertools.permutations(range(n)))
        return orders[rep % len(orders)]
    return tuple((rep + i) % n for i in range(n))


def interleaved_samples(fns: list[Step], warmup: int = 3, reps: int = 30) -> list[list[float]]:
    """Every rep's ms of each step function, the functions taking turns rep by rep in
    the orders ``rep_order`` gives."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps):
        for i in rep_order(len(fns), rep):
            t0 = time.perf_counter()
            fns[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def paired_ratios(ms: list[float], ref_ms: list[float], per_s: bool = False) -> list[float]:
    """Quartiles (q1, median, q3) of one engine's ratio to the reference, rep by rep:
    each rep's pair was timed back to back, so host drift between reps cancels. In
    the row's unit: a time ratio, or for a tokens/s row the rate ratio."""
    pairs = [b / a if per_s else a / b for a, b in zip(ms, ref_ms, strict=True)]
    if len(pairs) < 2:
        return pairs * 3
    q1, median, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
    return [q1, median, q3]


def host() -> dict:
    """The host a run's figures belong to: CPU model, cores, and the time of a fixed
    single-threaded Python loop (host-bound steps scale with it; a ratio from one host is
    a fact about that host, docs/gpu-history.md)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def loop() -> None:
        total = 0
        for i in range(200_000):
            total += i * i % 7

    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        loop()
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "node": platform.node(),
        "cpu": model,
        "cores": os.cpu_count(),
        "python_loop_ms": statistics.median(times),
    }


def copy_gbps() -> float:
    """Bandwidth of a 1 GiB device copy, counting bytes read and written (FACTS.md's
    convention: 3.0 TB/s on an H100, giving the 0.73 ms floor for 2.2 GB)."""
    x = mx.ones((256, 1024, 1024), dtype=mx.float32)
    mx.eval(x)
    ms = median_ms(lambda: mx.eval(x + 0), warmup=2, reps=10)
    return 2 * x.nbytes / (ms / 1e3) / 1e9


def weight_bytes(model_dir: Path) -> int:
    """Tensor bytes of a safetensors checkpoint: the file less its JSON header, whose
    length is the file's first 8 bytes (little-endian u64). A GGUF file: its size."""
    if model_dir.suffix == ".gguf":
        return model_dir.stat().st_size
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with f.open("rb") as fh:
            (header,) = struct.unpack("<Q", fh.read(8))
        total += f.stat().st_size - 8 - header
    return total


def quantized_copy(src: Path, bits: int, group_size: int) -> Path:
    """An mlx-lm-format copy of ``src`` quantized by mlx-lm (affine), made once beside
    it; every engine then loads the same quantized weights."""
    from conform_mlx.engines.mlx_lm_engine import quantize_checkpoint

    out = src.with_name(f"{src.name}-mlx{bits}bit-g{group_size}")
    if not (out / "config.json").is_file():
        quantize_checkpoint(src, out, bits=bits, group_size=group_size)
    return out


def decode_step(engine: Engine, contexts: list[int], spare_sequences: int = 0) -> Step:
    """One decode step for len(contexts) sequences at those contexts, rolled back
    (``trim``) after each step so every repetition sees the same contexts. Room for
    ``spare_sequences`` more enlarges the cache: the step time must not grow with it,
    or the cache write copies the cache instead of updating it in place."""
    cache = common.new_cache(engine, max(contexts), len(contexts) + spare_sequences)
    seqs = list(range(len(contexts)))
    for s, c in zip(seqs, contexts):
        cache.add_sequence(s)
        engine.fill(cache, s, c - 1)

    def step() -> None:
        engine.run_decode(cache, seqs, [5] * len(seqs))
        for s in seqs:
            cache.trim(s, 1)

    return step


def prefill_step(engine: Engine, n: int, vocab: int) -> Step:
    """Prefill n tokens into an empty sequence."""
    cache = common.new_cache(engine, n)
    prompt = common.tokens(n, vocab)

    def step() -> None:
        cache.add_sequence(0)
        engine.run_prefill(cache, 0, prompt)
        cache.release(0)

    return step


def chunked_prefill_step(engine: Engine, prefix: int, n: int, vocab: int) -> Step:
    """Prefill n tokens after ``prefix`` cached ones (a chunk of a long prompt), rolled
    back after each step."""
    cache = common.new_cache(engine, prefix + n)
    cache.add_sequence(0)
    engine.fill(cache, 0, prefix)
    prompt = common.tokens(n, vocab)

    def step() -> None:
        engine.run_prefill(cache, 0, prompt)
        cache.trim(0, n)

    return step


def generate_step(engine: Engine, vocab: int, new_tokens: int = GENERATE_TOKENS) -> Step:
    """One greedy generation through the engine's own loop (``Engine.generate``)."""
    prompt = common.tokens(16, vocab)
    return lambda: engine.generate(prompt, new_tokens)


def graph_primitives(tree: object) -> Counter:
    """The primitives of the unevaluated graph behind the arrays in ``tree``, by name
    (a compiled graph's fused kernels appear as ``Compiled...``)."""
    arrays = [a for _, a in tree_flatten(tree) if isinstance(a, mx.array)]
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return Counter(re.findall(r'label ="([^"]+)", shape=rectangle', dot.getvalue()))


@contextlib.contextmanager
def watching_eval(count: bool = True) -> Iterator[dict]:
    """Replace ``mx.eval`` and ``mx.async_eval`` while inside: every ``mx.eval``
    records the primitives of what it evaluates (if ``count``: that walk is slow, so
    timed runs leave it out), then queues it (``mx.async_eval``: MLX encodes every
    kernel on this thread) and waits for it; the dict yielded collects the primitive
    counts and the time spent encoding and waiting. An engine's own ``mx.async_eval``
    (queueing part of a step early) counts as encoding; while counting it is left to
    the step's final ``mx.eval``, so every primitive is counted once. Engines call
    both through the module, so this sees any engine's step without knowing its code."""
    seen: dict = {"primitives": Counter(), "encode_s": 0.0, "wait_s": 0.0}
    real, real_async = mx.eval, mx.async_eval

    def watched(*args: object) -> None:
        if count:
            seen["primitives"].update(graph_primitives(list(args)))
        t0 = time.perf_counter()
        real_async(*args)
        t1 = time.perf_counter()
        real(*args)
        seen["encode_s"] += t1 - t0
        seen["wait_s"] += time.perf_counter() - t1

    def queued(*args: object) -> None:
        if count:
            return
        t0 = time.perf_counter()
        real_async(*args)
        seen["encode_s"] += time.perf_counter() - t0

    mx.eval, mx.async_eval = watched, queued
    try:
        yield seen
    finally:
        mx.eval, mx.async_eval = real, real_async


def step_anatomy(step: Step, reps: int = 20) -> dict:
    """Where one step's wall time goes: Python (building the graph, planning), MLX
    encoding the kernels, and waiting for the GPU after the last one is queued; and
    the step's launches, estimated as the primitives of its graph that are not views.
    A host-bound step waits little: the GPU finishes soon after the last launch."""
    step()  # warm (a compiled engine traces here)
    with watching_eval() as seen:
        step()
    primitives = seen["primitives"]
    launches = sum(n for name, n in primitives.items() if name not in VIEWS)
    with watching_eval(count=False) as seen:
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        total = time.perf_counter() - t0
    per = 1e3 / reps
    return {
        "launches": launches,
        "wall_ms": total * per,
        "python_ms": (total - seen["encode_s"] - seen["wait_s"]) * per,
        "encode_ms": seen["encode_s"] * per,
        "wait_ms": seen["wait_s"] * per,
        "primitives": dict(primitives.most_common()),
    }


def profile(name: str, step: Step, steps: int = 20) -> None:
    """Where the host time of an engine's decode step goes (cProfile): time outside
    mlx.core.eval is Python and graph building rather than device work."""
    step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    print(f"profile of {steps} decode steps, {name}, b=1 ctx=512")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def kv_bytes_at(engines: dict[str, Engine], cfg, dtype: str, contexts: list[int]) -> dict:
    """Each engine's KV bytes for one sequence at each context (its cache's own count: impl
    counts whole blocks, mlx-lm its arrays' steps) beside the formula for exactly that many
    tokens (``validate.kv_bytes``)."""
    rows = {}
    for c in contexts:
        row = {"formula": kv_bytes(cfg, ITEMSIZE[dtype], c)}
        for name, engine in engines.items():
            cache = common.new_cache(engine, c)
            cache.add_sequence(0)
            engine.fill(cache, 0, c)
            row[name] = cache.kv_bytes(0)
            del cache
            mx.clear_cache()
        rows[c] = row
    return rows


def spare_sequences(cfg, dtype: str, most: int = 256, budget: float = 4e9) -> int:
    """Sequences of 512 tokens to make room for beside one: ``most``, or as many as fit in
    ``budget`` bytes a cache (an 8B model's 256 would take 17 to 67 GB an engine)."""
    per_sequence = kv_bytes(cfg, ITEMSIZE[dtype], 512)
    return max(1, min(most, int(budget // per_sequence)))


def mixed_contexts(batch: int) -> list[int]:
    """Deterministic mixed lengths between 16 and 2048."""
    return [16 + (i * 997) % 2032 for i in range(batch)]


def print_table(
    names: list[str],
    rows: list[tuple[str, list[float]]],
    floor_ms: float,
    off_floor: tuple[str, ...] = (),
) -> None:
    """One column per engine, then each engine's ratio to the last one, then the best
    decode time over the weights-read floor (of the engines not in ``off_floor``: a peer
    on other weights, whose bytes the floor does not count)."""
    ref = names[-1]
    on_floor = [i for i, n in enumerate(names) if n not in off_floor]
    head = [*names, *(f"{n}/{ref}" for n in names[:-1]), "best/floor"]
    widths = [max(12, len(h) + 2) for h in head]
    print(f"{'point':48s}" + "".join(f"{h:>{w}s}" for h, w in zip(head, widths)))
    for point, values in rows:
        per_s = point.endswith("tokens/s")
        best = min(values[i] for i in on_floor)
        cells = [*values, *(v / values[-1] for v in values[:-1])]
        cells.append(best / floor_ms if not per_s and point.startswith("decode") else None)
        text = [f"{x:{w}.3f}" if x is not None else f"{'-':>{w}s}" for x, w in zip(cells, widths)]
        print(f"{point:48s}" + "".join(text))


def print_spreads(names: list[str], samples: dict[str, list[list[float]]], ref: int = -1) -> dict:
    """Each other engine's ``paired_ratios`` to engine ``ref`` (the last), per point; printed
    and returned. A ratio target is clear of the noise when the whole q1-q3 range is on
    its side."""
    print(f"\nratios to {names[ref]} rep by rep (paired): q1 median q3")
    spreads = {}
    for point, ms in samples.items():
        per_s = point.endswith("tokens/s")
        spreads[point] = {
            n: paired_ratios(t, ms[ref], per_s) for n, t in zip(names, ms) if n != names[ref]
        }
        cells = "".join(
            f"  {n} {q[0]:.3f} {q[1]:.3f} {q[2]:.3f}" for n, q in spreads[point].items()
        )
        print(f"{point:48s}{cells}")
    return spreads


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu-bench.json"))
    p.add_argument("--preset", choices=list(common.PRESETS), default="tinyllama")
    p.add_argument("--model", help="a checkpoint directory, GGUF file or named model instead")
    p.add_argument(
        "--quantize",
        type=int,
        choices=[4, 8],
        help="time an mlx-lm-format copy of the preset, quantized to BITS by mlx-lm",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=[32, 64, 128],
        default=64,
        help="--quantize's group size (default 64, mlx-lm's)",
    )
    p.add_argument(
        "--float-peer",
        metavar="NAME",
        help="with --quantize: also time engine NAME on the float16 preset, named NAME@float16",
    )
    p.add_argument("--dtype", default=DTYPE, help=f"activation dtype (default {DTYPE})")
    p.add_argument("--quick", action="store_true", help="decode b=1 and prefill only; no profile")
    p.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=CONTEXTS,
        help=f"decode b=1 contexts (default {' '.join(map(str, CONTEXTS))})",
    )
    p.add_argument("--prefill", type=int, default=512, help="prefill length (default 512)")
    p.add_argument(
        "--cached",
        type=int,
        default=1000,
        help="tokens cached before the chunked prefill of --chunk tokens (default 1000)",
    )
    p.add_argument("--chunk", type=int, default=512, help="chunked prefill length (default 512)")
    p.add_argument(
        "--batches",
        type=int,
        nargs="*",
        default=BATCHES,
        help=f"batched decode points, mixed contexts (default {' '.join(map(str, BATCHES))})",
    )
    p.add_argument(
        "--engine",
        action="append",
        metavar="NAME",
        help="an engine to time, repeatable; ratios are to the last one named "
        f"(default: {' '.join(f'--engine {n}' for n in DEFAULT_ENGINES)})",
    )
    args = p.parse_args()
    names = args.engine or DEFAULT_ENGINES
    if len(set(names)) < len(names):
        p.error("an engine is named twice in --engine")
    if args.model:
        path = resolve_model(args.model)
    elif args.quantize:
        path = quantized_copy(common.checkpoint(args.preset), args.quantize, args.group_size)
    else:
        path = common.checkpoint(args.preset)
    checked = open_model(path)
    engines = [load_engine(n, checked, args.dtype) for n in names]
    if args.float_peer:  # before the last engine, which the ratios are to
        if not args.quantize or args.model:
            p.error("--float-peer compares a --quantize copy with the float16 preset")
        peer = load_engine(args.float_peer, open_model(common.checkpoint(args.preset)), DTYPE)
        engines.insert(len(engines) - 1, peer)
        names = [*names[:-1], f"{args.float_peer}@float16", names[-1]]
    cfg = read_config(path)
    vocab = cfg.vocab_size
    if args.cached + args.chunk > cfg.max_position_embeddings:
        p.error(
            f"--cached {args.cached} + --chunk {args.chunk} exceeds the model's context "
            f"of {cfg.max_position_embeddings}"
        )
    wbytes = weight_bytes(path)
    gbps = copy_gbps()
    floor_ms = wbytes / (gbps * 1e9) * 1e3
    # (point, one value per engine): ms, or tokens/s for the batched rows.
    rows: list[tuple[str, list[float]]] = []
    samples: dict[str, list[list[float]]] = {}  # point -> each engine's ms, rep by rep
    print(f"loaded {', '.join(names)} on {path.name}", flush=True)

    def add(point: str, steps: list[Step], per: float | None = None, **reps: int) -> None:
        """Time ``steps`` interleaved; a row of medians in ms, or with ``per`` (tokens a
        step) in tokens/s."""
        ms = interleaved_samples(steps, **reps)
        steps.clear()  # the point's caches: freed, and given back before the next allocates
        mx.clear_cache()
        samples[point] = ms
        medians = [statistics.median(t) for t in ms]
        rows.append((point, medians if per is None else [per / (m / 1e3) for m in medians]))
        print(f"  {point}: {', '.join(f'{v:.3f}' for v in rows[-1][1])}", flush=True)

    contexts = [c for c in args.contexts if c <= cfg.max_position_embeddings]
    for c in contexts:
        add(f"decode b=1 ctx={c} ms", [decode_step(e, [c]) for e in engines])
    kv = kv_bytes_at(dict(zip(names, engines)), cfg, args.dtype, contexts)
    for c, row in kv.items():
        held = ", ".join(f"{n} {row[n] / row['formula']:.4f}" for n in names)
        print(f"  KV bytes at ctx {c}: formula {row['formula'] / 1e6:.3f} MB; held/formula {held}")
    n = args.prefill
    add(f"prefill {n} ms", [prefill_step(e, n, vocab) for e in engines], reps=15)
    chunks = [chunked_prefill_step(e, args.cached, args.chunk, vocab) for e in engines]
    add(f"prefill {args.chunk} after {args.cached} cached ms", chunks, reps=15)
    # 9 runs: on a shared host the peers' generate rates moved by up to 30% run to run.
    gens = [generate_step(e, vocab) for e in engines]
    add(f"generate {GENERATE_TOKENS} after 16 tokens/s", gens, GENERATE_TOKENS, warmup=1, reps=9)
    for b in [] if args.quick else args.batches:
        steps = [decode_step(e, mixed_contexts(b)) for e in engines]
        add(f"decode b={b} mixed tokens/s", steps, b)
    # Room for up to 256 more sequences of 512 tokens (TinyLlama: +8192 blocks of 16, 3 GB)
    # must not show in the step time: the cache write is in place.
    if not args.quick:
        spare = spare_sequences(cfg, args.dtype)
        big = [decode_step(e, [512], spare_sequences=spare) for e in engines]
        add(f"decode b=1 ctx=512 ms, cache for {spare + 1} sequences", big)
    device = f"{mx.default_device()} {platform.node()}"
    machine = host()
    print(
        f"host {machine['cpu']}, {machine['cores']} cores, Python loop "
        f"{machine['python_loop_ms']:.1f} ms"
    )
    print(
        f"device {device}; model {path.name} ({engines[0].weights()}), {args.dtype}; weights "
        f"{wbytes / 1e9:.3f} GB; copy {gbps:.0f} GB/s; weights-read floor {floor_ms:.3f} ms"
    )
    print_table(names, rows, floor_ms, tuple(n for n in names if n.endswith("@float16")))
    spreads = print_spreads(names, samples)
    if args.float_peer:
        spreads = {"to_last": spreads, "to_float_peer": print_spreads(names, samples, -2)}
    anatomy = {n: step_anatomy(decode_step(e, [512])) for n, e in zip(names, engines)}
    print("\none decode step b=1 ctx=512: launches (graph primitives, views excluded), ms")
    print(f"{'engine':16s}{'launches':>9s}{'wall':>8s}{'python':>8s}{'encode':>8s}{'wait':>8s}")
    for n, a in anatomy.items():
        print(
            f"{n:16s}{a['launches']:9d}{a['wall_ms']:8.3f}{a['python_ms']:8.3f}"
            f"{a['encode_ms']:8.3f}{a['wait_ms']:8.3f}"
        )
    if not args.quick:
        profile(names[0], decode_step(engines[0], [512]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "device": device,
                "host": machine,
                "mlx": mx.__version__,
                "model": str(path),
                "weights": {n: e.weights() for n, e in zip(names, engines)},
                "dtype": args.dtype,
                "engines": {n: e.version() for n, e in zip(names, engines)},
                "weight_bytes": wbytes,
                "copy_gbps": gbps,
                "floor_ms": floor_ms,
                "rows": [{"point": pt, **dict(zip(names, vs))} for pt, vs in rows],
                "samples_ms": {pt: dict(zip(names, ms)) for pt, ms in samples.items()},
                "paired_ratio_quartiles": spreads,
                "kv_bytes": kv,
                "decode_step_anatomy": anatomy,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
