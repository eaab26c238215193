"""The goldens file: the reference's side of a corpus run, stored so that an engine
can be judged later with no torch and no tokenizer (see conform_mlx.kld, docs/kld.md).

One ``.npz`` (zip of arrays, read with ``allow_pickle=False``):

- ``ids`` (windows * ctx,) int32: every window's token ids, back to back;
- ``topk_ids`` (P, k) int32 and ``topk_logp`` (P, k) float32: per scored position
  (P = windows * (ctx - 1)) the reference's k most likely next tokens and their
  log-softmax, largest first;
- ``rest_logp`` (P,) float32: log of the probability of every other token (-inf when
  k == vocab), summed directly rather than as 1 - sum(top-k), which would lose it;
- ``target_logp`` (P,) float32: the reference's log-prob of the actual next token;
- ``meta``: a JSON string (``META_KEYS``, each typed in ``META_TYPES``).

``load_goldens`` checks all of it before any window runs: every meta field's type and
range and how the counts agree, each array's dtype and shape against meta, and the
values (ids in the vocabulary, log-probs <= 0 and summing to 1, each row's top-k
distinct and largest first, target_logp agreeing with them); a GoldensError (a
ValueError, exit status 2) names the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from conform_mlx.validate_io import write_atomic

FORMAT_VERSION = 1
META_KEYS = (
    "format", "model_path", "model_digest", "corpus", "corpus_path", "corpus_sha256",
    "token_ids_sha256", "corpus_tokens", "ctx", "k", "vocab", "windows",
    "windows_available", "dropped_tail_tokens", "transformers", "torch", "created",
)  # fmt: skip
ROW_FIELDS = ("topk_ids", "topk_logp", "rest_logp", "target_logp")
# |log(sum of a row's top-k and rest probabilities)| allowed: float32 rounding is ~1e-7.
MASS_TOLERANCE = 1e-4


class GoldensError(ValueError):
    """A goldens file that cannot be used: unreadable, malformed, or made from another
    model, corpus or format. The message names the file and the field."""


@dataclass(frozen=True)
class GoldenRows:
    """The reference's side of some scored positions."""

    topk_ids: np.ndarray  # (n, k) int32, by logp, largest first
    topk_logp: np.ndarray  # (n, k) float32
    rest_logp: np.ndarray  # (n,) float32
    target_logp: np.ndarray  # (n,) float32

    def __getitem__(self, rows: slice) -> GoldenRows:
        return GoldenRows(*(getattr(self, f)[rows] for f in ROW_FIELDS))

    @staticmethod
    def concat(parts: list[GoldenRows]) -> GoldenRows:
        return GoldenRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ROW_FIELDS))


@dataclass(frozen=True)
class Goldens:
    path: Path
    meta: dict
    ids: np.ndarray  # (windows * ctx,) int32
    rows: GoldenRows  # (windows * (ctx - 1), ...)

    @property
    def ctx(self) -> int:
        return self.meta["ctx"]

    @property
    def k(self) -> int:
        return self.meta["k"]

    @property
    def vocab(self) -> int:
        return self.meta["vocab"]

    @property
    def windows(self) -> int:
        return self.meta["windows"]

    def window(self, w: int) -> tuple[list[int], GoldenRows]:
        """Window w's ctx token ids and the GoldenRows of its ctx - 1 scored positions."""
        n = self.ctx - 1
        return self.ids[w * self.ctx : (w + 1) * self.ctx].tolist(), self.rows[w * n : (w + 1) * n]


