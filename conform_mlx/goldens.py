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
- ``meta``: a JSON string (``META_KEYS``), checked by ``load_goldens``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
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
    if sha256_ids(ids) != meta["token_ids_sha256"]:
        raise GoldensError(f"{path}: field 'ids' does not match meta token_ids_sha256 (damaged?)")
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


def _meta(path: Path, raw: np.ndarray) -> dict:
    try:
        meta = json.loads(str(raw[()]))
    except (ValueError, IndexError) as e:
        raise GoldensError(f"{path}: field 'meta' is not a JSON string ({e})") from None
    if not isinstance(meta, dict):
        raise GoldensError(f"{path}: field 'meta' is not a JSON object")
    if meta.get("format") != FORMAT_VERSION:
        raise GoldensError(
            f"{path}: meta format {meta.get('format')!r}, but this conform reads format "
            f"{FORMAT_VERSION}; make the goldens again with conform reference"
        )
    for key in META_KEYS:
        if key not in meta:
            raise GoldensError(f"{path}: meta field {key!r} missing")
    for key in ("ctx", "k", "vocab", "windows"):
        if not isinstance(meta[key], int) or meta[key] < 1:
            raise GoldensError(f"{path}: meta field {key!r} is {meta[key]!r}, not an int >= 1")
    for key in ("model_path", "model_digest", "corpus", "corpus_path", "corpus_sha256",
                "token_ids_sha256"):  # fmt: skip
        if not isinstance(meta[key], str):
            raise GoldensError(f"{path}: meta field {key!r} is {meta[key]!r}, not a string")
    return meta


def _check_shapes(path: Path, meta: dict, ids: np.ndarray, rows: GoldenRows) -> None:
    ctx, k, windows = meta["ctx"], meta["k"], meta["windows"]
    n = windows * (ctx - 1)
    expected = {
        "ids": (ids, (windows * ctx,), "i"),
        "topk_ids": (rows.topk_ids, (n, k), "i"),
        "topk_logp": (rows.topk_logp, (n, k), "f"),
        "rest_logp": (rows.rest_logp, (n,), "f"),
        "target_logp": (rows.target_logp, (n,), "f"),
    }
    for name, (array, shape, kind) in expected.items():
        if array.shape != shape or array.dtype.kind != kind:
            raise GoldensError(
                f"{path}: field {name!r} is {array.dtype} {array.shape}, expected "
                f"{'int' if kind == 'i' else 'float'} {shape} (windows {windows}, ctx {ctx}, "
                f"k {k})"
            )
    for name, array in (("ids", ids), ("topk_ids", rows.topk_ids)):
        if ((array < 0) | (array >= meta["vocab"])).any():
            raise GoldensError(f"{path}: field {name!r} has ids outside [0, {meta['vocab']})")
    if not (np.isfinite(rows.topk_logp).all() and np.isfinite(rows.target_logp).all()):
        raise GoldensError(f"{path}: field 'topk_logp' or 'target_logp' holds NaN or inf")
    if np.isnan(rows.rest_logp).any() or (rows.rest_logp > 0).any():
        raise GoldensError(f"{path}: field 'rest_logp' holds NaN or a log-probability > 0")
