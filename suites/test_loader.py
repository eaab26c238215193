"""Checkpoint loading: both config layouts, sharded files, and one clear error per
kind of bad input, naming the file and tensor at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from conform_mlx.impl.config import ConfigError, LlamaConfig
from conform_mlx.impl.loader import CheckpointError, check_finite, load

pytestmark = [
    pytest.mark.impl_only("tests impl's checkpoint loader and its errors"),
    pytest.mark.checkpoint_group("tiny-gqa4", param="shape"),
]

SHAPE = "tiny-gqa4"


@pytest.fixture
def ckpt(checkpoint, tmp_path) -> Path:
    """A private, editable copy of a small random checkpoint."""
    return Path(shutil.copytree(checkpoint(SHAPE), tmp_path / "ckpt"))


NULL = object()  # edit_config writes JSON null for it; None drops the field


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = None if v is NULL else v
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path: Path, fn) -> None:
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_loads_in_each_dtype(ckpt):
    for name, dt in [("float32", mx.float32), ("float16", mx.float16), ("bfloat16", mx.bfloat16)]:
        m = load(ckpt, name)
        assert m.model.layers[0].self_attn.qkv_proj.weight.dtype == dt  # k_proj's rows in it


def test_old_rope_theta_layout_loads_the_same_base(ckpt):
    edit_config(ckpt, rope_parameters=None, rope_theta=500000.0)
    assert LlamaConfig.from_dir(ckpt).rope_theta == 500000.0
    edit_config(
        ckpt, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}
    )
    assert LlamaConfig.from_dir(ckpt).rope_theta == 500000.0


@pytest.mark.parametrize("shape", ["tiny-gqa8", "tiny-hd128", "tiny-llama3-rope"])
def test_rope_frequencies_equal_hf(checkpoint, shape):
    from conform_mlx.reference.hf import hf_inv_freq

    path = checkpoint(shape)
    np.testing.assert_array_equal(LlamaConfig.from_dir(path).inv_freq(), hf_inv_freq(path))


def test_sharded_checkpoint_loads_like_the_single_file(ckpt, tmp_path):
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(ckpt / "config.json", sharded)
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / file)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # Unfused, so the parameters keep the checkpoint's names, one per tensor.
    a = dict(tree_flatten(load(ckpt, fuse=False).parameters()))
    b = dict(tree_flatten(load(sharded, fuse=False).parameters()))
    assert a.keys() == b.keys() and len(a) == len(names)
    for name in a:
        np.testing.assert_array_equal(np.array(a[name]), np.array(b[name]), err_msg=name)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors"):
        load(sharded)


LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CONFIG_FAULTS = [
    # (description, config changes, error pattern)
    ("unsupported model_type", {"model_type": "mistral"}, "unsupported model_type 'mistral'"),
    ("missing field", {"hidden_size": None}, "missing required field.*hidden_size"),
    ("bad field", {"num_hidden_layers": -2}, "num_hidden_layers must be a positive integer"),
    ("heads mismatch", {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    (
        "unimplemented rope scaling",
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}},
        "rope scaling type 'dynamic' is not implemented",
    ),
    (
        "linear scaling without its factor",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}},
        "linear rope scaling needs field factor",
    ),
    (
        "linear scaling by zero",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 0.0}},
        "linear rope scaling field factor must be positive, got 0.0",
    ),
    (
        "yarn scaling without its original context",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
        "yarn rope scaling needs field original_max_position_embeddings",
    ),
    (
        "yarn with DeepSeek's mscale",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e4,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "mscale": 0.7,
            }
        },
        "yarn rope scaling field mscale is not implemented",
    ),  # fmt: skip
    (
        "yarn with a negative beta",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e4,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_slow": -1.0,
            }
        },
        "beta_fast and beta_slow must be positive",
    ),  # fmt: skip
    (
        "llama3 scaling without its fields",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}},
        "llama3 rope scaling needs field",
    ),
    # Values that were read as given and then misused (a TypeError deep in the model, or
    # NaN logits), each refused by name (issue 11).
    ("required field null", {"vocab_size": NULL}, "vocab_size must be a positive integer"),
    ("rms_norm_eps null", {"rms_norm_eps": NULL}, "field rms_norm_eps must be a number, got None"),
    ("rms_norm_eps a string", {"rms_norm_eps": "1e-5"}, "field rms_norm_eps must be a number"),
    ("rms_norm_eps negative", {"rms_norm_eps": -1e-5}, "rms_norm_eps must be a positive number"),
    (
        "rope_theta null",
        {"rope_parameters": {"rope_type": "default", "rope_theta": None}},
        "field rope_parameters.rope_theta must be a number, got None",
    ),
    (
        "top-level rope_theta null",
        {"rope_parameters": None, "rope_theta": NULL},
        "field rope_theta must be a number, got None",
    ),
    *[
        (
            f"rope_theta {theta}",
            {"rope_parameters": {"rope_type": "default", "rope_theta": theta}},
            "rope_theta must be a positive number",
        )
        for theta in (-10000.0, 0)
    ],
    ("hidden_act gelu", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not implemented"),
    *[
        (
            f"llama3 {field} {value}",
            {"rope_parameters": {**LLAMA3, field: value}},
            f"llama3 rope scaling field {field} must be positive",
        )
        for field, value in [
            ("factor", 0.0),
            ("low_freq_factor", -1.0),
            ("high_freq_factor", 0.0),
            ("original_max_position_embeddings", 0),
        ]
    ],
    ("eos_token_id a string", {"eos_token_id": "</s>"}, "eos_token_id must be a token id"),
]


@pytest.mark.parametrize("what,changes,pattern", CONFIG_FAULTS, ids=[c[0] for c in CONFIG_FAULTS])
def test_config_faults_are_named(ckpt, what, changes, pattern):
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=pattern) as e:
        load(ckpt)
    assert "config.json" in str(e.value)


def test_missing_or_malformed_config(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: not found"):
        load(ckpt)
    with pytest.raises(ConfigError, match="not a directory"):
        load(tmp_path / "nowhere")


def test_silu_spelled_either_way_loads(ckpt):
    for act in ("silu", "swish"):
        edit_config(ckpt, hidden_act=act)
        assert LlamaConfig.from_dir(ckpt).hidden_act == act


@pytest.mark.parametrize("weight_map", [[], {}, {"model.norm.weight": 1}, "model.safetensors"])
def test_index_must_map_tensor_names_to_files(ckpt, weight_map):
    (ckpt / "model.safetensors").unlink()
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CheckpointError, match="index.json: field weight_map must be a non-empty object"
    ):
        load(ckpt)


TENSOR_FAULTS = [
    (
        "missing",
        lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
        r"1 tensor\(s\) missing.*layers\.1\.mlp\.up_proj",
    ),
    (
        "extra",
        lambda t: t.update({"model.layers.9.mlp.up_proj.weight": np.zeros((2, 2), np.float32)}),
        r"unexpected tensor\(s\) in .*model\.safetensors.*layers\.9\.mlp\.up_proj",
    ),
    (
        "mis-shaped",
        lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}),
        r"model\.norm\.weight in .*model\.safetensors has shape \(7,\), "
        r"the config implies \(128,\)",
    ),
    (
        "integer dtype",
        lambda t: t.update({"model.norm.weight": np.ones(128, np.int32)}),
        r"model\.norm\.weight .* has dtype int32, expected a floating dtype",
    ),
]


@pytest.mark.parametrize("what,fault,pattern", TENSOR_FAULTS, ids=[f[0] for f in TENSOR_FAULTS])
def test_tensor_faults_are_named(ckpt, what, fault, pattern):
    edit_tensors(ckpt, fault)
    with pytest.raises(CheckpointError, match=pattern):
        load(ckpt)


def test_no_weights_and_bad_dtype(ckpt):
    with pytest.raises(ValueError, match="unsupported dtype 'float64'"):
        load(ckpt, "float64")
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors"):
        load(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match="no model.safetensors or model.safetensors.index.json"
    ):
        load(ckpt)


NON_FINITE = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.0.mlp.up_proj.scales"])
def test_a_non_finite_weight_is_named(name, dtype, value):
    x = np.ones(4096, np.float32)
    x[4000] = value
    weights = {"lm_head.weight": (mx.ones((4, 4)), "a.safetensors")}
    weights[name] = (mx.array(x).astype(dtype), "b.safetensors")
    with pytest.raises(CheckpointError, match=rf"^tensor {name} in b\.safetensors holds 1 non-"):
        check_finite(weights)


def test_a_sum_that_overflows_is_not_refused():
    """The check screens with a sum: 4096 float16 values of 60000 sum past float16's
    range, yet every one is finite."""
    big = mx.full((4096,), 60000.0, dtype=mx.float16)
    assert not np.isfinite(np.array(big.sum().astype(mx.float32)))  # the screen trips
    check_finite({"model.norm.weight": (big, "a.safetensors")})


def test_load_refuses_a_nan_checkpoint_unless_told(checkpoint, tmp_path):
    src = checkpoint("tiny-gqa4")
    dst = Path(shutil.copytree(src, tmp_path / "nan"))
    tensors = load_file(dst / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = np.nan
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match="self_attn.k_proj.weight in .*holds 1 non-finite"):
        load(dst)
    load(dst, finite=False)  # --allow-non-finite's path: it loads
