"""The tokenizer a GGUF file stores in its metadata, as a ``tokenizers.Tokenizer``.

Built by transformers' GGUF converter, so this lives with the reference (the one
package that imports transformers).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def gguf_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer in ``path``'s metadata; None when the file has none. A ValueError
    naming the file when transformers cannot build it."""
    import gguf

    if "tokenizer.ggml.model" not in gguf.GGUFReader(path).fields:
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).backend_tokenizer
    except Exception as e:  # transformers raises several kinds for metadata it cannot use
        raise ValueError(f"{path}: its tokenizer metadata cannot be used ({e})") from None
