"""K-quant GGUF files (Q2_K to Q8_K, with the Q5_0 / Q5_1 / Q8_0 rows they fall back to).

gguf-py writes no K-quant, so ``reference/kquants.py`` encodes them from the block
layouts; gguf-py's de-quantization is the independent reader that checks the bytes.
impl keeps Q4_K, Q5_K, Q8_K and the legacy types quantized (repacked into MLX's
affine layout) and de-quantizes Q2_K, Q3_K and Q6_K at load. With float32
activations both run at the float32 limit against HF transformers on the same
de-quantized weights (its GGUF loader, through gguf-py).

The model files are a random tiny-gqa8 (hidden 256, MLP 352): every projection but
``down_proj`` (352 wide, the fallback type) takes the K-quant.
"""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest

from conform_mlx.engines import load_engine
from conform_mlx.impl.gguf import AFFINE_BITS, DEQUANTIZED, affine_blocks, pack
from conform_mlx.impl.loader import load
from conform_mlx.models import open_model
from conform_mlx.reference import checkpoints, kquants
from conform_mlx.reference.gguf_writer import write_gguf
from suites.conftest import expect_known_issue
from suites.test_quantized import parity
from suites.tolerances import NMSE_LIMIT

pytestmark = [pytest.mark.engine_suite, pytest.mark.checkpoint_group("kquants")]

K_TYPES = list(kquants.BLOCK_BYTES)  # Q2_K ... Q8_K
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
# name -> (weights, per-part overrides): one file per K-quant, and the mix of llama.cpp's
# Q4_K_M (Q6_K for the token embedding, the output and attn_v).
FILES = {t: (t, None) for t in K_TYPES if t != "Q8_K"} | {
    "Q4_K_M-like": ("Q4_K", {"token_embd": "Q6_K", "output": "Q6_K", "attn_v": "Q6_K"}),
}
TOKENS = np.random.default_rng(5).integers(0, 512, 24).tolist()


def _rows(seed: int = 0) -> np.ndarray:
    """Rows whose 16-wide sub-blocks differ in scale by up to 100x, so a scale read for
    the wrong sub-block is far off."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.01, 1.0, (8, 512 // 16)).repeat(16, axis=1)
    return (rng.standard_normal((8, 512)) * spread).astype(np.float32)


@pytest.mark.impl_only("checks the reference's encoder against gguf-py, not an engine")
@pytest.mark.parametrize("qtype", [t for t in K_TYPES if t != "Q8_K"])
def test_encoder_bytes_read_back_by_gguf_py(qtype):
    """gguf-py de-quantizes our bytes to exactly the values the encoder meant."""
    data, values = kquants.quantize(_rows(), qtype)
    assert data.shape == (8, 2 * kquants.BLOCK_BYTES[qtype])
    got = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(got, values)


@pytest.mark.impl_only("checks the reference's encoder against gguf-py, not an engine")
def test_gguf_py_comparison_catches_a_wrong_scale_layout(monkeypatch):
    """The comparison has teeth: Q4_K's scales and mins packed the wrong way round
    (a planted bug) read back differently."""
    real = kquants.k4_scales
    monkeypatch.setattr(kquants, "k4_scales", lambda sc, m: real(m, sc))
    data, values = kquants.quantize(_rows(), "Q4_K")
    got = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K)
    assert not np.allclose(got, values, rtol=0.1)


def _expected(qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(GGUF bytes of ``_rows()``, the weights they hold by gguf-py's reading; Q8_K,
    which gguf-py does not read, by the encoder's)."""
    x = _rows()
    if qtype in kquants.BLOCK_BYTES:
        data, values = kquants.quantize(x, qtype)
        if qtype == "Q8_K":
            return data, values
    else:
        data = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    return data, gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])


