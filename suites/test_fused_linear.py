"""Fused projections (issue 13): after load each layer runs q/k/v as one matmul
(``qkv_proj``) and gate/up as one (``gate_up_proj``), 4 matmuls where there were 7.

The fused model must compute what the unfused one does (``build(..., fuse=False)``,
the same weights under HF's names): on the trained checkpoint in float32 and
float16, on a quantized GGUF, with biases, and with per-module quantization that
leaves a layer unfused. A planted fault (k and v concatenated in the wrong order)
must fail that comparison. The launch count is read off the graph of one compiled
decode step: ``mx.export_to_dot`` writes every unevaluated primitive behind the
step's outputs, one node each (``graph_primitives``).
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import conform_mlx.impl.kernels
import conform_mlx.impl.model
from conform_mlx.impl.engine import CompiledSteps, decode, prefill, step_arrays, to_numpy
from conform_mlx.impl.kernels.backend import active_backend
from conform_mlx.impl.kernels.norm_linear import linear_row_ops, norm_linear_ops
from conform_mlx.impl.kernels.policy import KernelPolicy, use_policy
from conform_mlx.impl.loader import Checkpoint, build, read_checkpoint
from conform_mlx.impl.model import Model
from conform_mlx.impl.paged_cache import PagedKVCache
from conform_mlx.metrics import nmse
from conform_mlx.reference.gguf_writer import write_gguf
from suites.tolerances import FP32_SAME_ENGINE_ATOL, NMSE_LIMIT

MEASURED = KernelPolicy.measured()
NO_ROW_KERNELS = MEASURED.but(norm_linear=False, linear_row=False)

pytestmark = [
    pytest.mark.impl_only("tests impl's fused q/k/v and gate/up projections against unfused"),
    pytest.mark.checkpoint_group("trained"),
]

PROMPTS = {"a": [1, 264, 319, 322, 309, 336, 17], "b": [1, 42, 99]}
DECODE = [[336, 319], [264, 7], [309, 400], [12, 13], [5, 6], [77, 88]]
MATMULS = ("Matmul", "QuantizedMatmul")


def run_logits(model: Model) -> np.ndarray:
    """Eager prefills of two sequences, then batched compiled decode steps
    (mixed lengths): every step's logits, float32, stacked in one array."""
    cache, steps = PagedKVCache(model.config, 8, 4, model.dtype), CompiledSteps(model)
    out = []
    for seq, prompt in PROMPTS.items():
        cache.add_sequence(seq)
        out.append(to_numpy(prefill(model, cache, seq, prompt)))
    for tokens in DECODE:
        out.append(to_numpy(decode(model, cache, list(PROMPTS), tokens, steps=steps)))
    for token in (7, 8):  # batch 1: one row through the MLP (its own split of gate/up)
        out.append(to_numpy(decode(model, cache, ["a"], [token], steps=steps)))
    return np.concatenate(out)


def assert_same_logits(fused: Model, unfused: Model) -> float:
    a, b = run_logits(fused), run_logits(unfused)
    diff = float(np.abs(a - b).max())
    assert np.isfinite(a).all() and diff <= FP32_SAME_ENGINE_ATOL, f"max |fused - unfused| {diff}"
    return diff


