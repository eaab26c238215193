"""Read a Llama-architecture GGUF file (llama.cpp's format) into HF names.

The config comes from the file's ``llama.*`` metadata, the tensors from gguf-py's
reader. A block type whose weights are ``scale * q + bias`` over groups of 32 (Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, and the K-quants Q4_K, Q5_K and Q8_K, whose 32-wide sub-blocks
carry their own scale and min) is repacked into MLX's affine layout, bit for bit, and
runs through ``mx.quantized_matmul``. Q2_K, Q3_K and Q6_K scale 16-wide sub-blocks,
narrower than any MLX group: gguf-py de-quantizes them to float32 at load, and the
summary says so. Any other type is refused by name (``TYPES``).

llama.cpp's converter reorders the rows of each head of the Q and K projections
(its RoPE rotates adjacent pairs, HF's rotates the two halves); ``unpermute_heads``
puts them back, on the packed rows, scales and biases alike (the permutation moves
whole output rows, so quantized rows move intact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

GROUP_SIZE = 32  # the MLX group of every type kept quantized
# Block types kept quantized -> bits of a weight in MLX's affine layout.
AFFINE_BITS = {
    "Q4_0": 4,
    "Q4_1": 4,
    "Q5_0": 5,
    "Q5_1": 5,
    "Q8_0": 8,
    "Q4_K": 4,
    "Q5_K": 5,
    "Q8_K": 8,
}
FLOATS = ("F32", "F16", "BF16")
DEQUANTIZED = ("Q2_K", "Q3_K", "Q6_K")  # de-quantized to float32 at load
TYPES = (*FLOATS, *AFFINE_BITS, *DEQUANTIZED)

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
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if "rope_freqs.weight" in names:
        raise GGUFError(
            f"{path}: RoPE scaling per-frequency factors (rope_freqs) in a GGUF file is not "
            "supported"
        )
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} in a GGUF file is not supported")
    if _field(reader, "llama.rope.scale_linear", 1.0) != 1.0:  # the older key llama.cpp reads
        raise GGUFError(f"{path}: RoPE scaling by llama.rope.scale_linear is not supported")
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
    if scaling == "linear":
        factor = _field(reader, "llama.rope.scaling.factor")
        raw["rope_scaling"] = {"rope_type": "linear", "factor": factor}
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
    heads = {"attn_q": raw["num_attention_heads"], "attn_k": raw["num_key_value_heads"]}
    quant: dict[str, dict] = {}
    weights: dict[str, mx.array] = {}
    for tensor in reader.tensors:
        stem = tensor.name.removesuffix(".weight")
        module = hf_module(stem)
        if module is None:
            raise GGUFError(f"{path}: tensor {tensor.name} is not part of a Llama model")
        kind = types[tensor.name]
        try:
            arrays = tensor_arrays(tensor.data, kind)
        except ValueError as e:  # a shape the block type cannot hold
            raise GGUFError(f"{path}: tensor {tensor.name} ({kind}): {e}") from None
        if kind in AFFINE_BITS:
            quant[module] = {"group_size": GROUP_SIZE, "bits": AFFINE_BITS[kind]}
        part = stem.rsplit(".", 1)[-1]
        for suffix, arr in arrays.items():
            if part in heads and arr.ndim == 2:
                if arr.shape[0] % (2 * heads[part]):
                    raise GGUFError(
                        f"{path}: tensor {tensor.name} has {arr.shape[0]} rows, not a whole "
                        f"number of {heads[part]} heads"
                    )
                arr = unpermute_heads(arr, heads[part])
            weights[f"{module}.{suffix}"] = arr
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    summary = "GGUF " + ", ".join(
        f"{t} x{n}" + (" (de-quantized to float32 at load)" if t in DEQUANTIZED else "")
        for t, n in sorted(counts.items())
    )
    return raw, weights, quant, summary


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of every block, as float32 (..., 1)."""
    return blocks[..., at : at + 2].copy().view(np.float16).astype(np.float32)


def k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins. Bytes 0-7 hold
    scales and mins 0-3 in their low 6 bits; bytes 8-11 the low nibbles of 4-7, whose
    top 2 bits sit in the top bits of bytes 0-7."""
    b = packed.astype(np.int32)
    top = b[..., 0:8] >> 6
    sc = np.concatenate([b[..., 0:4] & 63, (b[..., 8:12] & 0xF) | top[..., 0:4] << 4], -1)
    m = np.concatenate([b[..., 4:8] & 63, (b[..., 8:12] >> 4) | top[..., 4:8] << 4], -1)
    return sc, m


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., n) bytes -> (..., 2n): the low nibbles, then the high ones."""
    return np.concatenate([qs & 0xF, qs >> 4], -1)