@pytest.mark.impl_only("checks impl's GGUF repacking, not an engine")
@pytest.mark.parametrize("qtype", [*LEGACY, *[t for t in K_TYPES if t in AFFINE_BITS]])
def test_impl_repacks_blocks_exactly(qtype):
    """impl's MLX arrays de-quantize to gguf-py's weights bit for bit. Q8_K alone rounds
    twice (its float32 scale times q + 128, then the bias -128 * scale): within one
    float32 rounding of the encoder's d * q."""
    data, want = _expected(qtype)
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    q, scale, bias = affine_blocks(data.reshape(8, -1, block_bytes), qtype)
    bits = AFFINE_BITS[qtype]
    assert q.max() < 2**bits
    got = mx.dequantize(
        mx.array(pack(q.astype(np.uint8), bits)),
        mx.array(scale),
        mx.array(bias),
        group_size=32,
        bits=bits,
    )
    if qtype == "Q8_K":
        np.testing.assert_allclose(np.array(got), want, rtol=0, atol=1e-6 * np.abs(want).max())
    else:
        np.testing.assert_array_equal(np.array(got), want)


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    """Factory: a FILES entry -> a GGUF file of the random tiny-gqa8, made once."""
    root = tmp_path_factory.mktemp("kquants")
    src = checkpoints.write_random_checkpoint("tiny-gqa8", root / "float", seed=1)
    made = {}

    def get(name: str):
        if name not in made:
            qtype, qtypes = FILES[name]
            made[name] = write_gguf(src, root / f"{name}.gguf", qtype, qtypes=qtypes, vocab=True)
        return made[name]

    return get


@pytest.mark.parametrize("name", FILES)
def test_kquant_parity(name, kquant_file, engine_factory, reference_factory, metric, request):
    path = kquant_file(name)
    engine = engine_factory(path, "float32")
    expect_known_issue(request, engine, path)
    diff = parity(engine, reference_factory(path), TOKENS)
    metric("NMSE vs HF on de-quantized weights", diff.nmse)
    if diff.nmse > NMSE_LIMIT["float32"] or diff.top1_agreement < 1.0:
        pytest.fail(f"{name}: NMSE {diff.nmse:.3g}, top-1 {diff.top1_agreement:.3f}")


@pytest.mark.impl_only("checks how impl holds each block type")
@pytest.mark.parametrize("name", FILES)
def test_each_type_runs_as_documented(name, kquant_file):
    """Q4_K / Q5_K (and the fallbacks) stay quantized at their bits; Q2_K, Q3_K and
    Q6_K are floats, and the weights summary says they were de-quantized."""
    model = load(kquant_file(name))
    qtype, qtypes = FILES[name]
    attn = model.model.layers[0].self_attn
    q_proj = attn.get("qkv_proj") or attn.q_proj
    if qtype in AFFINE_BITS and not qtypes:
        assert q_proj.bits == AFFINE_BITS[qtype]
    if qtype in DEQUANTIZED:
        assert q_proj.weight.dtype == mx.float32
        summary = model.weights_format
        assert f"{qtype} x" in summary and "de-quantized to float32 at load" in summary
    down = model.model.layers[0].mlp.down_proj  # 352 wide: the fallback, kept quantized
    assert down.bits in (5, 8)


@pytest.mark.impl_only("plants a bug in impl's GGUF reader")
def test_parity_catches_a_wrong_scale_reading(kquant_file, reference_factory, monkeypatch):
    """End to end: impl reading Q4_K's scales as mins and mins as scales fails parity
    by far."""
    import conform_mlx.impl.gguf as impl_gguf

    path = kquant_file("Q4_K")

    def nmse() -> float:
        engine = load_engine("impl", open_model(path), "float32")
        return parity(engine, reference_factory(path), TOKENS).nmse

    good = nmse()
    real = impl_gguf.k_scales
    monkeypatch.setattr(impl_gguf, "k_scales", lambda packed: real(packed)[::-1])
    bad = nmse()
    assert good <= NMSE_LIMIT["float32"] < bad / 1000, (good, bad)


@pytest.mark.slow
@pytest.mark.impl_only("runs the conform validate flow with impl")
@pytest.mark.parametrize("ftype,kquant", [("Q4_K_M", "Q4_K"), ("Q5_K_M", "Q5_K"), ("Q6_K", "Q6_K")])
def test_smollm2_llama_cpp_kquants_validate(ftype, kquant, tmp_path):
    """The real model as llama.cpp's own quantizer writes it (re-quantized from the
    packaged Q4_1): ``conform validate`` passes, parity on every fed position."""
    from conform_mlx.models import ModelNotFound, named_model_path
    from conform_mlx.reference.llama_quantize import QuantizeError, llama_quantize
    from conform_mlx.validate import run
    from conform_mlx.validate_io import Options

    try:
        src = named_model_path("smollm2-135m")
        path = llama_quantize(src, tmp_path / f"smollm2-{ftype}.gguf", ftype)
    except (ModelNotFound, QuantizeError) as e:
        pytest.skip(str(e))
    report = run(Options(model=path, max_new_tokens=12, out_dir=tmp_path))
    assert report["passed"], report["failures"]
    assert f"{kquant} x" in report["engine"]["weights"]
