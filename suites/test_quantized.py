"""Quantized checkpoints: GGUF files (Q4_0, Q4_1, Q8_0) and mlx-lm's quantized format.

The files are made here from the committed trained checkpoint: GGUF by gguf-py
(``reference/gguf_writer.py``, llama.cpp's layout), mlx-lm's format by mlx-lm's own
converter. The reference runs HF transformers in float32 on the de-quantized weights
(transformers' GGUF loader; ``reference.hf.unpack_affine`` for mlx-lm's format). The
weights are the same numbers on both sides, so with float32 activations the engine
under test must agree as tightly as float32 arithmetic does: the float32 NMSE limit
of the float models (suites/tolerances.py). Measured on the trained checkpoint,
prefill 7 + decode 33: NMSE 5e-13 to 7e-13 for every format here; SmolLM2-135M Q4_1
(32 random ids): 2.8e-12.

mlx-lm's affine format is checked on every width and group size MLX takes (bits 2, 3,
4, 5, 6, 8 x groups 32, 64, 128) on a random checkpoint whose every input dimension
is a multiple of 128, so mlx-lm quantizes every module at every group size; the
reference's unpacker is checked bit for bit against ``mx.dequantize``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import conform_mlx.impl.gguf
import conform_mlx.reference.hf
from conform_mlx.engines import NotApplicable, load_engine
from conform_mlx.impl.loader import CheckpointError, load
from conform_mlx.metrics import compare_logits
from conform_mlx.models import open_model
from conform_mlx.reference import checkpoints
from conform_mlx.reference.gguf_writer import write_gguf
from conform_mlx.reference.hf import affine_codes, unpack_affine
from suites.test_logits_parity import engine_logits
from suites.tolerances import NMSE_LIMIT

pytestmark = [
    pytest.mark.engine_suite,
    pytest.mark.checkpoint_group("trained"),
]

TOKENS = np.random.default_rng(3).integers(0, 512, 40).tolist()
PREFILL = 7
# name -> (GGUF tensor type of the weights, of the token embedding, tied output)
GGUF_KINDS = {
    "Q4_0": ("Q4_0", None, False),
    "Q4_1": ("Q4_1", None, False),
    "Q8_0": ("Q8_0", None, False),
    # SmolLM2's layout: Q4_1 weights, Q8_0 token embedding doubling as the output.
    "Q4_1-tied-Q8_0": ("Q4_1", "Q8_0", True),
}
MLX_BITS = {"mlx-4bit": 4, "mlx-8bit": 8}
# Every affine width and group size of MLX's quantized matmul (impl.loader's QUANT_*,
# repeated here so a narrowed loader fails these cases rather than dropping them).
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
# tiny-gqa4 with a 256-wide MLP: hidden 128, intermediate 256, vocab 512. mlx-lm leaves
# a module whose input dimension the group size does not divide in floats (the trained
# checkpoint's 352-wide down_proj at 64 and 128); here every module is quantized.
GRID_SHAPE = dict(checkpoints.SHAPES["tiny-gqa4"], intermediate_size=256)
GRID_MODULES = 2 + 2 * 7  # embed_tokens, lm_head, and q/k/v/o/gate/up/down a layer


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, trained_dir):
    """Factory: path of a quantized copy of the trained checkpoint, made once."""
    root = tmp_path_factory.mktemp("quantized")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind in made:
            return made[kind]
        if kind in GGUF_KINDS:
            qtype, embed, tied = GGUF_KINDS[kind]
            made[kind] = write_gguf(
                trained_dir, root / f"{kind}.gguf", qtype, embed_qtype=embed, tied=tied
            )
        else:
            pytest.importorskip("mlx_lm", reason="mlx-lm writes its format (.[test] has it)")
            from conform_mlx.engines.mlx_lm_engine import quantize_checkpoint

            made[kind] = quantize_checkpoint(trained_dir, root / kind, MLX_BITS[kind], 32)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def affine(tmp_path_factory):
    """Factory: (bits, group_size, recipe) -> mlx-lm-quantized copy of a random
    GRID_SHAPE checkpoint, made once by mlx-lm's own code. recipe None: what
    ``mlx_lm.convert -q`` writes; "mixed_3_6": mlx-lm's mixed recipe (an object per
    module), then its AWQ tool's ``update_config`` (an object per quantized module,
    ``false`` for every other leaf module, a dummy default): the two per-module forms
    mlx-lm 0.32 writes."""
    pytest.importorskip("mlx_lm", reason="mlx-lm writes its format (.[test] has it)")
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    from conform_mlx.engines.mlx_lm_engine import quantize_checkpoint

    root = tmp_path_factory.mktemp("affine")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(checkpoints.SHAPES, "tiny-q128", GRID_SHAPE)
        src = checkpoints.write_random_checkpoint("tiny-q128", root / "float", seed=0)
    made: dict[tuple, Path] = {}

    def get(bits: int, group_size: int, recipe: str | None = None) -> Path:
        key = bits, group_size, recipe
        if key in made:
            return made[key]
        out = root / f"{recipe or 'plain'}-{bits}bit-g{group_size}"
        if recipe is None:
            made[key] = quantize_checkpoint(src, out, bits, group_size)
            return made[key]
        from mlx_lm.convert import mixed_quant_predicate_builder
        from mlx_lm.quant.awq import update_config

        model, config = load_model(src)
        mixed = mixed_quant_predicate_builder(recipe, model, group_size)
        model, config = quantize_model(model, config, group_size, bits, quant_predicate=mixed)
        config = update_config(model, config)
        out.mkdir()
        save_model(out, model)
        save_config(config, config_path=out / "config.json")
        made[key] = out
        return out

    return get


def parity_nmse(engine, ref, tokens: list[int] = TOKENS) -> float:
    return parity(engine, ref, tokens).nmse


def parity(engine, ref, tokens: list[int] = TOKENS):
    run = engine_logits(engine, tokens, PREFILL)
    return compare_logits(np.concatenate(run.steps), ref.logits(tokens))


# float32 on every format; float16 activations (held to the float16 limit, as for the
# float models) on one GGUF and one mlx-lm format.
PARITY_CASES = [(k, "float32") for k in [*GGUF_KINDS, *MLX_BITS]] + [
    ("Q8_0", "float16"),
    ("mlx-4bit", "float16"),
]


@pytest.mark.parametrize("kind,dtype", PARITY_CASES)
def test_quantized_parity(kind, dtype, quantized, engine_factory, reference_factory, metric):
    path = quantized(kind)
    try:
        engine = engine_factory(path, dtype)
    except NotApplicable as e:
        pytest.skip(f"engine: {e}")
    nmse = parity_nmse(engine, reference_factory(path))
    metric("NMSE vs HF on de-quantized weights", nmse)
    assert nmse <= NMSE_LIMIT[dtype], f"{kind} {dtype}: NMSE {nmse:.3g}"


@pytest.mark.parametrize("group_size", AFFINE_GROUPS)
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_affine_grid_parity(bits, group_size, affine, engine_factory, reference_factory, metric):
    """Every width and group size mlx-lm writes, every module quantized, float32
    activations: the float32 limit, as for the other formats."""
    path = affine(bits, group_size)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    assert sum(n.endswith(".scales") for n in mx.load(str(path / "model.safetensors"))) == (
        GRID_MODULES
    )
    try:
        engine = engine_factory(path, "float32")
    except NotApplicable as e:
        pytest.skip(f"engine: {e}")
    diff = parity(engine, reference_factory(path))
    metric("NMSE vs HF on de-quantized weights", diff.nmse)
    assert diff.nmse <= NMSE_LIMIT["float32"], (
        f"{bits}-bit g{group_size}: NMSE {diff.nmse:.3g}, max |dlogit| {diff.max_abs:.3g}"
    )


def test_mlx_lm_per_module_forms_load(affine, engine_factory, reference_factory, metric):
    """mlx-lm's per-module entries (3- and 6-bit modules side by side, ``false`` for the
    norms and RoPE) are read by impl and the reference alike."""
    path = affine(3, 64, "mixed_3_6")
    quantization = json.loads((path / "config.json").read_text())["quantization"]
    assert quantization["model.layers.0.input_layernorm"] is False
    assert {q["bits"] for q in quantization.values() if isinstance(q, dict)} == {3, 6}
    try:
        engine = engine_factory(path, "float32")
    except NotApplicable as e:
        pytest.skip(f"engine: {e}")
    nmse = parity_nmse(engine, reference_factory(path))
    metric("NMSE vs HF on de-quantized weights", nmse)
    assert nmse <= NMSE_LIMIT["float32"], f"mixed_3_6: NMSE {nmse:.3g}"


# -- the reference's unpacker, bit for bit against MLX's ------------------------------


def _random_packed(bits: int, group_size: int, seed: int):
    """Random words (every bit pattern: all codes, values straddling words) with float16
    scales and biases, 3 groups of 128 values a row at every group size."""
    rng = np.random.default_rng(seed)
    rows, cols = 8, 384
    words = rng.integers(0, 2**32, (rows, cols * bits // 32), dtype=np.uint32)
    scales, biases = (
        rng.standard_normal((rows, cols // group_size)).astype(np.float16) for _ in "sb"
    )
    return words, scales, biases


def _mlx_codes(words: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """MLX's integers: its de-quantization with scale 1 and bias 0."""
    ones = mx.ones((words.shape[0], words.shape[1] * 32 // bits // group_size))
    out = mx.dequantize(
        mx.array(words), ones, mx.zeros_like(ones), group_size=group_size, bits=bits
    )
    return np.array(out).astype(np.int64)


@pytest.mark.impl_only("checks the reference's unpacker against MLX's (the harness), not an engine")
@pytest.mark.parametrize("group_size", AFFINE_GROUPS)
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_reference_unpacks_like_mlx(bits, group_size):
    words, scales, biases = _random_packed(bits, group_size, seed=bits * 1000 + group_size)
    packed = torch.from_numpy(words)  # uint32, as safetensors hands it to the reference
    codes = affine_codes(packed, bits).numpy()
    np.testing.assert_array_equal(codes, _mlx_codes(words, bits, group_size))
    assert codes.min() == 0 and codes.max() == 2**bits - 1
    # Weights: a float16 scale times a code of <= 8 bits is exact in float32, so the
    # one rounding of the sum is the same on both sides: equal, not close.
    got = unpack_affine(packed, torch.from_numpy(scales), torch.from_numpy(biases), bits,
                        group_size)  # fmt: skip
    f32 = mx.float32
    want = mx.dequantize(mx.array(words), mx.array(scales).astype(f32),
                         mx.array(biases).astype(f32), group_size=group_size,
                         bits=bits)  # fmt: skip
    np.testing.assert_array_equal(got.numpy(), np.array(want))


def _one_bit_late(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """A planted off-by-one: every value read one bit further along the stream."""
    w = packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nxt = torch.cat([w[..., 1:], torch.zeros_like(w[..., :1])], dim=-1)
    shifted = ((w >> 1) | (nxt << 31)) & 0xFFFFFFFF
    signed = shifted - (shifted >> 31 << 32)  # the same 32 bits as an int32
    return REAL_AFFINE_CODES(signed.to(torch.int32), bits)


def _per_word(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """A planted layout bug: each word on its own, 32 // bits values from bit 0 (right
    for 2, 4 and 8 bits; 3, 5 and 6 straddle words), padded to the row's length."""
    w = packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32 - bits + 1, bits, dtype=torch.int64)
    q = ((w[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)
    n = w.shape[-1] * 32 // bits
    return torch.nn.functional.pad(q, (0, max(0, n - q.shape[-1])))[..., :n]


REAL_AFFINE_CODES = affine_codes
PLANTED_UNPACKERS = {"one bit late": _one_bit_late, "per-word": _per_word}


@pytest.mark.impl_only("checks the reference's unpacker against MLX's (the harness), not an engine")
@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("planted", PLANTED_UNPACKERS)
def test_mlx_comparison_catches_a_wrong_unpacker(planted, bits):
    """The comparison above has teeth: a planted unpacking bug differs from MLX (the
    per-word layout only where values straddle words: 3, 5 and 6 bits)."""
    words, _, _ = _random_packed(bits, 32, seed=bits)
    wrong = PLANTED_UNPACKERS[planted](torch.from_numpy(words), bits).numpy()
    differs = not np.array_equal(wrong, _mlx_codes(words, bits, 32))
    assert differs is (planted != "per-word" or 32 % bits != 0)


@pytest.mark.impl_only("compares impl with a reference given a planted unpacking bug")
def test_parity_catches_a_wrong_reference_unpacker(affine, engine_factory, monkeypatch):
    """And end to end: with the reference reading the stream one bit late, the parity
    check above fails by far."""
    from conform_mlx.reference.hf import Reference

    path = affine(3, 64)
    engine = engine_factory(path, "float32")
    good = parity_nmse(engine, Reference(path))
    monkeypatch.setattr(conform_mlx.reference.hf, "affine_codes", _one_bit_late)
    bad = parity_nmse(engine, Reference(path))
    assert good <= NMSE_LIMIT["float32"] < bad / 1000, (good, bad)


# -- impl's reader ------------------------------------------------------------------


@pytest.mark.impl_only("checks impl's quantized layers and GGUF reader")
@pytest.mark.parametrize("kind", [*GGUF_KINDS, "mlx-4bit"])
def test_weights_stay_quantized(kind, quantized):
    """The quantized path really runs: packed weights in QuantizedLinear, and a tied
    output read off a QuantizedEmbedding."""
    model = load(quantized(kind))
    attn = model.model.layers[0].self_attn  # q/k/v fused into qkv_proj at load
    assert isinstance(attn.qkv_proj, nn.QuantizedLinear)
    assert attn.qkv_proj.weight.dtype == mx.uint32
    if kind in GGUF_KINDS:
        qtype, embed, tied = GGUF_KINDS[kind]
        assert attn.qkv_proj.bits == conform_mlx.impl.gguf.AFFINE_BITS[qtype]
        assert model.model.embed_tokens.bits == conform_mlx.impl.gguf.AFFINE_BITS[embed or qtype]
        assert model.config.tie_word_embeddings is tied
        assert ("lm_head" in model) is not tied
        assert model.weights_format.startswith("GGUF")
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)


@pytest.mark.impl_only("injects a fault into impl's GGUF reader")
def test_parity_catches_missing_unpermute(
    quantized, engine_factory, reference_factory, monkeypatch
):
    """Without undoing llama.cpp's Q/K row order, RoPE rotates the wrong pairs: the
    parity check above must fail."""
    path = quantized("Q8_0")
    ref = reference_factory(path)
    good = parity_nmse(engine_factory(path, "float32"), ref)
    monkeypatch.setattr(conform_mlx.impl.gguf, "unpermute_heads", lambda x, n: x)
    from conform_mlx.engines.impl_engine import ImplEngine

    bad = parity_nmse(ImplEngine.load(path, "float32"), ref)
    assert good <= NMSE_LIMIT["float32"] < bad / 1000, (good, bad)


@pytest.mark.impl_only("checks impl's de-quantize-at-load path")
def test_dequantized_engine_matches(quantized, reference_factory):
    from conform_mlx.engines.impl_engine import ImplDequantizedEngine

    path = quantized("Q4_1-tied-Q8_0")
    engine = ImplDequantizedEngine.load(path, "float32")
    assert "de-quantized to float32 at load" in engine.weights()
    assert not isinstance(engine.model.model.layers[0].mlp.gate_up_proj, nn.QuantizedLinear)
    assert parity_nmse(engine, reference_factory(path)) <= NMSE_LIMIT["float32"]


# -- bad files: one clear error naming the file and the problem, no model -----------


def _edited_copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(config)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.impl_only("tests impl's checkpoint loader errors")
def test_bad_gguf_files_are_refused(tmp_path, trained_dir, quantized):
    good = quantized("Q4_0").read_bytes()
    cases: dict[str, tuple[Path, str]] = {}

    not_gguf = tmp_path / "safetensors.gguf"
    shutil.copy(trained_dir / "model.safetensors", not_gguf)
    cases["not GGUF"] = (not_gguf, r"not a GGUF file \(starts with")

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) * 2 // 3])
    cases["truncated"] = (truncated, r"truncated\.gguf: cannot read")

    other = write_gguf(trained_dir, tmp_path / "gpt2.gguf", architecture="gpt2")
    cases["architecture"] = (other, r"architecture 'gpt2'; only 'llama'")

    mxfp4 = write_gguf(trained_dir, tmp_path / "mxfp4.gguf", "MXFP4")
    cases["type"] = (mxfp4, r"mxfp4\.gguf: 30 tensor\(s\) of a type impl does not run, "
                            r"e\.g\. output\.weight \(MXFP4\)")  # fmt: skip

    wide = _edited_copy(trained_dir, tmp_path / "wide", intermediate_size=384)
    shape = write_gguf(wide, tmp_path / "shape.gguf")
    cases["shape"] = (shape, r"mlp\.gate_proj\.weight in .*shape\.gguf has shape \(352, 16\), "
                             r"the config implies \(384, 16\)")  # fmt: skip

    llama3 = write_gguf(checkpoints.write_random_checkpoint("tiny-llama3-rope", tmp_path / "l3"),
                        tmp_path / "llama3.gguf", "F32")  # fmt: skip
    cases["rope_freqs"] = (llama3, r"RoPE scaling per-frequency factors \(rope_freqs\) in a "
                                   r"GGUF file is not supported")  # fmt: skip

    for what, (path, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load(path)
        assert path.exists(), what


@pytest.mark.impl_only("checks impl's GGUF reader")
def test_gguf_linear_rope_scaling_reads_as_the_config(tmp_path, reference_factory):
    """Linear RoPE scaling in GGUF metadata (llama.rope.scaling.type / factor) gives the
    config's scaling: float32 parity with HF on the checkpoint the file was written from."""
    src = checkpoints.write_random_checkpoint("tiny-linear-rope", tmp_path / "src", seed=1)
    model = load(write_gguf(src, tmp_path / "linear.gguf", "F32"))
    assert model.config.rope_scaling.rope_type == "linear"
    assert model.config.rope_scaling.factor == 4.0
    engine = load_engine("impl", open_model(tmp_path / "linear.gguf"), "float32")
    assert parity_nmse(engine, reference_factory(src)) <= NMSE_LIMIT["float32"]


UP = "model.layers.0.mlp.up_proj"
DOWN = r"model\.layers\.\d+\.mlp\.down_proj"
# what -> (quantized checkpoint, its quantization field after the edit, the message).
# Every message starts with the file and names the field. "g32": affine(4, 32);
# "trained": the trained checkpoint at 4-bit g32, its down_proj 352 wide.
G32 = {"group_size": 32, "bits": 4, "mode": "affine"}
BAD_QUANTIZATION = {
    "group_size a float": ("g32", dict(G32, group_size=32.0),
                           r"field quantization\.group_size must be an integer, got 32\.0 "
                           r"\(float\)"),
    "bits a float": ("g32", dict(G32, bits=4.0),
                     r"field quantization\.bits must be an integer, got 4\.0 \(float\)"),
    "bits true": ("g32", dict(G32, bits=True),
                  r"field quantization\.bits must be an integer, got True \(bool\)"),
    "group_size a string": ("g32", dict(G32, group_size="32"),
                            r"field quantization\.group_size must be an integer, got '32' "
                            r"\(str\)"),
    "bits missing": ("g32", {"group_size": 32}, r"field quantization\.bits is missing"),
    "bits 7": ("g32", dict(G32, bits=7),
               r"field quantization\.bits is 7; supported: 2, 3, 4, 5, 6, 8"),
    "group_size 0": ("g32", dict(G32, group_size=0),
                     r"field quantization\.group_size is 0; supported: 32, 64, 128"),
    "group_size 16": ("g32", dict(G32, group_size=16),
                      r"field quantization\.group_size is 16; supported: 32, 64, 128"),
    "a string": ("g32", "4bit", r"field quantization must be an object, got '4bit'"),
    "mode mxfp4": ("g32", dict(G32, mode="mxfp4"),
                   r"field quantization\.mode is 'mxfp4'; only 'affine' is supported"),
    "module entry a string": ("g32", dict(G32, **{UP: "8bit"}),
                              rf"field quantization\['{UP}'\] must be an object "
                              r"\{group_size, bits\} or false, got '8bit'"),
    "module entry true": ("g32", dict(G32, **{UP: True}),
                          rf"field quantization\['{UP}'\] must be an object .* got True"),
    "module entry null": ("g32", dict(G32, **{UP: None}),
                          rf"field quantization\['{UP}'\] must be an object .* got None"),
    "module bits a float": ("g32", dict(G32, **{UP: {"group_size": 32, "bits": 4.0}}),
                            rf"field quantization\['{UP}'\]\.bits must be an integer, "
                            r"got 4\.0 \(float\)"),
    "module false, yet quantized": ("g32", dict(G32, **{UP: False}),
                                    rf"field quantization\['{UP}'\] is false \(not "
                                    rf"quantized\), but the checkpoint holds {UP}\.scales"),
    "module entry for a float module": ("g32", dict(G32, **{"model.norm": G32}),
                                        r"field quantization\['model\.norm'\] quantizes "
                                        r"module model\.norm, but the checkpoint holds no "
                                        r"model\.norm\.scales"),
    "group_size not dividing": ("trained", dict(G32, group_size=64),
                                rf"field quantization\.group_size 64 does not divide the "
                                rf"input dimension 352 of module {DOWN} \({DOWN}\.weight "
                                r"in .*model\.safetensors, 4-bit\)"),
    "module group_size not dividing": ("trained", dict(G32, **{"model.layers.1.mlp.down_proj":
                                                               dict(G32, group_size=128)}),
                                       r"field quantization\['model\.layers\.1\.mlp\."
                                       r"down_proj'\]\.group_size 128 does not divide the "
                                       r"input dimension 352 of module "),
    "group_size unlike the file's": ("g32", dict(G32, group_size=64),
                                     r"field quantization \(group_size 64, bits 4\) does not "
                                     r"match module .* in .*model\.safetensors: .*\.weight "
                                     r"packs 128 values a row, .*\.scales has 4 groups, not 2"),
    "bits unlike the file's": ("g32", dict(G32, bits=8),
                               r"field quantization \(group_size 32, bits 8\) does not match "
                               r"module .*\.scales has 4 groups, not 2"),
    "bits no whole number": ("g32", dict(G32, bits=3),
                             r"field quantization\.bits is 3, but .*\.weight in "
                             r".*model\.safetensors has 16 uint32 words a row, no whole "
                             r"number of 3-bit values"),
}  # fmt: skip


@pytest.mark.impl_only("tests impl's checkpoint loader errors")
@pytest.mark.parametrize("what", BAD_QUANTIZATION)
def test_bad_mlx_quantization_is_refused(what, tmp_path, quantized, affine):
    """One CheckpointError naming config.json and the field (and the module and weight
    file where a module is at fault), no model: before these checks a float 32.0
    passed (32.0 == 32) and broke inside mx.quantize, MLX's own message escaped for a
    group size not dividing a module, and a module entry not an object was ignored."""
    src, quantization, message = BAD_QUANTIZATION[what]
    src = affine(4, 32) if src == "g32" else quantized("mlx-4bit")
    bad = _edited_copy(src, tmp_path / "bad", quantization=quantization)
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        load(bad)


@pytest.mark.impl_only("tests impl's checkpoint loader errors")
def test_quantized_tensors_need_a_quantization_field(tmp_path, quantized):
    missing = tmp_path / "missing"
    shutil.copytree(quantized("mlx-4bit"), missing)
    raw = json.loads((missing / "config.json").read_text())
    del raw["quantization"]
    (missing / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"look quantized, but config\.json has no quantiz"):
        load(missing)


@pytest.mark.impl_only("runs the conform validate flow with impl")
def test_validate_passes_on_a_gguf_file(quantized, tmp_path):
    from conform_mlx.validate import run
    from conform_mlx.validate_io import Options

    report = run(Options(model=quantized("Q4_1-tied-Q8_0"), tokens=[1, 5, 9, 30],
                         max_new_tokens=6, out_dir=tmp_path))  # fmt: skip
    assert report["passed"], report["failures"]
    assert report["engine"]["weights"].startswith("GGUF F32 x9, Q4_1 x28, Q8_0 x1")
    assert report["parity"]["reference"].endswith("on the de-quantized weights")


@pytest.mark.slow
@pytest.mark.impl_only("runs the conform validate flow with impl")
def test_smollm2_validates(tmp_path):
    """The real model end to end (35 s here): GGUF Q4_1 through the quantized path,
    the tokenizer from the GGUF metadata, parity on every fed position."""
    from conform_mlx.models import ModelNotFound, named_model_path
    from conform_mlx.validate import run
    from conform_mlx.validate_io import Options

    try:
        path = named_model_path("smollm2-135m")
    except ModelNotFound as e:
        pytest.skip(str(e))
    report = run(Options(model=path, max_new_tokens=12, out_dir=tmp_path))
    assert report["passed"], report["failures"]
    assert report["parity"]["greedy_identical"]
    assert report["prompt"]["ids"] == [504, 2365, 6354, 16438]  # no BOS: the file says so
    assert report["generated"]["text"].startswith(" with a quick brown bear.")