def graph_primitives(*outputs: mx.array) -> Counter[str]:
    """The primitives of the graph behind ``outputs`` (unevaluated), by name.

    ``mx.export_to_dot`` writes one rectangle per primitive (arrays are the other
    nodes); in a compiled graph fused elementwise ops appear as ``Compiled...``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step.dot"
        mx.export_to_dot(str(path), *outputs)
        text = path.read_text()
    return Counter(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', text))


def decode_step_primitives(model: Model) -> Counter[str]:
    """The primitives of one compiled batch-1 decode step (after a 5-token prefill)."""
    cache = PagedKVCache(model.config, 4, 16, model.dtype)  # one block: no table padding
    cache.add_sequence("s")
    prefill(model, cache, "s", [1, 264, 319, 322, 309])
    plan = cache.plan(["s"], 1)
    # The graph itself, not CompiledSteps.lazy: lazy queues the step's last layers
    # (commit_layers), and what is queued is no longer in the graph to count.
    step = CompiledSteps(model).graph(plan.fresh)
    logits, kv, _ = step(mx.array([[336]], dtype=mx.int32), *step_arrays(plan), cache.kv)
    counts = graph_primitives(logits, *kv)
    mx.eval(logits, kv)
    return counts


def fused_and_unfused(ckpt: Checkpoint, dtype: str = "float32") -> tuple[Model, Model]:
    return build(ckpt, dtype), build(ckpt, dtype, fuse=False)


@pytest.fixture(scope="module")
def trained_ckpt(trained_dir) -> Checkpoint:
    return read_checkpoint(trained_dir)


@pytest.fixture(scope="module")
def q4_gguf(trained_dir, tmp_path_factory) -> Checkpoint:
    return read_checkpoint(write_gguf(trained_dir, tmp_path_factory.mktemp("q") / "q4.gguf"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.usefixtures("mlx_row_ops")
def test_fused_matches_unfused_trained(trained_ckpt, dtype):
    """Fused and unfused through MLX's ops: where the row kernels run, the fused model
    takes them and the unfused one cannot (no joined weight), and their other order of
    summation is a unit in float16's last place of a logit; the row kernels are held
    to MLX's ops in ``test_row_kernels_carry_a_batch1_step``."""
    fused, unfused = fused_and_unfused(trained_ckpt, dtype)
    for layer in fused.model.layers:
        assert set(layer.self_attn) >= {"qkv_proj", "o_proj"} and "q_proj" not in layer.self_attn
        assert "gate_up_proj" in layer.mlp and "up_proj" not in layer.mlp
        assert layer.self_attn.qkv_proj.weight.dtype == getattr(mx, dtype)
    assert_same_logits(fused, unfused)


def test_fused_matches_unfused_quantized_gguf(q4_gguf):
    fused, unfused = fused_and_unfused(q4_gguf)
    qkv = fused.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, nn.QuantizedLinear) and qkv.weight.dtype == mx.uint32
    assert isinstance(fused.model.layers[0].mlp.gate_up_proj, nn.QuantizedLinear)
    assert_same_logits(fused, unfused)


def test_biases_are_fused(trained_ckpt):
    """attention_bias / mlp_bias: the biases are concatenated like the weights."""
    cfg = dataclasses.replace(trained_ckpt.config, attention_bias=True, mlp_bias=True)
    rng = np.random.default_rng(0)
    weights = dict(trained_ckpt.weights)
    for name, (arr, where) in trained_ckpt.weights.items():
        if name.endswith("_proj.weight"):
            bias = rng.normal(0, 0.05, arr.shape[0]).astype(np.float32)
            weights[name.removesuffix("weight") + "bias"] = (mx.array(bias), where)
    ckpt = dataclasses.replace(trained_ckpt, config=cfg, weights=weights)
    fused, unfused = fused_and_unfused(ckpt)
    assert "bias" in fused.model.layers[0].self_attn.qkv_proj
    assert "bias" in fused.model.layers[0].mlp.gate_up_proj
    assert_same_logits(fused, unfused)


def test_mixed_quantization_leaves_that_layer_unfused(trained_ckpt):
    """mlx-lm may quantize modules differently; rows packed at other bits or group
    sizes cannot share one quantized matmul, so that layer's group stays separate."""
    odd = {
        "model.layers.0.self_attn.v_proj": {"group_size": 32, "bits": 8},
        "model.layers.2.mlp.up_proj": {"group_size": 64, "bits": 4},
    }
    weights, quant = dict(trained_ckpt.weights), {}
    for name, (arr, where) in trained_ckpt.weights.items():
        module = name.removesuffix(".weight")
        if not module.endswith("_proj"):
            continue
        quant[module] = odd.get(module, {"group_size": 32, "bits": 4})
        packed, scales, biases = mx.quantize(arr, **quant[module])
        weights.update(
            {
                f"{module}.weight": (packed, where),
                f"{module}.scales": (scales, where),
                f"{module}.biases": (biases, where),
            }
        )
    ckpt = dataclasses.replace(trained_ckpt, weights=weights, quantization=quant)
    unfused = build(ckpt, fuse=False)
    fused = build(ckpt, fuse=False)
    assert fused.fuse_projections() == ["model.layers.0.self_attn", "model.layers.2.mlp"]
    layers = fused.model.layers
    assert "q_proj" in layers[0].self_attn and "qkv_proj" in layers[1].self_attn
    assert "gate_proj" in layers[2].mlp and "gate_up_proj" in layers[0].mlp
    assert isinstance(layers[1].self_attn.qkv_proj, nn.QuantizedLinear)
    assert_same_logits(fused, unfused)