def affine_blocks(blocks: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks (rows, n_blocks, block bytes) of an ``AFFINE_BITS`` type -> (q, scale,
    bias): q (rows, n) unsigned, scale and bias float32 (rows, n // 32), so that weight
    i is scale[i // 32] * q[i] + bias[i // 32] exactly as llama.cpp de-quantizes it."""
    rows = blocks.shape[0]
    if kind in ("Q8_0", "Q8_K"):  # int8 q, one scale: q + 128 unsigned, bias -128 scale
        d, q = (
            (_f16(blocks, 0), blocks[..., 2:])
            if kind == "Q8_0"
            else (blocks[..., 0:4].copy().view(np.float32), blocks[..., 4:260])
        )
        q = q.view(np.int8).astype(np.int16) + 128
        groups = q.shape[-1] // GROUP_SIZE
        scale = np.repeat(d, groups, -1)
        return q.reshape(rows, -1), scale.reshape(rows, -1), (-128 * scale).reshape(rows, -1)
    if kind in ("Q4_K", "Q5_K"):  # 256 weights: d, dmin, 12 scale bytes, [qh 32], qs 128
        sc, m = k_scales(blocks[..., 4:16])
        qs = blocks[..., -128:].reshape(rows, -1, 4, 32)  # each 64 weights in 32 bytes
        q = np.stack([qs & 0xF, qs >> 4], -2).reshape(rows, -1, 8, 32)
        if kind == "Q5_K":  # the fifth bit of sub-block j's weight l: bit j of qh[l]
            qh = blocks[..., 16:48]
            q = q | ((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
        scale = _f16(blocks, 0) * sc
        bias = -_f16(blocks, 2) * m
        return q.reshape(rows, -1), scale.reshape(rows, -1), bias.reshape(rows, -1)
    # Q4_0, Q4_1, Q5_0, Q5_1: 32 weights, d, [m], [qh: 32 fifth bits], 16 bytes of nibbles
    d = _f16(blocks, 0)
    has_min = kind in ("Q4_1", "Q5_1")
    at = 4 if has_min else 2
    q = _nibbles(blocks[..., at + 4 * (kind[1] == "5") :])
    if kind[1] == "5":
        q = q | np.unpackbits(blocks[..., at : at + 4], axis=-1, bitorder="little") << 4
    bias = _f16(blocks, 2) if has_min else -(8 if kind == "Q4_0" else 16) * d
    return q.reshape(rows, -1), d.reshape(rows, -1), bias.reshape(rows, -1)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values (rows, n) -> MLX's packing: (rows, n * bits // 32)
    uint32, value i at bit offset i * bits of the row's little-endian bit stream.
    Eight values fill ``bits`` bytes exactly, so each eight are joined in a uint64
    whose low ``bits`` bytes are theirs (4 and 8 bits: whole bytes, joined directly)."""
    q = q.astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(q).view(np.uint32)
    if bits == 4:
        return np.ascontiguousarray(q[:, 0::2] | q[:, 1::2] << 4).view(np.uint32)
    eight = q.reshape(q.shape[0], -1, 8).astype(np.uint64)
    joined = (eight << (np.arange(8, dtype=np.uint64) * np.uint64(bits))).sum(-1, dtype=np.uint64)
    as_bytes = joined[..., None].view(np.uint8)[..., :bits]  # little-endian
    return np.ascontiguousarray(as_bytes).reshape(q.shape[0], -1).view(np.uint32)


def tensor_arrays(data: np.ndarray, kind: str) -> dict[str, mx.array]:
    """A tensor's data as gguf-py reads it (floats, or rows of block bytes) -> the
    arrays impl loads: {"weight"} of floats, or {"weight", "scales", "biases"} packed."""
    import gguf

    if kind in ("F32", "F16"):
        return {"weight": mx.array(np.ascontiguousarray(data))}
    qtype = gguf.GGMLQuantizationType[kind]
    if kind not in AFFINE_BITS:  # BF16 and the 16-wide K-quants
        return {"weight": mx.array(gguf.quants.dequantize(data, qtype))}
    if data.ndim != 2:
        raise ValueError(f"a {kind} tensor must be 2-D rows of blocks, got shape {data.shape}")
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    with np.errstate(invalid="ignore", over="ignore"):  # a damaged scale: check_finite names it
        q, scale, bias = affine_blocks(data.reshape(data.shape[0], -1, block_bytes), kind)
    return {
        "weight": mx.array(pack(q.astype(np.uint8), AFFINE_BITS[kind])),
        "scales": mx.array(scale),
        "biases": mx.array(bias),
    }
