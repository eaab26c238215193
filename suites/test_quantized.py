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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import conform_mlx.impl.gguf
from conform_mlx.engines import NotApplicable
from conform_mlx.impl.loader import CheckpointError, load
from conform_mlx.metrics import compare_logits
from conform_mlx.reference.gguf_writer import write_gguf
from suites.test_logits_parity import engine_logits
from suites.tolerances import NMSE_LIMIT

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


def parity_nmse(engine, ref, tokens: list[int] = TOKENS) -> float:
    run = engine_logits(engine, tokens, PREFILL)
    return compare_logits(np.concatenate(run.steps), ref.logits(tokens)).nmse


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
        assert attn.qkv_proj.bits == conform_mlx.impl.gguf.TYPES[qtype]
        assert model.model.embed_tokens.bits == conform_mlx.impl.gguf.TYPES[embed or qtype]
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

    q5 = write_gguf(trained_dir, tmp_path / "q5.gguf", "Q5_0")
    cases["type"] = (q5, r"q5\.gguf: 30 tensor\(s\) of a type impl does not run, e\.g\. "
                         r"output\.weight \(Q5_0\)")  # fmt: skip

    wide = _edited_copy(trained_dir, tmp_path / "wide", intermediate_size=384)
    shape = write_gguf(wide, tmp_path / "shape.gguf")
    cases["shape"] = (shape, r"mlp\.gate_proj\.weight in .*shape\.gguf has shape \(352, 16\), "
                             r"the config implies \(384, 16\)")  # fmt: skip

    for what, (path, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load(path)
        assert path.exists(), what


@pytest.mark.impl_only("tests impl's checkpoint loader errors")
def test_bad_mlx_quantization_is_refused(tmp_path, quantized):
    src = quantized("mlx-4bit")
    seven = _edited_copy(src, tmp_path / "seven", quantization={"group_size": 32, "bits": 7})
    with pytest.raises(CheckpointError, match=r"quantization\.group_size=32, bits=7; supported"):
        load(seven)
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    raw = json.loads((missing / "config.json").read_text())
    del raw["quantization"]
    (missing / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"look quantized, but config\.json has no quantiz"):
        load(missing)


@pytest.mark.impl_only("runs the conform validate flow with impl")
def test_validate_passes_on_a_gguf_file(quantized, tmp_path):
    from conform_mlx.validate import Options, run

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
    from conform_mlx.validate import Options, run

    try:
        path = named_model_path("smollm2-135m")
    except ModelNotFound as e:
        pytest.skip(str(e))
    report = run(Options(model=path, max_new_tokens=12, out_dir=tmp_path))
    assert report["passed"], report["failures"]
    assert report["parity"]["greedy_identical"]
    assert report["prompt"]["ids"] == [504, 2365, 6354, 16438]  # no BOS: the file says so
    assert report["generated"]["text"].startswith(" with a quick brown bear.")