def test_swapped_k_and_v_are_caught(trained_ckpt, monkeypatch):
    """A planted fault: q, v, k concatenated (k and v have the same shape, so the
    model runs); the fused-vs-unfused comparison must fail by far."""
    real = conform_mlx.impl.model.fuse_linears

    def swapped(parts):
        return real([parts[0], parts[2], parts[1]] if len(parts) == 3 else parts)

    monkeypatch.setattr(conform_mlx.impl.model, "fuse_linears", swapped)
    fused, unfused = fused_and_unfused(trained_ckpt)
    with pytest.raises(AssertionError, match="max"):
        assert_same_logits(fused, unfused)
    assert np.abs(run_logits(fused) - run_logits(unfused)).max() > 1000 * FP32_SAME_ENGINE_ATOL


@pytest.fixture
def mlx_row_ops() -> Iterator[None]:
    """MLX's add, rms_norm and matmul for a batch-1 step's rows, not the row kernels
    (``impl.kernels.norm_linear``), on whatever backend: the graphs counted here are
    MLX's."""
    with use_policy(NO_ROW_KERNELS):
        yield


@pytest.mark.parametrize("kind", ["float32", "Q4_0"])
@pytest.mark.usefixtures("mlx_row_ops")
def test_decode_step_has_three_fewer_matmuls_per_layer(kind, trained_ckpt, q4_gguf):
    """7 -> 4 projection matmuls a layer, counted in the compiled decode step's graph
    (the attention's own two matmuls and the output projection stay)."""
    fused, unfused = fused_and_unfused(trained_ckpt if kind == "float32" else q4_gguf)
    before, after = decode_step_primitives(unfused), decode_step_primitives(fused)
    layers = fused.config.num_hidden_layers
    matmuls = {name: (before[name], after[name]) for name in MATMULS}
    assert sum(before[n] - after[n] for n in MATMULS) == 3 * layers, matmuls
    # Fused, gate/up are split by one Split (a view) a layer, of a (2, f) reshape at
    # batch 1 (impl.model.MLP). q | k | v rows reach the RoPE step either way:
    # unfused, the three outputs are joined (one concatenate).
    assert after["Split"] - before["Split"] == layers
    assert after["Reshape"] - before["Reshape"] == layers
    assert before["Concatenate"] - after["Concatenate"] == layers
    ops = set(before) | set(after)
    skip = {*MATMULS, "Split", "Reshape", "Concatenate", "Transpose", "Unflatten"}
    assert all(before[n] == after[n] for n in ops - skip)


# -- kept transposes (impl.model.Linear) ------------------------------------------
def float_linears(model: Model) -> list[nn.Module]:
    return [m for _, m in model.named_modules() if type(m) is conform_mlx.impl.model.Linear]


@pytest.mark.usefixtures("mlx_row_ops")
def test_decode_step_multiplies_by_kept_transposes(trained_ckpt, monkeypatch):
    """Every float projection multiplies by the transposed view of its weight that
    the model keeps: the compiled decode step's graph holds one Transpose node fewer
    per Linear (4 a layer and lm_head) than with ``weight.T`` in the graph, nothing
    else changes, and the logits are the same bits."""
    model = build(trained_ckpt)
    assert all(conform_mlx.impl.model.WEIGHT_T in m for m in float_linears(model))
    kept, kept_logits = decode_step_primitives(model), run_logits(model)
    monkeypatch.setattr(Model, "keep_transposes", lambda self: None)
    bare = build(trained_ckpt)
    assert not any(conform_mlx.impl.model.WEIGHT_T in m for m in float_linears(bare))
    plain = decode_step_primitives(bare)
    layers = model.config.num_hidden_layers
    assert len(float_linears(model)) == 4 * layers + 1
    assert plain["Transpose"] - kept["Transpose"] == 4 * layers + 1
    assert all(plain[n] == kept[n] for n in set(plain) | set(kept) if n != "Transpose")
    np.testing.assert_array_equal(run_logits(bare), kept_logits)


