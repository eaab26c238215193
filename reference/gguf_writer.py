"""Write a HuggingFace Llama checkpoint as a GGUF file, the way llama.cpp's converter
lays it out: its tensor names, Q and K rows reordered for its RoPE, quantized by
gguf-py (not by MLX, so the engine's reader is tested against another writer).

For the suites: small GGUF files of the committed checkpoints in Q4_0, Q4_1 and Q8_0,
with the output projection tied to a quantized token embedding or not, plus damaged
variants for the bad-input tests; K-quant files through our own encoder
(``reference/kquants.py``), falling back as llama.cpp's quantizer does for rows that
are not a multiple of 256 wide. Real GGUF models come from elsewhere (``conform
validate --model smollm2-135m``).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.torch import load_file

from conform_mlx.reference import kquants

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_PER_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# The type llama.cpp's quantizer writes instead of a K-quant for a row whose width is
# not a multiple of 256 (its IQ4_NL for Q2_K and Q3_K, which no reader here takes, is
# Q5_0 here).
K_FALLBACK = {
    "Q2_K": "Q5_0",
    "Q3_K": "Q5_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "Q8_K": "Q8_0",
}


# general.file_type of a file whose matrices are all one type (llama.cpp reports it).
FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    **{t: gguf.LlamaFileType[f"MOSTLY_{t}"] for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")},
}


def encode(arr: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Rows ``arr`` as a GGUF tensor of ``qtype`` (or its fallback): (data, type)."""
    if qtype in kquants.BLOCK_BYTES:
        if arr.shape[1] % kquants.QK == 0:
            return kquants.quantize(arr, qtype)[0], gguf.GGMLQuantizationType[qtype]
        qtype = K_FALLBACK[qtype]
    t = gguf.GGMLQuantizationType[qtype]
    return gguf.quants.quantize(arr, t), t


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, *module, kind = hf_name.split(".")  # model.layers.N.<module>.weight|bias
    return f"blk.{layer}.{_PER_LAYER['.'.join(module)]}.{kind}"


def rope_factors(cfg: dict) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` tensor for Llama 3 RoPE scaling: each rotated pair's
    frequency divisor, default over scaled, the scaled ones from transformers' own
    function; None for unscaled RoPE. Either config layout (``rope_parameters``, or the
    older top-level ``rope_scaling``)."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = LlamaConfig.from_dict(cfg).rope_parameters
    if rope.get("rope_type", "default") in ("default", "linear"):  # linear: metadata only
        return None
    if rope["rope_type"] != "llama3":
        raise ValueError(
            f"RoPE type {rope['rope_type']!r} has no GGUF form here (linear and llama3 only)"
        )
    config = LlamaConfig.from_dict(cfg)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    d = config.head_dim
    base = 1.0 / (rope["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    return (base / scaled).numpy().astype(np.float32)


def permute_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for Q/K: per head, HF's (half, pair) rows become
    (pair, half), so adjacent rows hold the two halves of one rotated pair."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    hf_dir: Path,
    out: Path,
    qtype: str = "Q4_0",
    *,
    embed_qtype: str | None = None,
    qtypes: dict[str, str] | None = None,
    tied: bool = False,
    vocab: bool = False,
    architecture: str = "llama",
    permute: bool = True,
) -> Path:
    """Write ``hf_dir`` (config.json + model.safetensors, float) to the GGUF file ``out``.

    Every 2-D weight is stored as ``qtype`` (the token embedding as ``embed_qtype``,
    default the same; ``qtypes`` maps a GGUF name part such as ``attn_v`` or ``output``
    to another type, as llama.cpp's mixed files do); norms stay F32. K-quant rows that
    are not 256 wide fall back (``K_FALLBACK``). ``tied`` drops ``output.weight``, so the model
    reads its logits off the (quantized) token embedding. ``vocab`` adds a byte-level
    SentencePiece vocabulary (ids below 256 are bytes), which llama.cpp needs to load a
    file at all. ``architecture`` and
    ``permute=False`` exist to make files a correct reader must refuse or misread.
    """
    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):  # one file or HF's shards
        # through torch: numpy has no bfloat16
        tensors.update({n: t.float().numpy() for n, t in load_file(shard).items()})
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    w = gguf.GGUFWriter(str(out), architecture)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if not qtypes:  # one type throughout: name it, as llama.cpp's writer does
        w.add_file_type(FILE_TYPES.get(qtype, gguf.LlamaFileType.GUESSED))
    if vocab:
        n = cfg["vocab_size"]
        w.add_tokenizer_model("llama")
        w.add_token_list([f"<0x{i:02X}>" if i < 256 else f"t{i}" for i in range(n)])
        w.add_token_scores([0.0] * n)
        w.add_token_types([6 if i < 256 else 1 for i in range(n)])  # 6: byte, 1: normal
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    factors = rope_factors(cfg)
    if factors is not None:
        w.add_tensor("rope_freqs.weight", factors)
    scaling = {**(cfg.get("rope_scaling") or {}), **rope}  # either config layout
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    for name, arr in tensors.items():
        if tied and name == "lm_head.weight":
            continue
        arr = arr.astype(np.float32)
        if permute and ".q_proj." in name:
            arr = permute_heads(arr, heads)
        if permute and ".k_proj." in name:
            arr = permute_heads(arr, kv_heads)
        if arr.ndim == 1:
            w.add_tensor(gguf_name(name), arr)
            continue
        kind = embed_qtype if name == "model.embed_tokens.weight" and embed_qtype else qtype
        part = gguf_name(name).removesuffix(".weight").rsplit(".", 1)[-1]
        kind = (qtypes or {}).get(part, kind)
        data, t = encode(arr, kind)
        w.add_tensor(gguf_name(name), data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