def sha256_ids(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i4").tobytes()).hexdigest()


def check_out_path(path: Path, flag: str = "--out") -> None:
    """Refuse, before the run, an output file that could not be written after it."""
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create its folder ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: its folder is not writable")


def save_goldens(path: Path, meta: dict, ids: np.ndarray, rows: GoldenRows) -> Goldens:
    arrays = {"ids": ids, **{f: getattr(rows, f) for f in ROW_FIELDS}}
    meta_text = np.array(json.dumps(meta))
    write_atomic(path, lambda f: np.savez_compressed(f, meta=meta_text, **arrays))
    return Goldens(path, meta, ids, rows)


def load_goldens(
    path: Path, model_path: Path | None = None, corpus_text: str | bytes | None = None
) -> Goldens:
    """Read and check a goldens file; GoldensError names the file and the field.

    With ``model_path``, refuse goldens made from another model (by digest); with
    ``corpus_text``, refuse goldens made from another text (by sha256 of its UTF-8).
    """
    path = Path(path)
    if not path.is_file():
        raise GoldensError(f"{path}: no such goldens file (make one with conform reference)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise GoldensError(f"{path}: not a goldens file, or truncated ({e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise GoldensError(f"{path}: one .npy array, not a goldens file (an .npz of several)")
    with npz:
        fields = {name: _field(npz, path, name) for name in ("meta", "ids", *ROW_FIELDS)}
    meta = _meta(path, fields.pop("meta"))
    ids = fields.pop("ids")
    rows = GoldenRows(**fields)
    _check_shapes(path, meta, ids, rows)
    _check_corpus_tokens(path, meta)
    if model_path is not None:
        from conform_mlx.models import model_digest

        digest = model_digest(Path(model_path))
        if digest != meta["model_digest"]:
            raise GoldensError(
                f"{path}: made from another model (model_digest {meta['model_digest'][:12]}, "
                f"{meta['model_path']}); {model_path} has digest {digest[:12]}. Make goldens "
                "for this model with conform reference"
            )
    goldens = Goldens(path, meta, ids, rows)
    if corpus_text is not None:
        check_corpus(goldens, corpus_text)
    return goldens


def check_corpus(goldens: Goldens, corpus_text: str | bytes) -> None:
    """Refuse goldens made from another text than ``corpus_text`` (str as UTF-8)."""
    data = corpus_text.encode() if isinstance(corpus_text, str) else corpus_text
    digest, meta = hashlib.sha256(data).hexdigest(), goldens.meta
    if digest != meta["corpus_sha256"]:
        raise GoldensError(
            f"{goldens.path}: made from another text of corpus {meta['corpus']!r} "
            f"(corpus_sha256 {meta['corpus_sha256'][:12]}; the corpus given has {digest[:12]}): "
            "the corpus was edited, or is not the one these goldens were made from"
        )


def _field(npz, path: Path, name: str) -> np.ndarray:
    if name not in npz.files:
        raise GoldensError(f"{path}: field {name!r} missing")
    try:
        return npz[name]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise GoldensError(f"{path}: field {name!r} cannot be read ({e})") from None


def _count(low: int) -> tuple[Callable[[object], bool], str]:
    return (lambda v: type(v) is int and v >= low), f"an int >= {low}"  # bool is no count


def _text(v: object) -> bool:
    return isinstance(v, str) and v != "" and "\x00" not in v


def _iso_time(v: object) -> bool:
    try:
        return isinstance(v, str) and bool(datetime.fromisoformat(v))
    except ValueError:
        return False


_TEXT = (_text, "a non-empty string")
_SHA256 = (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None,
           "a sha256 (64 lowercase hex digits)")  # fmt: skip
_VERSION = (lambda v: v is None or _text(v), "a version string or null")
# What save_goldens's caller (conform_mlx.kld.make_goldens) writes, field by field;
# "format" is checked first, on its own.
META_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "model_path": _TEXT, "model_digest": _SHA256, "corpus": _TEXT, "corpus_path": _TEXT,
    "corpus_sha256": _SHA256, "token_ids_sha256": _SHA256, "corpus_tokens": _count(1),
    "ctx": _count(1), "k": _count(1), "vocab": _count(1), "windows": _count(1),
    "windows_available": _count(1), "dropped_tail_tokens": _count(0),
    "transformers": _VERSION, "torch": _VERSION, "created": (_iso_time, "an ISO 8601 time"),
}  # fmt: skip


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _meta(path: Path, raw: np.ndarray) -> dict:
    """The meta field, every key's type and range checked (META_TYPES), and how the
    counts must agree with each other; the arrays are checked against it after."""
    if raw.dtype.kind != "U" or raw.shape != ():
        raise GoldensError(f"{path}: field 'meta' is {raw.dtype} {raw.shape}, not a JSON string")
    try:
        meta = json.loads(str(raw[()]))
    except ValueError as e:
        raise GoldensError(f"{path}: field 'meta' is not a JSON string ({e})") from None
    if not isinstance(meta, dict):
        raise GoldensError(f"{path}: field 'meta' is not a JSON object")
    fmt = meta.get("format")
    if type(fmt) is not int:  # True == 1 == 1.0: only the int is a format
        raise GoldensError(f"{path}: meta field 'format' is {_show(fmt)}, not an int")
    if fmt != FORMAT_VERSION:
        raise GoldensError(
            f"{path}: meta format {fmt!r}, but this conform reads format "
            f"{FORMAT_VERSION}; make the goldens again with conform reference"
        )
    for key in META_KEYS:
        if key not in meta:
            raise GoldensError(f"{path}: meta field {key!r} missing")
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise GoldensError(
            f"{path}: meta field {unknown[0]!r} is not one of format {FORMAT_VERSION}'s "
            "(edited, or made by another conform?)"
        )
    for key, (ok, what) in META_TYPES.items():
        if not ok(meta[key]):
            raise GoldensError(f"{path}: meta field {key!r} is {_show(meta[key])}, not {what}")
    ctx, k, vocab, windows = meta["ctx"], meta["k"], meta["vocab"], meta["windows"]
    available, dropped = meta["windows_available"], meta["dropped_tail_tokens"]
    if ctx < 2:
        raise GoldensError(f"{path}: meta field 'ctx' is {ctx}; a window needs at least 2 tokens")
    if k > vocab:
        raise GoldensError(f"{path}: meta field 'k' is {k}, more than field 'vocab' ({vocab})")
    if available < windows:
        raise GoldensError(
            f"{path}: meta field 'windows_available' is {available}, fewer than field "
            f"'windows' ({windows})"
        )
    if dropped >= ctx:
        raise GoldensError(
            f"{path}: meta field 'dropped_tail_tokens' is {dropped}, not fewer than field "
            f"'ctx' ({ctx})"
        )
    return meta


def _check_corpus_tokens(path: Path, meta: dict) -> None:
    """After the arrays have confirmed ctx: the corpus's token count is its windows,
    and its dropped tail."""
    ctx, available, dropped = meta["ctx"], meta["windows_available"], meta["dropped_tail_tokens"]
    if meta["corpus_tokens"] != available * ctx + dropped:
        raise GoldensError(
            f"{path}: meta field 'corpus_tokens' is {meta['corpus_tokens']}, but fields "
            f"'windows_available' x 'ctx' + 'dropped_tail_tokens' = {available} x {ctx} + "
            f"{dropped} = {available * ctx + dropped}"
        )


def _check_shapes(path: Path, meta: dict, ids: np.ndarray, rows: GoldenRows) -> None:
    """Each array's shape and dtype against meta (as save_goldens writes them), then its
    values: ids in the vocabulary, log-probs <= 0, each row's top-k distinct tokens
    largest first, top-k + rest summing to 1, and target_logp agreeing with topk_logp."""
    ctx, k, windows = meta["ctx"], meta["k"], meta["windows"]
    n = windows * (ctx - 1)
    expected = {
        "ids": (ids, (windows * ctx,), np.int32),
        "topk_ids": (rows.topk_ids, (n, k), np.int32),
        "topk_logp": (rows.topk_logp, (n, k), np.float32),
        "rest_logp": (rows.rest_logp, (n,), np.float32),
        "target_logp": (rows.target_logp, (n,), np.float32),
    }
    for name, (array, shape, dtype) in expected.items():
        kind = np.dtype(dtype).kind
        if array.shape != shape or array.dtype.kind != kind:
            raise GoldensError(
                f"{path}: field {name!r} is {array.dtype} {array.shape}, expected "
                f"{'int' if kind == 'i' else 'float'} {shape} (windows {windows}, ctx {ctx}, "
                f"k {k})"
            )
        if array.dtype != dtype:
            raise GoldensError(
                f"{path}: field {name!r} is {array.dtype}, expected {np.dtype(dtype)} "
                "(as conform reference writes it)"
            )
    for name, array in (("ids", ids), ("topk_ids", rows.topk_ids)):
        if ((array < 0) | (array >= meta["vocab"])).any():
            raise GoldensError(f"{path}: field {name!r} has ids outside [0, {meta['vocab']})")
    if sha256_ids(ids) != meta["token_ids_sha256"]:  # before the rows are checked against ids
        raise GoldensError(f"{path}: field 'ids' does not match meta token_ids_sha256 (damaged?)")
    for name in ("topk_logp", "target_logp"):
        array = getattr(rows, name)
        if not np.isfinite(array).all() or (array > 0).any():
            raise GoldensError(f"{path}: field {name!r} holds NaN, inf or a log-probability > 0")
    if np.isnan(rows.rest_logp).any() or (rows.rest_logp > 0).any():
        raise GoldensError(f"{path}: field 'rest_logp' holds NaN or a log-probability > 0")
    if (np.diff(np.sort(rows.topk_ids, axis=-1), axis=-1) == 0).any():
        raise GoldensError(f"{path}: field 'topk_ids' repeats a token within a row")
    if (np.diff(rows.topk_logp, axis=-1) > 0).any():
        raise GoldensError(f"{path}: field 'topk_logp' is not largest first in every row")
    logp = np.concatenate([rows.topk_logp, rows.rest_logp[:, None]], -1).astype(np.float64)
    top = logp.max(-1, keepdims=True)
    mass = np.log(np.exp(logp - top).sum(-1)) + top[:, 0]
    if (np.abs(mass) > MASS_TOLERANCE).any():
        row = int(np.argmax(np.abs(mass)))
        raise GoldensError(
            f"{path}: fields 'topk_logp' and 'rest_logp' do not sum to probability 1 "
            f"(row {row}: log of the sum {mass[row]:.3g})"
        )
    targets = ids.reshape(windows, ctx)[:, 1:].reshape(-1)
    hit = rows.topk_ids == targets[:, None]
    in_top = hit.any(-1)
    at_target = rows.topk_logp[np.arange(n), hit.argmax(-1)]
    wrong = np.where(
        in_top, rows.target_logp != at_target, rows.target_logp > rows.topk_logp[:, -1]
    )
    if wrong.any():
        raise GoldensError(
            f"{path}: field 'target_logp' disagrees with 'topk_logp' at the next token "
            f"(row {int(np.argmax(wrong))})"
        )
