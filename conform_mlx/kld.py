"""Corpus metrics against stored reference logits: llama.cpp's ``perplexity
--kl-divergence`` figures, with the HF reference's side kept in a goldens file
(conform_mlx.goldens) so that an engine is judged with no torch in the loop.

``make_goldens`` tokenizes a corpus, runs the reference over consecutive,
non-overlapping windows of ``ctx`` tokens (the ragged tail is dropped) and stores,
per scored position, the reference's top-k log-probs and the log-mass of the rest.
``judge`` runs an engine over the same ids and scores it. In a window the logits at
positions 0..ctx-2 are scored against the tokens at 1..ctx-1.

KL(reference || engine) is taken over k + 1 buckets: the reference's top-k tokens
and one "rest" bucket (1 - the top-k's probability, on each side). With k == vocab
that is the full KL. With k < vocab it is a lower bound on it: merging outcomes into
one bucket never raises a KL (the data-processing inequality), so a small figure
here does not prove the tails agree, while a large one is real.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from conform_mlx import REPO_ROOT
from conform_mlx.goldens import (
    FORMAT_VERSION,
    GoldenRows,
    Goldens,
    GoldensError,
    check_corpus,
    check_out_path,
    load_goldens,
    save_goldens,
    sha256_ids,
)

# The goldens names are re-exported: conform_mlx.kld is the one door.
__all__ = [
    "CORPORA", "Corpus", "CorpusMetrics", "GoldenRows", "Goldens", "GoldensError",
    "RowScores", "check_corpus", "check_out_path", "engine_logits_fn", "golden_rows",
    "judge", "load_goldens", "make_goldens", "read_corpus", "reference_logits_fn",
    "score_rows", "summarize",
]  # fmt: skip

CORPORA = {"gpl-3.0": REPO_ROOT / "reference" / "texts" / "gpl-3.0.txt"}
ROWS = 128  # rows turned to float64 at a time: 128 x 49152 x 8 B = 50 MB

LogitsFn = Callable[[list[int]], np.ndarray]  # ids -> (len(ids), vocab) float32


@dataclass(frozen=True)
class Corpus:
    name: str  # a CORPORA key, or the file's stem
    path: Path
    text: str
    sha256: str  # of the file's bytes


def read_corpus(spec: str | Path) -> Corpus:
    """A CORPORA name, or the path of any UTF-8 text file. ValueError naming the file
    for one that is missing, unreadable, not UTF-8, or empty (or only white space)."""
    text_spec = str(spec)
    path = CORPORA.get(text_spec, Path(text_spec))
    if path.is_dir():
        raise ValueError(f"--corpus {text_spec}: a directory, not a text file")
    if not path.is_file():
        known = ", ".join(CORPORA)
        raise ValueError(f"--corpus {text_spec}: no such file, and not a known corpus ({known})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"corpus {path}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise ValueError(f"corpus {path}: empty (no text to tokenize)")
    name = text_spec if text_spec in CORPORA else path.stem
    return Corpus(name, path, text, hashlib.sha256(data).hexdigest())


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Per row; -inf for a row of -inf (an empty set of tokens)."""
    m = x.max(-1, keepdims=True)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):  # log(0) = -inf is the answer for an empty set
        return (safe + np.log(np.exp(x - safe).sum(-1, keepdims=True)))[..., 0]


def _rows_logp(logits: np.ndarray, a: int) -> np.ndarray:
    """Rows a..a+ROWS-1 as float64 log-softmax."""
    x = logits[a : a + ROWS].astype(np.float64)
    return x - _logsumexp(x)[:, None]


