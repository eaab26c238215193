"""Load a HuggingFace Llama checkpoint directory into the MLX model.

Accepts ``model.safetensors`` or a sharded set listed in
``model.safetensors.index.json``. Every tensor is checked against the model the
config describes before any is installed: a missing, extra, mis-shaped or
non-float tensor is reported by name and file, and no model is returned.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from impl.config import ConfigError, LlamaConfig
from impl.model import Model

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# Older checkpoints saved RoPE's inverse frequencies as buffers; we derive them from
# the config instead, so these entries carry no information we need.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """The weight files do not match the model config.json describes."""


def parse_dtype(name: str | mx.Dtype) -> mx.Dtype:
    if isinstance(name, mx.Dtype):
        if name not in FLOAT_DTYPES:
            raise ValueError(f"unsupported dtype {name!s}; choose one of {', '.join(DTYPES)}")
        return name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def weight_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        raise CheckpointError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json found"
        )
    try:
        raw = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    # Tensor name -> shard file name; anything else would fail later with no file named.
    if not (
        isinstance(weight_map, dict)
        and weight_map
        and all(isinstance(v, str) and v for v in weight_map.values())
    ):
        raise CheckpointError(
            f"{index}: field weight_map must be a non-empty object mapping tensor names to "
            f"shard file names, got {_clip(weight_map)}"
        )
    files = [model_dir / name for name in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist")
    return files


def _clip(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_weights(files: list[Path]) -> dict[str, tuple[mx.array, Path]]:
    weights: dict[str, tuple[mx.array, Path]] = {}
    for f in files:
        try:
            tensors = mx.load(str(f))
        except Exception as e:  # MLX raises a bare RuntimeError/ValueError on bad files
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
        for name, arr in tensors.items():
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name in weights:
                raise CheckpointError(f"tensor {name} appears in both {weights[name][1]} and {f}")
            weights[name] = (arr, f)
    return weights


def check_weights(model: Model, weights: dict[str, tuple[mx.array, Path]]) -> None:
    expected = {name: p.shape for name, p in tree_flatten(model.parameters())}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {', '.join(missing[:5])}"
        )
    if extra:
        files = sorted({str(weights[n][1]) for n in extra})
        raise CheckpointError(
            f"{len(extra)} unexpected tensor(s) in {', '.join(files)}, e.g. {', '.join(extra[:5])}"
        )
    for name, shape in expected.items():
        arr, f = weights[name]
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name} in {f} has shape {tuple(arr.shape)}, config.json implies "
                f"{tuple(shape)}"
            )
        if arr.dtype not in FLOAT_DTYPES:
            dtype = str(arr.dtype).removeprefix("mlx.core.")
            raise CheckpointError(
                f"tensor {name} in {f} has dtype {dtype}, expected a floating dtype "
                "(float32, float16 or bfloat16)"
            )


def load(model_dir: str | Path, dtype: str | mx.Dtype = "float32") -> Model:
    """Build the model ``config.json`` describes and fill it from the safetensors files.

    Weights are cast to ``dtype``. Raises ConfigError or CheckpointError naming the
    file and tensor at fault.
    """
    model_dir = Path(model_dir)
    target = parse_dtype(dtype)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: not a directory")
    config = LlamaConfig.from_dir(model_dir)
    # MLX initialises parameters lazily, so this allocates nothing until the real
    # weights replace the placeholders.
    model = Model(config)
    weights = read_weights(weight_files(model_dir))
    check_weights(model, weights)
    model.load_weights([(n, a.astype(target)) for n, (a, _) in weights.items()], strict=True)
    mx.eval(model.parameters())
    return model
