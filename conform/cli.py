"""The ``conform`` command (also ``python -m conform``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conform import DEFAULT_MODEL


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _mib(n: int) -> str:
    return f"{n:,} B ({n / 2**20:.3f} MiB)"


def format_report(r: dict) -> str:
    m, t, c, p = r["model"], r["timing"], r["cache"], r["parity"]
    gen = r["generated"]
    text = f" {gen['text']!r}" if gen["text"] is not None else ""
    lines = [
        f"conform validate  {r['model_dir']}  dtype={r['dtype']}  block_size={r['block_size']}",
        f"machine    {r['machine']}",
        f"model      {m['layers']} layers, hidden {m['hidden_size']}, {m['q_heads']} q heads / "
        f"{m['kv_heads']} kv heads (GQA {m['gqa_ratio']}:1), head_dim {m['head_dim']}, "
        f"vocab {m['vocab_size']}",
        f"prompt     {r['prompt']['source']} -> {len(r['prompt']['ids'])} tokens "
        f"{r['prompt']['ids']}",
        f"generated  {len(gen['ids'])} tokens{text} {gen['ids']} (stop: {gen['stop_reason']})",
        f"prefill    {_ms(t['prefill_ms'])} ms",
        f"decode     min/avg/max {_ms(t['decode_ms_min'])} / {_ms(t['decode_ms_avg'])} / "
        f"{_ms(t['decode_ms_max'])} ms over {t['decode_steps']} steps, "
        f"{_ms(t['decode_tokens_per_s'])} tokens/s",
    ]
    if "peer" in r:
        q = r["peer"]
        lines.append(
            f"peer       {q['engine']}: prefill {_ms(q['prefill_ms'])} ms, decode avg "
            f"{_ms(q['decode_ms_avg'])} ms (ours / peer: prefill "
            f"{t['prefill_ms'] / q['prefill_ms']:.2f}x, decode "
            f"{_ratio(t['decode_ms_avg'], q['decode_ms_avg'])})"
        )
    lines += [
        f"cache      {c['cached_tokens']} tokens cached = {c['rule']}",
        f"blocks     {c['blocks_used']} used (ceil(tokens / block_size) = "
        f"{c['blocks_expected']}), pool of {c['pool_blocks']}",
        f"KV bytes   pool measured {_mib(c['pool_nbytes_measured'])}, formula "
        f"{_mib(c['pool_nbytes_formula'])}",
        f"           sequence: {_mib(c['sequence_nbytes_paged'])} in blocks, "
        f"{_mib(c['sequence_nbytes_unpaged'])} unpaged; repeated heads would cost "
        f"{_mib(c['sequence_nbytes_if_heads_repeated'])} (GQA saves {c['gqa_saving']:.1%})",
        f"parity     vs {p['reference']}",
        f"           {p['positions']} positions: max|dlogit| {p['max_abs']:.3g}, NMSE "
        f"{p['nmse']:.3g} (limit {p['nmse_limit']:g}), top-1 agreement "
        f"{p['top1_agreement']:.1%}",
        "           greedy tokens: "
        + (
            "identical to the reference's"
            if p["greedy_first_divergence"] is None
            else f"first differ at step {p['greedy_first_divergence']} "
            f"(reference {p['greedy_reference_ids']})"
        ),
    ]
    failed = [k for k, ok in r["checks"].items() if not ok]
    lines.append("result     " + ("PASS" if not failed else "FAIL: " + ", ".join(failed)))
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def _token_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens wants integers, got {text!r}") from None


PASSTHROUGH = {
    "make-checkpoint": "write a random-weight checkpoint",
    "gate": "fail if HEAD is slower than a baseline (asv)",
    "train-tiny": "retrain the committed tiny checkpoint",
}


def _passthrough(command: str, argv: list[str]) -> int:
    if command == "make-checkpoint":
        from reference.checkpoints import main as run
    elif command == "gate":
        from conform.gate import main as run
    else:
        from reference.train_tiny import main as run
    return run(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conform", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="generate through the paged cache and check it")
    v.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF checkpoint directory")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="text (needs tokenizer.json in --model)")
    src.add_argument("--tokens", type=_token_list, help="token ids, e.g. '1,450,4996'")
    v.add_argument("--max-new-tokens", type=int, default=5)
    v.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    v.add_argument("--block-size", type=int, default=16)
    v.add_argument("--peer", choices=["mlx-lm"], help="also time this engine, same checkpoint")
    v.add_argument("--out-dir", type=Path, default=Path("results"), help="where the JSON goes")

    # Commands with parsers of their own; listed here so --help shows them.
    for name, text in PASSTHROUGH.items():
        sub.add_parser(name, help=text, add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    args = parser.parse_args(argv)

    from conform.validate import Options, run, write_json
    from impl.config import ConfigError
    from impl.engine import InputError
    from impl.loader import CheckpointError
    from impl.paged_cache import CacheFullError

    opts = Options(
        model=args.model,
        dtype=args.dtype,
        prompt=args.prompt or Options.prompt,
        tokens=args.tokens,
        max_new_tokens=args.max_new_tokens,
        block_size=args.block_size,
        peer=args.peer,
        out_dir=args.out_dir,
    )
    try:
        report = run(opts)
    except (ConfigError, CheckpointError, InputError, CacheFullError, ValueError) as e:
        print(f"conform validate: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"wrote      {write_json(report, opts.out_dir)}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
