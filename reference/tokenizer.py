"""transformers' tokenizers: the one a GGUF file stores in its metadata, as a
``tokenizers.Tokenizer``, and the ids AutoTokenizer gives a checkpoint folder's text
(what conform's own prompt encoding must equal).

They live with the reference (the one package that imports transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


def _auto_tokenizer(path: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoTokenizer.from_pretrained(path, **kwargs)


def gguf_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer in ``path``'s metadata; None when the file has none. A ValueError
    naming the file when transformers cannot build it. Its post-processor adds BOS as
    the file's add_bos_token says (llama.cpp's default where it is absent)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py: ValueError, IndexError, or a key that is not UTF-8
        raise ValueError(f"{path}: cannot read its GGUF metadata ({e})") from None
    if "tokenizer.ggml.model" not in reader.fields:
        return None
    _check_strings(reader, path)
    try:
        return _auto_tokenizer(path.parent, gguf_file=path.name).backend_tokenizer
    except Exception as e:  # transformers raises several kinds for metadata it cannot use
        raise ValueError(f"{path}: its tokenizer metadata cannot be used ({e})") from None


def _check_strings(reader: Any, path: Path) -> None:
    """transformers decodes every string of the metadata and, where one is not UTF-8,
    says only the codec's message: decode them here first and name the key (and the
    element of an array, e.g. ``tokenizer.ggml.tokens[7]``)."""
    import gguf

    for key, f in reader.fields.items():
        if not f.types or f.types[-1] != gguf.GGUFValueType.STRING:
            continue
        for i, part in enumerate(f.data):
            try:
                f.parts[part].tobytes().decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"{key}[{i}]" if f.types[0] == gguf.GGUFValueType.ARRAY else key
                raise ValueError(f"{path}: metadata {where} is not UTF-8 text ({e})") from None


def auto_tokenizer_ids(model_dir: Path, text: str) -> list[int]:
    """``AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]``: the ids HF gives
    a checkpoint folder's prompt, special tokens (BOS or none) by the folder's rules."""
    return list(_auto_tokenizer(model_dir)(text)["input_ids"])
