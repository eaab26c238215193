"""GGUF files made by llama.cpp's own quantizer (``llama_model_quantize`` through
llama-cpp-python, the ``llama-cpp`` extra): the K-quant mixes people download
(Q4_K_M, Q5_K_M, Q6_K), for the real-model tests and the corpus table.

llama.cpp picks each tensor's type itself (Q6_K for some tensors in a Q4_K_M file, and
a legacy type for rows that are not a multiple of 256 wide). Starting from an already
quantized file is allowed (``allow_requantize``): the reference de-quantizes whatever
the output holds, so parity does not depend on where the weights came from.
"""

from __future__ import annotations

import ctypes
from pathlib import Path


class QuantizeError(RuntimeError):
    """llama.cpp's quantizer is missing or refused the file."""


def llama_quantize(src: Path, out: Path, ftype: str) -> Path:
    """Write ``src`` (a GGUF file) re-quantized as llama.cpp's ``ftype`` (e.g. "Q4_K_M",
    the suffix of a ``LLAMA_FTYPE_MOSTLY_*`` constant) to ``out``; returns ``out``."""
    try:
        import llama_cpp
    except ImportError:
        raise QuantizeError(
            "llama-cpp-python is not installed (pip install -e '.[llama-cpp]'; docs/engines.md)"
        ) from None
    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}", None)
    if code is None:
        known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp)
                       if n.startswith("LLAMA_FTYPE_MOSTLY_"))  # fmt: skip
        raise QuantizeError(f"unknown llama.cpp file type {ftype!r}; known: {', '.join(known)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.allow_requantize = True
    params.nthread = 0  # all cores
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise QuantizeError(f"llama.cpp could not quantize {src} to {ftype} (return code {rc})")
    return out
