"""Read a Llama-architecture GGUF file (llama.cpp's format) into HF names.

The config comes from the file's ``llama.*`` metadata. Tensor data comes from
``mx.load``, which keeps Q4_0, Q4_1 and Q8_0 tensors quantized in MLX's own affine
layout (uint32-packed weights, float16 scales and biases, groups of 32 along the
input dimension), so ``mx.quantized_matmul`` runs them as stored. The tensor types
are read first with gguf-py's reader: ``mx.load`` would cast other types to float16
without a word (or fail on some), so any type outside ``TYPES`` is refused by name.

llama.cpp's converter reorders the rows of each head of the Q and K projections
(its RoPE rotates adjacent pairs, HF's rotates the two halves); ``unpermute_heads``
puts them back, on the packed rows, scales and biases alike (the permutation moves
whole output rows, so quantized rows move intact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

GROUP_SIZE = 32  # every GGUF block type kept quantized here has 32 weights per block
# GGUF tensor type -> bits when kept quantized (None: a float type, loaded as floats).
TYPES: dict[str, int | None] = {"F32": None, "F16": None, "Q4_0": 4, "Q4_1": 4, "Q8_0": 8}

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SUFFIXES = (".weight", ".scales", ".biases")


class GGUFError(ValueError):
    """A GGUF file that is unreadable, not a Llama model, or holds a type we do not run."""


def hf_module(gguf_module: str) -> str | None:
    """HF module path of a llama.cpp tensor's module (``blk.3.attn_q`` ->
    ``model.layers.3.self_attn.q_proj``); None for a name we do not know."""
    if gguf_module in _GLOBAL:
        return _GLOBAL[gguf_module]
    parts = gguf_module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _PER_LAYER:
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}"
    return None


def unpermute_heads(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's row order for Q/K: within each head, llama.cpp stores rows as
    (pair, half) where HF has (half, pair)."""
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(rows, -1)


def _reader(path: Path) -> Any:
    import gguf

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except UnicodeDecodeError as e:  # gguf-py decodes keys and tensor names as it reads
        raise GGUFError(f"{path}: a metadata key or tensor name is not UTF-8 ({e})") from None
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on a damaged file
        raise GGUFError(f"{path}: cannot read GGUF header ({e}); truncated or corrupt?") from None
    check_strings(reader, path)
    return reader