def _rest_logp(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Log of the probability outside ``ids``, per row, summed directly: 1 - sum(top-k)
    loses every digit when the top-k hold nearly all the mass."""
    rest = logp.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=-1)
    return _logsumexp(rest)


def golden_rows(logits: np.ndarray, targets: np.ndarray, k: int) -> GoldenRows:
    """The reference's rows (n, vocab), scored against ``targets`` (n,)."""
    parts = []
    for a in range(0, len(logits), ROWS):
        logp = _rows_logp(logits, a)
        ids = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
        order = np.argsort(-np.take_along_axis(logp, ids, -1), axis=-1, kind="stable")
        ids = np.take_along_axis(ids, order, -1)
        target = logp[np.arange(len(logp)), targets[a : a + ROWS]]
        top, rest = np.take_along_axis(logp, ids, -1), _rest_logp(logp, ids)
        f32 = [x.astype(np.float32) for x in (top, rest, target)]
        parts.append(GoldenRows(ids.astype(np.int32), *f32))
    return GoldenRows.concat(parts)


@dataclass(frozen=True)
class RowScores:
    kl: np.ndarray  # (n,) nats
    engine_target_logp: np.ndarray  # (n,)
    reference_target_logp: np.ndarray  # (n,)
    top1_agree: np.ndarray  # (n,) bool
    dp_top: np.ndarray  # (n,) p_engine - p_ref of the reference's top token
    non_finite: list[int]  # rows where the engine gave NaN or inf


def score_rows(logits: np.ndarray, targets: np.ndarray, gold: GoldenRows) -> RowScores:
    """The engine's rows (n, vocab) against the reference's, in float64.

    Each side's k + 1 buckets are renormalized before the KL: the stored float32
    log-probs sum to 1 only within rounding, and a KL of distributions that do not
    both sum to 1 can come out negative. A row with NaN or inf scores as far off as
    can be (KL inf, no agreement), so no figure claims an agreement it cannot have.
    """
    parts = []
    with np.errstate(invalid="ignore", over="ignore"):  # NaN rows; overwritten below
        for a in range(0, len(logits), ROWS):
            logq = _rows_logp(logits, a)
            ids = gold.topk_ids[a : a + ROWS]
            top = np.take_along_axis(logq, ids, -1)
            target = logq[np.arange(len(logq)), targets[a : a + ROWS]]
            parts.append((np.concatenate([top, _rest_logp(logq, ids)[:, None]], -1), target))
        logq_b, q_target = (np.concatenate(c) for c in zip(*parts))
        logp_b = np.concatenate([gold.topk_logp, gold.rest_logp[:, None]], -1).astype(np.float64)
        logp_b -= _logsumexp(logp_b)[:, None]
        logq_b -= _logsumexp(logq_b)[:, None]
        p = np.exp(logp_b)  # terms with p == 0 count 0 (their difference may be NaN)
        kl = np.maximum(np.where(p > 0, p * (logp_b - logq_b), 0.0).sum(-1), 0.0)
        rows = np.arange(len(kl))
        best = gold.topk_logp.argmax(-1)  # the reference's argmax among its top-k
        dp = np.exp(logq_b[rows, best]) - np.exp(gold.topk_logp[rows, best].astype(np.float64))
    agree = logits.argmax(-1) == gold.topk_ids[rows, best]
    bad = ~np.isfinite(logits).all(-1)
    kl[bad], q_target[bad], dp[bad], agree[bad] = np.inf, -np.inf, np.inf, False
    ref_target = gold.target_logp.astype(np.float64)
    return RowScores(kl, q_target, ref_target, agree, dp, np.flatnonzero(bad).tolist())


@dataclass(frozen=True)
class CorpusMetrics:
    """Engine vs reference over every scored position; KL in nats, float64."""

    positions: int
    windows: int
    ctx: int
    k: int
    vocab: int
    kl_exact: bool  # k == vocab; otherwise the KL figures are lower bounds
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    ppl_engine: float  # exp(-mean log q(next token)), from the engine's full row
    ppl_reference: float
    ppl_ratio: float  # engine / reference
    top1_agreement: float  # fraction of positions where the argmaxes agree
    rms_dp_top: float  # RMS of p_engine - p_ref of the reference's top token
    non_finite: list[int]  # positions (over the whole run) with engine NaN or inf

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(scores: Sequence[RowScores], ctx: int, k: int, vocab: int) -> CorpusMetrics:
    """One CorpusMetrics from the windows' scores, in window order."""

    def cat(field: str) -> np.ndarray:
        return np.concatenate([getattr(s, field) for s in scores])

    kl, q, p, dp = cat("kl"), cat("engine_target_logp"), cat("reference_target_logp"), cat("dp_top")
    offsets = np.cumsum([0] + [len(s.kl) for s in scores])
    bad = [int(o + r) for s, o in zip(scores, offsets) for r in s.non_finite]
    with np.errstate(invalid="ignore", over="ignore"):  # inf from non-finite rows
        return CorpusMetrics(
            positions=len(kl),
            windows=len(scores),
            ctx=ctx,
            k=k,
            vocab=vocab,
            kl_exact=k == vocab,
            kl_mean=float(kl.mean()),
            kl_median=float(np.median(kl)),
            kl_p99=float(np.percentile(kl, 99)),
            kl_max=float(kl.max()),
            ppl_engine=float(np.exp(-q.mean())),
            ppl_reference=float(np.exp(-p.mean())),
            ppl_ratio=float(np.exp(p.mean() - q.mean())),
            top1_agreement=float(cat("top1_agree").mean()),
            rms_dp_top=float(np.sqrt((dp**2).mean())),
            non_finite=bad,
        )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _context_length(model_path: Path) -> int | None:
    """max_position_embeddings of a checkpoint directory; None where it cannot be read
    here (a GGUF file), leaving the check to the model."""
    try:
        return int(json.loads((model_path / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _progress(label: str, done: int, total: int, t0: float) -> None:
    print(f"{label}: window {done}/{total}, {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def _check_args(model_path: Path, ctx: int, k: int, max_windows: int | None) -> None:
    if ctx < 2:
        raise ValueError(f"--ctx {ctx}: a window needs at least 2 tokens to score one")
    if k < 1:
        raise ValueError(f"--top-k {k}: must be at least 1")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"--max-windows {max_windows}: must be at least 1")
    limit = _context_length(model_path)
    if limit is not None and ctx > limit:
        raise ValueError(
            f"--ctx {ctx} exceeds the model's context length "
            f"(max_position_embeddings={limit} in {model_path / 'config.json'})"
        )


def make_goldens(
    model_path: Path,
    corpus: str | Path,
    ctx: int,
    k: int,
    logits_fn: LogitsFn,
    out_path: Path,
    progress: bool = True,
    max_windows: int | None = None,
) -> Goldens:
    """Tokenize ``corpus`` with the model's tokenizer (no special tokens), run
    ``logits_fn`` (the reference) over each window and write the goldens file.

    Everything that can be refused is refused before the first window.
    """
    from conform_mlx.models import load_tokenizer, model_digest

    model_path, out_path = Path(model_path), Path(out_path)
    _check_args(model_path, ctx, k, max_windows)
    check_out_path(out_path)
    text = read_corpus(corpus)
    tokenizer = load_tokenizer(model_path)
    if tokenizer is None:
        raise ValueError(
            f"{model_path} has no tokenizer (tokenizer.json, or tokenizer metadata in a GGUF "
            "file), so the corpus cannot be tokenized"
        )
    all_ids = np.asarray(tokenizer.encode(text.text, add_special_tokens=False).ids, np.int32)
    available = len(all_ids) // ctx
    if available == 0:
        raise ValueError(
            f"corpus {text.path}: {len(all_ids)} tokens, fewer than --ctx {ctx}; "
            "give a smaller --ctx or a longer corpus"
        )
    windows = min(available, max_windows or available)
    ids = all_ids[: windows * ctx]
    digest = model_digest(model_path)
    parts, vocab, t0 = [], 0, time.perf_counter()
    for w in range(windows):
        window = ids[w * ctx : (w + 1) * ctx]
        logits = np.asarray(logits_fn(window.tolist()))
        vocab = vocab or logits.shape[-1]
        if logits.shape != (ctx, vocab):
            raise ValueError(f"reference logits: shape {logits.shape}, expected ({ctx}, {vocab})")
        if k > vocab:
            raise ValueError(f"--top-k {k} exceeds the model's vocabulary ({vocab})")
        if not np.isfinite(logits).all():
            raise ValueError(f"the reference gave NaN or inf logits in window {w}")
        parts.append(golden_rows(logits[:-1], window[1:], k))
        if progress:
            _progress("reference", w + 1, windows, t0)
    meta = {
        "format": FORMAT_VERSION,
        "model_path": str(model_path),
        "model_digest": digest,
        "corpus": text.name,
        "corpus_path": str(text.path),
        "corpus_sha256": text.sha256,
        "token_ids_sha256": sha256_ids(ids),
        "corpus_tokens": len(all_ids),
        "ctx": ctx,
        "k": k,
        "vocab": int(vocab),
        "windows": windows,
        "windows_available": available,
        "dropped_tail_tokens": len(all_ids) - available * ctx,
        "transformers": _version("transformers"),
        "torch": _version("torch"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return save_goldens(out_path, meta, ids, GoldenRows.concat(parts))


def judge(goldens: Goldens, logits_fn: LogitsFn, progress: bool = True) -> CorpusMetrics:
    """Score ``logits_fn`` (an engine) against ``goldens``, one window at a time, so
    no more than one window's (ctx, vocab) logits is held at once."""
    scores, t0 = [], time.perf_counter()
    for w in range(goldens.windows):
        ids, gold = goldens.window(w)
        logits = np.asarray(logits_fn(ids))
        if logits.shape != (goldens.ctx, goldens.vocab):
            raise ValueError(
                f"engine logits: shape {logits.shape}, but {goldens.path} holds windows of "
                f"{goldens.ctx} tokens over a vocabulary of {goldens.vocab}"
            )
        scores.append(score_rows(logits[:-1], np.asarray(ids[1:]), gold))
        if progress:
            _progress("kld", w + 1, goldens.windows, t0)
    return summarize(scores, goldens.ctx, goldens.k, goldens.vocab)


def engine_logits_fn(engine, chunk_size: int | None = None) -> LogitsFn:
    """Each window through a fresh cache of ``engine`` (a conform_mlx.engines.Engine)."""

    def logits(ids: list[int]) -> np.ndarray:
        cache = engine.new_cache(max_tokens=len(ids))
        cache.add_sequence(0)
        try:
            return engine.prefill(cache, 0, ids, chunk_size=chunk_size)
        finally:
            cache.release(0)

    return logits


def reference_logits_fn(model_path: Path) -> LogitsFn:
    """The HF float32 reference, loaded at the first window: after make_goldens has
    checked its input, so bad input is refused without waiting for a model load.
    torch is imported here, so ``conform kld`` never imports it."""
    loaded = []

    def logits(ids: list[int]) -> np.ndarray:
        if not loaded:
            from conform_mlx.reference.hf import Reference

            loaded.append(Reference(model_path))
        return loaded[0].logits(ids)

    return logits
