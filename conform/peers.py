"""Other engines timed on the same checkpoint and prompt, for ratios taken in one run."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np


def time_mlx_lm(model_dir: Path, dtype: mx.Dtype, prompt: list[int], max_new_tokens: int) -> dict:
    """Greedy generation through mlx-lm with its own KV cache, timed like ours.

    One untimed warm-up run first, as for our engine. Needs the ``peers`` extra.
    """
    try:
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model
    except ImportError as e:
        raise RuntimeError("mlx-lm is not installed: pip install -e '.[peers]'") from e
    import mlx_lm

    model, _ = load_model(Path(model_dir))
    model.set_dtype(dtype)

    def run(n_new: int) -> tuple[list[int], float, list[float]]:
        cache = make_prompt_cache(model)
        t0 = time.perf_counter()
        logits = model(mx.array(prompt)[None], cache=cache)
        tokens = [int(np.argmax(np.array(logits[0, -1].astype(mx.float32))))]
        prefill_ms = (time.perf_counter() - t0) * 1e3
        decode_ms = []
        while len(tokens) < n_new:
            t0 = time.perf_counter()
            logits = model(mx.array([[tokens[-1]]]), cache=cache)
            tokens.append(int(np.argmax(np.array(logits[0, -1].astype(mx.float32)))))
            decode_ms.append((time.perf_counter() - t0) * 1e3)
        return tokens, prefill_ms, decode_ms

    run(min(2, max_new_tokens))
    tokens, prefill_ms, decode_ms = run(max_new_tokens)
    return {
        "engine": f"mlx-lm {mlx_lm.__version__}",
        "tokens": tokens,
        "prefill_ms": prefill_ms,
        "decode_ms": decode_ms,
    }