def check_replaced_weight_reaches_steps(model: Model) -> None:
    """lm_head's weight replaced by twice itself after load: the logits of an eager
    prefill and of a compiled decode (traced before the change) double exactly."""
    steps = CompiledSteps(model)

    def run() -> tuple[np.ndarray, np.ndarray]:
        cache = PagedKVCache(model.config, 8, 4, model.dtype)
        cache.add_sequence("a")
        eager = to_numpy(prefill(model, cache, "a", PROMPTS["a"]))
        return eager, to_numpy(decode(model, cache, ["a"], [7], steps=steps))

    before = run()
    model.update({"lm_head": {"weight": model.lm_head.weight * 2}})
    for was, now in zip(before, run()):
        np.testing.assert_array_equal(now, 2 * was)


def test_replaced_weights_reach_eager_and_compiled_steps(trained_ckpt):
    check_replaced_weight_reaches_steps(build(trained_ckpt))


def test_stale_transposes_are_caught(trained_ckpt, monkeypatch):
    """The check must fail when a kept view is not made again for a new weight."""
    model = build(trained_ckpt)
    monkeypatch.setattr(Model, "keep_transposes", lambda self: None)
    with pytest.raises(AssertionError):
        check_replaced_weight_reaches_steps(model)


# -- the row kernels (impl.kernels.norm_linear) in a batch-1 step ------------------------
@pytest.mark.skipif(not MEASURED.norm_linear, reason=f"row kernels not used on {active_backend()}")
@pytest.mark.parametrize("dtype", ["float32", "float16", "Q4_0", "Q8_0"])
def test_row_kernels_carry_a_batch1_step(trained_ckpt, trained_dir, dtype, tmp_path):
    """Where the row kernels run, a batch-1 decode step has no RMSNorm and no
    projection matmul of MLX's left: per layer one fused kernel before q/k/v, one
    before the MLP (its activation included), the o and down projections as row
    kernels, and one fused kernel for the final norm and lm_head. The logits match
    MLX's ops on the same weights (batched steps run MLX's ops either way). Q4_0 and
    Q8_0: a GGUF file (4 and 8 bits, groups of 32) run in float32, quantized weights
    de-quantized as the kernels read them, against MLX's quantized matmul."""
    ckpt = trained_ckpt
    if dtype.startswith("Q"):
        gguf = write_gguf(trained_dir, tmp_path / "q.gguf", dtype, embed_qtype=dtype)
        ckpt, dtype = read_checkpoint(gguf), "float32"
    model = build(ckpt, dtype)
    assert model.runs_row_kernels(1) and not model.runs_row_kernels(2)
    with_kernels, logits = decode_step_primitives(model), run_logits(model)
    with use_policy(NO_ROW_KERNELS):
        bare = build(ckpt, dtype)
        without, bare_logits = decode_step_primitives(bare), run_logits(bare)
    layers = model.config.num_hidden_layers
    # (the attention's own matmuls, where its kernel does not take the heads, stay)
    assert without["RMSNorm"] - with_kernels["RMSNorm"] == 2 * layers + 1
    assert with_kernels["RMSNorm"] == 0
    assert sum(without[n] - with_kernels[n] for n in MATMULS) == 4 * layers + 1
    added = with_kernels["CustomKernel"] - without["CustomKernel"]
    assert added == 4 * layers + 1, (with_kernels, without)
    assert nmse(logits, bare_logits) <= NMSE_LIMIT[dtype]
    if dtype == "float32":
        assert np.abs(logits - bare_logits).max() <= FP32_SAME_ENGINE_ATOL


