"""What ``conform reference`` and ``conform kld`` do once their flags are parsed
(conform_mlx/cli.py registers them): run, print a table, write the file, choose the exit
status (0 ran, 1 the engine gave NaN or inf, 2 bad input refused before the run)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from conform_mlx import REPO_ROOT, format_versions
from conform_mlx.metrics import KLD_LIMIT

REPORTS = REPO_ROOT / "reports"  # git-ignored


def model_label(spec: str, path: Path) -> str:
    """The model's part of a file name: its registered name, else the file or folder's."""
    from conform_mlx.models import NAMED

    text = spec if spec in NAMED else (path.stem if path.is_file() else path.name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def window_note(meta: dict) -> str:
    """E.g. "2 windows of 64 (377 more cut by --max-windows); ragged tail of 2 tokens dropped"."""
    cut = meta["windows_available"] - meta["windows"]
    more = f" ({cut} more cut by --max-windows)" if cut else ""
    return (
        f"{meta['windows']} windows of {meta['ctx']}{more}; ragged tail of "
        f"{meta['dropped_tail_tokens']} tokens dropped"
    )


def run_reference(args: argparse.Namespace, model: Path) -> int:
    from conform_mlx.kld import make_goldens, read_corpus, reference_logits_fn
    from conform_mlx.models import open_model

    try:
        checked = open_model(model, finite=not args.allow_non_finite)
        if checked.tokenizer is None:
            raise ValueError(
                f"{model} has no tokenizer (tokenizer.json, or tokenizer metadata in a GGUF "
                "file), so the corpus cannot be tokenized"
            )
        context = checked.config.max_position_embeddings
        if args.ctx > context:
            raise ValueError(
                f"--ctx {args.ctx} exceeds the model's context length "
                f"max_position_embeddings={context}"
            )
        corpus = read_corpus(args.corpus)
        name = f"goldens-{model_label(args.model, model)}-{corpus.name}-ctx{args.ctx}.npz"
        out = args.out or REPORTS / name
        logits_fn = reference_logits_fn(model)
        g = make_goldens(
            model, args.corpus, args.ctx, args.top_k, logits_fn, out, max_windows=args.max_windows
        )
    except (ValueError, OSError) as e:  # bad input, a model HF cannot load, a full disk
        print(f"conform reference: error: {e}", file=sys.stderr)
        return 2
    m = g.meta
    ppl = float(np.exp(-g.rows.target_logp.astype(np.float64).mean()))
    print(
        f"conform reference  {model}  corpus {m['corpus']} (sha256 {m['corpus_sha256'][:12]})\n"
        f"tokens     {m['corpus_tokens']} (no special tokens): {window_note(m)}\n"
        f"reference  perplexity {ppl:.4f} over {g.rows.target_logp.size} positions; top "
        f"{m['k']} of {m['vocab']} log-probs kept per position\n"
        f"wrote      {g.path}"
    )
    return 0


def own_corpus(meta: dict) -> str | None:
    """The text of the goldens' own corpus where it is found here (a registered name,
    or its file), so that without --corpus an edited corpus is still noticed."""
    from conform_mlx.kld import CORPORA, read_corpus

    if meta["corpus"] in CORPORA:
        return read_corpus(meta["corpus"]).text
    if Path(meta["corpus_path"]).is_file():
        return read_corpus(meta["corpus_path"]).text
    return None


def run_kld(args: argparse.Namespace, model: Path) -> int:
    from conform_mlx import machine, versions
    from conform_mlx.engines import NotApplicable, load_engine, resolve
    from conform_mlx.kld import check_corpus, engine_logits_fn, judge, load_goldens, read_corpus
    from conform_mlx.models import open_model
    from conform_mlx.validate_io import check_out_dir, write_json

    out_dir = args.out_dir or REPORTS
    try:
        check_out_dir(out_dir)
        if args.chunk_size is not None and args.chunk_size < 1:
            raise ValueError(f"--chunk-size {args.chunk_size}: must be at least 1")
        engine_cls = resolve(args.engine)
        checked = open_model(model, finite=not args.allow_non_finite)
        text = read_corpus(args.corpus).text if args.corpus else None
        goldens = load_goldens(args.goldens, model_path=model, corpus_text=text)
        if text is None and (text := own_corpus(goldens.meta)) is not None:
            check_corpus(goldens, text)
        engine = load_engine(engine_cls, checked, args.dtype)
        metrics = judge(goldens, engine_logits_fn(engine, args.chunk_size))
    except (ValueError, NotApplicable) as e:  # bad input, stale goldens, engine name or load
        print(f"conform kld: error: {e}", file=sys.stderr)
        return 2
    report = {
        "command": "kld",
        "engine": {"name": engine_cls.name, "version": engine_cls.version()},
        "dtype": args.dtype,
        "model": str(model),
        "goldens": str(goldens.path),
        "goldens_meta": goldens.meta,
        "corpus_checked": text is not None,
        "machine": machine(),
        "versions": versions(),
        "metrics": metrics.as_dict(),
    }
    report["limits"] = limits = KLD_LIMIT[args.dtype]
    report["failures"] = kld_failures(metrics.as_dict(), limits)
    report["passed"] = not report["failures"]
    print(format_kld(report))
    path = out_dir / f"kld-{model_label(args.model, model)}-{engine_cls.name}-{args.dtype}.json"
    try:
        write_json(report, out_dir, path.name)
    except OSError as e:
        print(f"conform kld: error: cannot write the report: {e}", file=sys.stderr)
        return 2
    print(f"wrote      {path}")
    return 0 if report["passed"] else 1


def format_kld(r: dict) -> str:
    x, g = r["metrics"], r["goldens_meta"]
    bound = "exact: k = vocab" if x["kl_exact"] else f"a lower bound: top-{x['k']} + rest"
    checked = "" if r["corpus_checked"] else " (its text is not here: not checked)"
    lines = [
        f"conform kld  {r['engine']['name']} ({r['engine']['version']})  dtype={r['dtype']}",
        f"model      {r['model']} (digest {g['model_digest'][:12]})",
        f"machine    {r['machine']}",
        f"versions   {format_versions(r['versions'])}",
        f"corpus     {g['corpus']}{checked}: {window_note(g)}",
        f"scored     {x['positions']} positions in {x['windows']} windows of ctx {x['ctx']}, "
        f"top-{x['k']} of vocab {x['vocab']}",
        f"KL         mean {x['kl_mean']:.4g}  median {x['kl_median']:.4g}  p99 "
        f"{x['kl_p99']:.4g}  max {x['kl_max']:.4g} nats ({bound})",
        f"perplexity engine {x['ppl_engine']:.4f}  reference {x['ppl_reference']:.4f}  "
        f"ratio {x['ppl_ratio']:.6f}",
        f"top-1      {x['top1_agreement']:.2%} agreement with the reference's argmax",
        f"RMS dp     {x['rms_dp_top']:.4g} (p of the reference's top token, engine - reference)",
    ]
    lim = r["limits"]
    lines.append(
        f"limits     KL mean <= {lim['kl_mean']:g}, top-1 >= {lim['top1']:.1%} "
        f"({r['dtype']}, conform_mlx/metrics.py)"
    )
    lines.append("PASS" if r["passed"] else "FAIL       " + "; ".join(r["failures"]))
    return "\n".join(lines)


def kld_failures(x: dict, limits: dict) -> list[str]:
    """Why the metrics miss the limits (empty: they pass)."""
    if x["non_finite"]:
        return [f"NaN or inf engine logits at {len(x['non_finite'])} positions"]
    out = []
    if not x["kl_mean"] <= limits["kl_mean"]:
        out.append(f"KL mean {x['kl_mean']:.3g} > {limits['kl_mean']:g}")
    if not x["top1_agreement"] >= limits["top1"]:
        out.append(f"top-1 {x['top1_agreement']:.2%} < {limits['top1']:.1%}")
    return out
