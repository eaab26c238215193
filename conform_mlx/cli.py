"""The ``conform`` command (also ``python -m conform_mlx``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conform_mlx import DEFAULT_MODEL, format_versions
from conform_mlx.engines import DTYPES, known_engines

MODEL_HELP = "HF checkpoint directory, GGUF file, or a model name (smollm2-135m)"
CORPUS_HELP = "a corpus name (gpl-3.0) or a UTF-8 text file"
NON_FINITE_HELP = (
    "run a model whose weights hold NaN or Inf (refused by default, naming the tensor)"
)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _mib(n: int) -> str:
    return f"{n:,} B ({n / 2**20:.3f} MiB)"


def format_report(r: dict) -> str:
    m, t, c, p = r["model"], r["timing"], r["cache"], r["parity"]
    gen = r["generated"]
    text = f" {gen['text']!r}" if gen["text"] is not None else ""
    blocks = f"  block_size={r['block_size']}" if r["block_size"] is not None else ""
    lines = [
        f"conform validate  {r['model_dir']}  dtype={r['dtype']}{blocks}",
        f"engine     {r['engine']['name']} ({r['engine']['version']})"
        + (f", weights {r['engine']['weights']}" if r["engine"].get("weights") else ""),
        f"machine    {r['machine']}",
        f"versions   {format_versions(r['versions'])}",
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
    for q in r["compare"]:
        lines.append(
            f"compare    {q['engine']}: prefill {_ms(q['prefill_ms'])} ms, decode avg "
            f"{_ms(q['decode_ms_avg'])} ms (validated / this: prefill "
            f"{_ratio(t['prefill_ms'], q['prefill_ms'])}, decode "
            f"{_ratio(t['decode_ms_avg'], q['decode_ms_avg'])})"
        )
    lines.append(f"cache      {c['cached_tokens']} tokens cached = {c['rule']}")
    if "blocks_used" in c:
        lines.append(
            f"blocks     {c['blocks_used']} used (ceil(tokens / block_size) = "
            f"{c['blocks_expected']}), pool of {c['pool_blocks']}"
        )
    lines += [
        f"KV bytes   sequence measured {_mib(c['sequence_nbytes_measured'])}, formula "
        f"{_mib(c['sequence_nbytes_formula'])} (slots in units of {c['granularity']})",
        f"           {_mib(c['sequence_nbytes_unpaged'])} for the tokens alone; repeated heads "
        f"would cost {_mib(c['sequence_nbytes_if_heads_repeated'])} "
        f"(GQA saves {c['gqa_saving']:.1%})",
        f"parity     vs {p['reference']}",
        *_parity_lines(p),
    ]
    if r["known_issue"]:
        lines.append(f"known      {r['known_issue']}")
    failed = r["failures"]
    lines.append("result     " + ("PASS" if not failed else "FAIL: " + ", ".join(failed)))
    lines += [f"           {name}: {why}" for name, why in failed.items()]
    return "\n".join(lines)


def _parity_lines(p: dict) -> list[str]:
    if p["non_finite"]:  # no metric means anything then; the checks say where
        return [
            f"           {p['positions']} positions: no agreement measured (non-finite logits)",
            "           greedy tokens: not compared (non-finite logits)",
        ]
    k = p["greedy_first_divergence"]
    return [
        f"           {p['positions']} positions: max|dlogit| {p['max_abs']:.3g}, NMSE "
        f"{p['nmse']:.3g} (limit {p['nmse_limit']:g}), top-1 agreement "
        f"{p['top1_agreement']:.1%}",
        "           greedy tokens: "
        + (
            "identical to the reference's"
            if p["greedy_identical"]
            else f"first differ at step {k} (reference {p['greedy_reference_ids']})"
        ),
    ]


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def _token_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("wants at least one token id")
    return ids


def resolve_model_arg(parser: argparse.ArgumentParser, spec: str) -> Path:
    """--model through conform_mlx.models.resolve_model; an unknown one is a usage error
    (exit 2), like any other bad flag."""
    from conform_mlx.models import ModelNotFound, resolve_model

    try:
        return resolve_model(spec)
    except ModelNotFound as e:
        parser.error(f"--model {e}")


def add_kld_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    """``conform reference`` and ``conform kld`` (docs/kld.md; run by conform_mlx.kld_cli)."""
    r = sub.add_parser(
        "reference",
        help="store the HF reference's top-k log-probs over a corpus (goldens)",
        description="Run the HF float32 reference over consecutive windows of a corpus and "
        "write its top-k log-probs per position (a goldens file) for conform kld.",
    )
    r.add_argument("--model", required=True, help=MODEL_HELP)
    r.add_argument("--corpus", default="gpl-3.0", help=CORPUS_HELP + " (default gpl-3.0)")
    r.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    r.add_argument("--top-k", type=int, default=32, help="log-probs kept per position (default 32)")
    r.add_argument("--max-windows", type=int, help="stop after N windows (reported)")
    r.add_argument(
        "--out",
        type=Path,
        help="goldens file (default reports/goldens-<model>-<corpus>-ctx<ctx>.npz, git-ignored)",
    )
    k = sub.add_parser(
        "kld",
        help="judge an engine over a corpus against stored reference log-probs",
        description="Perplexity, KL(reference || engine), top-1 agreement and RMS dp of an "
        "engine over the windows of a goldens file made by conform reference.",
    )
    k.add_argument("--engine", required=True, help="engine judged: " + ", ".join(known_engines()))
    k.add_argument("--dtype", choices=list(DTYPES), default="float32")
    k.add_argument("--model", required=True, help=MODEL_HELP)
    k.add_argument("--goldens", type=Path, required=True, help="made by conform reference")
    k.add_argument(
        "--corpus",
        help=CORPUS_HELP + ", checked against the goldens' sha256 (default: the goldens' own "
        "corpus, where it is found)",
    )
    k.add_argument("--chunk-size", type=int, help="prefill chunk (default: a window at once)")
    k.add_argument("--out-dir", type=Path, help="where the JSON goes (default reports/)")
    for p in (r, k):
        p.add_argument("--allow-non-finite", action="store_true", help=NON_FINITE_HELP)
    return {"reference": r, "kld": k}


PASSTHROUGH = {
    "make-checkpoint": "write a random-weight checkpoint",
    "gate": "fail if HEAD is slower than a baseline (asv)",
    "history": "add points to the committed asv history, or publish it",
    "train-tiny": "retrain the committed tiny checkpoint",
}


def _passthrough(command: str, argv: list[str]) -> int:
    if command == "make-checkpoint":
        from conform_mlx.reference.checkpoints import main as run
    elif command == "gate":
        from conform_mlx.gate import main as run
    elif command == "history":
        from conform_mlx.history import main as run
    else:
        from conform_mlx.reference.train_tiny import main as run
    return run(argv)


def main(argv: list[str] | None = None) -> int:
    from conform_mlx import blas

    try:
        blas.load()  # before anything imports mlx
    except blas.BlasError as e:
        print(f"conform: error: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="conform", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser(
        "validate",
        help="generate through an engine's cache and check it",
        description="Generate greedily through an engine's KV cache; check parity with the "
        "HF float32 reference, the token accounting and the KV bytes; time every step.",
    )
    v.add_argument("--model", default=str(DEFAULT_MODEL), help=MODEL_HELP)
    src = v.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="text (needs tokenizer.json in --model)")
    src.add_argument("--tokens", type=_token_list, help="token ids, e.g. '1,450,4996'")
    v.add_argument("--max-new-tokens", type=int, default=5)
    v.add_argument("--dtype", choices=list(DTYPES), default="float32")
    v.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="block size of a paged engine's cache (default: the engine's own; impl: 16)",
    )
    v.add_argument(
        "--engine",
        default="impl",
        help="engine validated (default impl): "
        + ", ".join(known_engines())
        + ", an entry point of group conform_mlx.engines, or module:Class",
    )
    v.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="ENGINE",
        help="also time this engine on the same checkpoint and prompt and print the ratio; "
        "repeatable (e.g. --compare mlx-lm, which needs pip install -e '.[peers]')",
    )
    v.add_argument(
        "--out-dir", type=Path, help="where the JSON goes (default reports/, git-ignored)"
    )
    v.add_argument("--allow-non-finite", action="store_true", help=NON_FINITE_HELP)

    commands = {"validate": v, **add_kld_parsers(sub)}
    sub.add_parser("versions", help="the installed releases every report names (mlx, torch, ...)")

    # Commands with parsers of their own; listed here so --help shows them.
    for name, text in PASSTHROUGH.items():
        sub.add_parser(name, help=text, add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    args = parser.parse_args(argv)
    if args.command == "versions":
        from conform_mlx import versions

        print("\n".join(f"{name} {v or '(not installed)'}" for name, v in versions().items()))
        return 0
    model = resolve_model_arg(commands[args.command], args.model)
    if args.command == "reference":
        from conform_mlx.kld_cli import run_reference

        return run_reference(args, model)
    if args.command == "kld":
        from conform_mlx.kld_cli import run_kld

        return run_kld(args, model)

    from conform_mlx.engines import NotApplicable
    from conform_mlx.validate import run
    from conform_mlx.validate_io import Options, check_out_dir, write_json

    opts = Options(
        model=model,
        dtype=args.dtype,
        prompt=args.prompt,
        tokens=args.tokens,
        max_new_tokens=args.max_new_tokens,
        block_size=args.block_size,
        engine=args.engine,
        compare=args.compare,
        out_dir=args.out_dir or Options.out_dir,
        allow_non_finite=args.allow_non_finite,
    )
    try:
        check_out_dir(opts.out_dir)
        report = run(opts)
    except (ValueError, NotApplicable) as e:  # bad input, config, checkpoint or engine name
        print(f"conform validate: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    try:
        path = write_json(report, opts.out_dir)
    except OSError as e:  # the folder was checked before the run; a full disk, say
        print(f"conform validate: error: cannot write the report: {e}", file=sys.stderr)
        return 2
    print(f"wrote      {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