def test_runs_row_kernels_where_the_first_layer_takes_them(trained_ckpt, q4_gguf):
    """``Model.runs_row_kernels`` (which picks a compiled step's early-queued layers)
    says yes for one row of a float model, or one quantized at 4 or 8 bits, where the
    backend uses the kernels, and no for a batch, for other bits, or where the backend
    does not."""
    model, quantized = build(trained_ckpt), build(q4_gguf)
    six_bits = build(trained_ckpt)
    nn.quantize(six_bits, group_size=32, bits=6)
    with use_policy(NO_ROW_KERNELS):
        assert not model.runs_row_kernels(1) and not quantized.runs_row_kernels(1)
    with use_policy(MEASURED.but(norm_linear=True)):
        assert model.runs_row_kernels(1) and quantized.runs_row_kernels(1)
        assert not model.runs_row_kernels(2)
        assert not six_bits.runs_row_kernels(1)
        for layer in model.model.layers:  # q/k/v with a bias: gate/up still takes them
            layer.self_attn.qkv_proj = conform_mlx.impl.model.Linear(8, 8, bias=True)
        assert model.runs_row_kernels(1)


def test_quantized_projections_are_ours(q4_gguf, trained_ckpt):
    """Loading and fusing make ``impl.model.QuantizedLinear`` (the one-row kernel's door),
    not MLX's class, and ``row_weight`` reads its arrays; a tied quantized embedding is
    a head the fused kernel takes."""
    model = build(q4_gguf)
    layer = model.model.layers[0]
    ours = conform_mlx.impl.model.QuantizedLinear
    assert type(layer.self_attn.qkv_proj) is ours and type(layer.self_attn.o_proj) is ours
    assert type(build(q4_gguf, fuse=False).model.layers[0].mlp.up_proj) is ours
    weight = conform_mlx.impl.model.row_weight(layer.mlp.gate_up_proj)
    assert (weight.bits, weight.group_size) == (4, 32)
    assert weight.words is layer.mlp.gate_up_proj.weight
    float_model = build(trained_ckpt)
    embed = float_model.model.embed_tokens
    assert conform_mlx.impl.model.row_weight(embed) is embed.weight
    q_embed = embed.to_quantized(group_size=64, bits=8)
    assert conform_mlx.impl.model.row_weight(q_embed).bits == 8
    biased = conform_mlx.impl.model.Linear(64, 8, bias=True).to_quantized(group_size=32, bits=4)
    assert type(biased) is ours and conform_mlx.impl.model.row_weight(biased) is None


@pytest.mark.parametrize("kind", ["float32", "Q4_0", "Q8_0"])
def test_row_kernel_doors_on_the_ops_twins(trained_dir, kind, tmp_path, monkeypatch):
    """The model's side of the row kernels on any backend: with the kernels replaced by
    their ops twins, a batch-1 step routes every projection through them (4 a layer
    and the head; quantized: ``Quantized`` weights of the file's bits) and its logits
    match MLX's own ops."""
    path = trained_dir
    if kind != "float32":
        path = write_gguf(trained_dir, tmp_path / "q.gguf", kind, embed_qtype=kind)
    ckpt = read_checkpoint(path)
    calls = Counter()

    def counted(name, twin):
        def run(*args, **kwargs):
            weight = args[4] if name == "norm_linear" else args[1]
            calls[name, type(weight).__name__, getattr(weight, "bits", None)] += 1
            return twin(*args, **kwargs)

        monkeypatch.setattr(conform_mlx.impl.kernels, name, run)

    counted("norm_linear", norm_linear_ops)
    counted("linear_row", linear_row_ops)
    with use_policy(MEASURED.but(norm_linear=True, linear_row=True)):
        model = build(ckpt)
        cache = PagedKVCache(model.config, 4, 4, model.dtype)
        cache.add_sequence("a")
        routed = [to_numpy(prefill(model, cache, "a", PROMPTS["a"][:1]))]
        routed.append(to_numpy(decode(model, cache, ["a"], [336])))
    with use_policy(NO_ROW_KERNELS):
        cache = PagedKVCache(model.config, 4, 4, model.dtype)
        cache.add_sequence("a")
        bare = [to_numpy(prefill(model, cache, "a", PROMPTS["a"][:1]))]
        bare.append(to_numpy(decode(model, cache, ["a"], [336])))
    layers = model.config.num_hidden_layers
    kind_name, bits = ("array", None) if kind == "float32" else ("Quantized", int(kind[1]))
    assert calls == {
        ("norm_linear", kind_name, bits): 2 * (2 * layers + 1),
        ("linear_row", kind_name, bits): 2 * (2 * layers),
    }
    np.testing.assert_allclose(
        np.concatenate(routed), np.concatenate(bare), atol=FP32_SAME_ENGINE_ATOL
    )
