"""What ``conform validate`` reads before its run and writes after it.

Everything here is checked before any model is loaded (a bad flag, tokenizer or
output folder is refused up front, exit status 2), and the report is written whole
or not at all, as strict JSON, under a name that says what was run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from conform_mlx import REPO_ROOT
from conform_mlx.impl.config import LlamaConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_PROMPT = "The quick brown fox"


@dataclass
class Options:
    model: Path
    dtype: str = "float32"
    prompt: str | None = None  # None: DEFAULT_PROMPT
    tokens: list[int] | None = None
    max_new_tokens: int = 5
    block_size: int | None = None  # None: the engine's own; an unpaged engine refuses one
    engine: str = "impl"
    compare: list[str] = field(default_factory=list)  # engines timed beside it
    out_dir: Path = REPO_ROOT / "reports"  # git-ignored; results/ holds curated records
    allow_non_finite: bool = False  # skip the NaN/Inf weight check (to study such a model)


def encode_prompt(
    model_dir: Path, tokenizer: Tokenizer | None, opts: Options
) -> tuple[list[int], str]:
    """Token ids and a description of where they came from. Text is encoded as the
    model's tokenizer encodes it, BOS or none by its own rules (see load_tokenizer):
    nothing is added by hand, so the ids equal HF AutoTokenizer's (a config's
    bos_token_id says nothing about whether a prompt takes one)."""
    if opts.tokens is not None:
        return list(opts.tokens), "given ids"
    if opts.prompt == "":
        raise ValueError("--prompt is empty; give some text, or --tokens IDS")
    text = DEFAULT_PROMPT if opts.prompt is None else opts.prompt
    if tokenizer is None:
        what = f"the default prompt {text!r}" if opts.prompt is None else "--prompt"
        raise ValueError(
            f"{model_dir} has no tokenizer (tokenizer.json, or tokenizer metadata in a GGUF "
            f"file), so {what} cannot be encoded; pass --tokens IDS"
        )
    ids = tokenizer.encode(text).ids
    if not ids:
        raise ValueError(f"--prompt {text!r} encodes to no tokens; pass --tokens IDS")
    return ids, f"{text!r}"


def check_run_size(
    cfg: LlamaConfig, prompt_len: int, max_new_tokens: int, block_size: int | None
) -> None:
    """Refuse lengths before any cache is sized from them: a pool is allocated whole,
    so --block-size 100000000 asks for 51 GB and the process is killed, not refused."""
    ctx = cfg.max_position_embeddings
    if max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if prompt_len + max_new_tokens - 1 > ctx:  # the last token is never fed back
        raise ValueError(
            f"--max-new-tokens {max_new_tokens}: a prompt of {prompt_len} tokens + "
            f"{max_new_tokens} new tokens exceeds the context length "
            f"max_position_embeddings={ctx}"
        )
    if block_size is None:
        return
    if block_size <= 0:
        raise ValueError(f"--block-size must be positive, got {block_size}")
    if block_size > ctx:
        raise ValueError(
            f"--block-size {block_size} is larger than the model's context length "
            f"max_position_embeddings={ctx}"
        )
    need = prompt_len + max_new_tokens
    # Powers of two are the usual block sizes; up to the next one above the run's
    # length costs at most twice the slots it needs.
    most = 1 << (need - 1).bit_length()
    if block_size > most:
        raise ValueError(
            f"--block-size {block_size} is larger than this run needs: {prompt_len} prompt + "
            f"{max_new_tokens} new tokens = {need} slots (at most {most}, the next power of "
            "two, is accepted)"
        )


def check_out_dir(out_dir: Path) -> None:
    """Make --out-dir and check it takes files, before the run: a report that cannot
    be written after the run is the run lost."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir {out_dir}: cannot create it ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--out-dir {out_dir}: not writable")


def check_vocab(ids: list[int], vocab: int) -> None:
    """Refuse ids outside the vocabulary before any engine sees them (an MLX gather
    out of range returns garbage rather than an error)."""
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise ValueError(f"token id {t} at index {i} is outside the vocabulary [0, {vocab})")


def run_digest(model_dir: Path, prompt: list[int], max_new_tokens: int) -> str:
    """8 hex digits of sha256 over what a report's name cannot show: the model's
    absolute path (two folders of the same name), the prompt ids and the run length."""
    key = json.dumps([str(Path(model_dir).resolve()), prompt, max_new_tokens])
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def report_name(report: dict) -> str:
    """validate-<model>-<dtype>[-bs<block size>]-<engine>-<digest>.json: what was run,
    so runs that differ in any of it do not overwrite each other."""

    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)

    bs = "" if report["block_size"] is None else f"-bs{report['block_size']}"
    model, engine = safe(Path(report["model_dir"]).name), safe(report["engine"]["name"])
    return f"validate-{model}-{report['dtype']}{bs}-{engine}-{report['digest']}.json"


def write_json(report: dict, out_dir: Path, name: str | None = None) -> Path:
    """Write the report as strict JSON (no NaN or Infinity) to out_dir/name (default
    ``report_name(report)``), whole or not at all (``write_atomic``)."""
    path = out_dir / (name or report_name(report))
    data = (json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n").encode()
    write_atomic(path, lambda f: f.write(data))
    return path


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into a temporary file, then os.replace: a crash or a full disk
    leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def strict_json(x: Any) -> Any:
    """``x`` with numpy scalars as Python ones and every non-finite float as None:
    JSON has no NaN or Infinity, and strict parsers reject the bare NaN Python writes
    (a report says why a value is missing, e.g. parity's ``non_finite``)."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