def check_strings(reader: Any, path: Path) -> None:
    """Decode every string value (and each element of a string array) of the metadata
    now: gguf-py decodes them only when read, so a value that is not UTF-8 would surface
    later as the codec's bare message. GGUFError names the file and the key."""
    import gguf

    for key, f in reader.fields.items():
        if not f.types or f.types[-1] != gguf.GGUFValueType.STRING:
            continue
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        for i, part in enumerate(f.data):
            try:
                f.parts[part].tobytes().decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"{key}[{i}]" if array else key
                raise GGUFError(f"{path}: metadata {where} is not UTF-8 text ({e})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except UnicodeDecodeError as e:  # a reader not made by _reader: its strings unchecked
        source = getattr(reader.data, "filename", "GGUF file")  # np.memmap's path
        raise GGUFError(f"{source}: metadata {key} is not UTF-8 text ({e})") from None


def _adds_bos(reader: Any) -> bool:
    """Whether prompts start with BOS: the file says so, or else llama.cpp's default
    for its tokenizer kind (SentencePiece "llama" yes, BPE "gpt2" no). Prompts are
    encoded by transformers' GGUF tokenizer, which follows the same rule; the config
    names bos_token_id only for a model that takes one."""
    adds = _field(reader, "tokenizer.ggml.add_bos_token")
    return bool(adds) if adds is not None else _field(reader, "tokenizer.ggml.model") == "llama"


def config_dict(reader: Any, path: Path, names: set[str]) -> dict[str, Any]:
    """An HF-style config.json dict from the ``llama.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r}; only 'llama' GGUF files are supported")
    missing = [
        k
        for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
        if f"llama.{k}" not in reader.fields
    ]
    if missing:
        raise GGUFError(f"{path}: metadata lacks llama.{', llama.'.join(missing)}")
    if "rope_freqs.weight" in names or _field(reader, "llama.rope.scaling.type", "none") != "none":
        raise GGUFError(f"{path}: RoPE scaling in a GGUF file is not supported")
    heads = _field(reader, "llama.attention.head_count")
    hidden = _field(reader, "llama.embedding_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens else None)
    raw = {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _field(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, "llama.attention.head_count_kv", heads),
        "head_dim": _field(reader, "llama.attention.key_length"),
        "vocab_size": vocab,
        "max_position_embeddings": _field(reader, "llama.context_length", 2048),
        "rms_norm_eps": _field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _field(reader, "llama.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id")
        if _adds_bos(reader)
        else None,
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if raw["vocab_size"] is None:
        raise GGUFError(f"{path}: metadata gives no vocabulary size (llama.vocab_size or tokens)")
    return {k: v for k, v in raw.items() if v is not None}


def check_layout(reader: Any, path: Path) -> None:
    """Each tensor's data where GGUF writers put it: at an aligned offset, within the
    file, filling its slot up to the next tensor but for padding. gguf-py accepts a
    tensor whose type or offset was damaged, and its bytes would be read as garbage."""
    align, base = int(reader.alignment), int(reader.data_offset)
    spans = sorted((int(t.data_offset), int(t.n_bytes), t.name) for t in reader.tensors)
    for start, _, name in spans:
        if (start - base) % align:
            raise GGUFError(
                f"{path}: tensor {name}: data offset {start - base} is not a multiple of the "
                f"file's alignment {align}"
            )
    ends = [s for s, _, _ in spans[1:]] + [len(reader.data)]
    for (start, size, name), limit in zip(spans, ends):
        if not 0 <= limit - (start + size) < align:
            raise GGUFError(
                f"{path}: tensor {name}: {size} bytes of data from offset {start - base} do "
                f"not fill its slot of {limit - start} bytes (its type or offset is damaged)"
            )


def read(path: Path) -> tuple[dict[str, Any], dict[str, mx.array], dict[str, dict], str]:
    """(config dict, HF-named arrays, quantization {module: {group_size, bits}}, a
    summary of the tensor types) of a GGUF file. Raises GGUFError naming the file and
    the tensor at fault."""
    reader = _reader(path)
    check_layout(reader, path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    raw = config_dict(reader, path, set(types))
    bad = {n: t for n, t in types.items() if t not in TYPES}
    if bad:
        shown = ", ".join(f"{n} ({t})" for n, t in list(bad.items())[:4])
        raise GGUFError(
            f"{path}: {len(bad)} tensor(s) of a type impl does not run, e.g. {shown}; "
            f"supported: {', '.join(TYPES)} (re-quantize the file to one of them)"
        )
    quant: dict[str, dict] = {}
    for name, t in types.items():
        module = hf_module(name.removesuffix(".weight"))
        if module is None:
            raise GGUFError(f"{path}: tensor {name} is not part of a Llama model")
        if TYPES[t] is not None:
            quant[module] = {"group_size": GROUP_SIZE, "bits": TYPES[t]}
    try:
        arrays = mx.load(str(path))
    except Exception as e:  # MLX raises a bare RuntimeError on a damaged file
        raise GGUFError(f"{path}: cannot read tensor data ({e})") from None
    heads = {"attn_q": raw["num_attention_heads"], "attn_k": raw["num_key_value_heads"]}
    weights: dict[str, mx.array] = {}
    for name, arr in arrays.items():
        stem, suffix = next((name.removesuffix(s), s) for s in _SUFFIXES if name.endswith(s))
        kind = stem.rsplit(".", 1)[-1]
        if kind in heads and arr.ndim == 2:
            if arr.shape[0] % (2 * heads[kind]):
                raise GGUFError(
                    f"{path}: tensor {stem}.weight has {arr.shape[0]} rows, not a whole "
                    f"number of {heads[kind]} heads"
                )
            arr = unpermute_heads(arr, heads[kind])
        weights[f"{hf_module(stem)}{suffix}"] = arr
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    summary = "GGUF " + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items()))
    return raw, weights, quant, summary
