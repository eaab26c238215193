"""Load a checkpoint into the MLX model: a HuggingFace Llama directory or a GGUF file.

A directory holds ``config.json`` and ``model.safetensors`` or a sharded set listed
in ``model.safetensors.index.json``; its weights are floats, or quantized in
mlx-lm's format (``<module>.weight`` uint32-packed with ``.scales`` and ``.biases``,
and ``quantization: {group_size, bits}`` in config.json, per-module overrides
allowed). A ``.gguf`` file is read by ``impl.gguf``. Either way the result is one
``Checkpoint``: the config, HF-named arrays and which modules are quantized how.

Every tensor is checked against the model the config describes before any is
installed: a missing, extra, mis-shaped or wrongly typed tensor is reported by name
and file, and no model is returned. Quantized modules become MLX's
``QuantizedLinear`` / ``QuantizedEmbedding`` and run through ``mx.quantized_matmul``
(their scales and biases cast to the activation dtype), unless ``dequantize=True``
turns them into float weights at load (the CPU's fast path for long runs: MLX's CPU
quantized matmul is ~100x slower than its BLAS at 512 rows).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from conform_mlx.impl.config import ConfigError, LlamaConfig
from conform_mlx.impl.model import Model

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
FLOAT_NAMES = "a floating dtype (float32, float16 or bfloat16)"
# What MLX's affine quantized matmul takes.
QUANT_GROUP_SIZES = (32, 64, 128)
QUANT_BITS = (2, 3, 4, 5, 6, 8)
# The keys of mlx-lm's quantization field that are not module paths.
QUANT_KEYS = ("group_size", "bits", "mode")
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


def read_weights(files: list[Path]) -> dict[str, tuple[mx.array, str]]:
    weights: dict[str, tuple[mx.array, str]] = {}
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
            weights[name] = (arr, str(f))
    return weights


@dataclass
class Checkpoint:
    """What a checkpoint holds, before any of it is installed in a model."""

    config: LlamaConfig
    raw_config: dict  # as config.json holds it (for a GGUF file: made from its metadata)
    weights: dict[str, tuple[mx.array, str]]  # HF name -> (array, the file it came from)
    quantization: dict[str, dict]  # module path -> {"group_size": g, "bits": b}
    summary: str  # e.g. "safetensors", "GGUF F32 x9, Q4_1 x28"


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def read_config(path: str | Path) -> LlamaConfig:
    """The config of a checkpoint directory (config.json) or of a GGUF file (its
    metadata), without reading any weights."""
    path = Path(path)
    if is_gguf(path):
        from conform_mlx.impl import gguf

        reader = gguf._reader(path)
        raw = gguf.config_dict(reader, path, {t.name for t in reader.tensors})
        return LlamaConfig.from_dict(raw, source=str(path))
    return LlamaConfig.from_dir(path)


def quantization_spec(
    raw: object, weights: dict[str, tuple[mx.array, str]], source: str
) -> dict[str, dict]:
    """mlx-lm's ``quantization`` field -> {module: {group_size, bits}} for every module
    whose ``.scales`` the checkpoint holds.

    Accepted is what mlx-lm 0.32 writes: ``group_size`` and ``bits`` as JSON integers
    (32.0 and true are refused by type), ``mode`` "affine" if present, and per-module
    entries that are such an object (mixed-precision recipes) or ``false`` (its AWQ
    tool, for a module left unquantized). Anything else, a group size that does not
    divide a quantized module's input dimension, and packed weights that do not match
    the declared bits and group size are refused naming the file and the field."""
    modules = [n.removesuffix(".scales") for n in weights if n.endswith(".scales")]
    if raw is None:
        if modules:
            raise CheckpointError(
                f"{source}: tensors {modules[0]}.scales and others look quantized, but "
                "config.json has no quantization field"
            )
        return {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: field quantization must be an object, got {_clip(raw)}")

    def params(field: str, d: dict) -> dict:
        mode = d.get("mode", "affine")
        if mode != "affine":
            raise CheckpointError(
                f"{source}: field {field}.mode is {_clip(mode)}; only 'affine' is supported"
            )
        out = {}
        for key, allowed in (("group_size", QUANT_GROUP_SIZES), ("bits", QUANT_BITS)):
            if key not in d:
                raise CheckpointError(f"{source}: field {field}.{key} is missing")
            v = d[key]
            if type(v) is not int:  # bool is an int subclass; 32.0 == 32 would pass `in`
                raise CheckpointError(
                    f"{source}: field {field}.{key} must be an integer, got {_clip(v)} "
                    f"({type(v).__name__})"
                )
            if v not in allowed:
                raise CheckpointError(
                    f"{source}: field {field}.{key} is {v}; supported: "
                    f"{', '.join(map(str, allowed))}"
                )
            out[key] = v
        return out

    default = params("quantization", raw)
    spec = {m: default for m in modules}
    for m, entry in raw.items():
        if m in QUANT_KEYS:
            continue
        field = f"quantization[{m!r}]"
        if entry is False:  # left unquantized: then it must hold no scales
            if m in spec:
                raise CheckpointError(
                    f"{source}: field {field} is false (not quantized), but the checkpoint "
                    f"holds {m}.scales"
                )
            continue
        if not isinstance(entry, dict):
            raise CheckpointError(
                f"{source}: field {field} must be an object {{group_size, bits}} or false, "
                f"got {_clip(entry)}"
            )
        if m not in spec:
            raise CheckpointError(
                f"{source}: field {field} quantizes module {m}, but the checkpoint holds no "
                f"{m}.scales"
            )
        spec[m] = params(field, entry)

    # Packed shapes against the declared bits and group size; every module's input
    # dimension first, so a group size that does not divide one is named as such.
    shapes = []
    for m, q in spec.items():
        field = f"quantization[{m!r}]" if isinstance(raw.get(m), dict) else "quantization"
        packed, f = weights.get(f"{m}.weight", (None, None))
        scales = weights[f"{m}.scales"][0]
        if packed is None or packed.dtype != mx.uint32 or packed.ndim != 2 or scales.ndim != 2:
            continue  # check_weights names the missing or mis-shaped tensor
        g, b = q["group_size"], q["bits"]
        in_dim, rest = divmod(packed.shape[-1] * 32, b)
        if rest:
            raise CheckpointError(
                f"{source}: field {field}.bits is {b}, but {m}.weight in {f} has "
                f"{packed.shape[-1]} uint32 words a row, no whole number of {b}-bit values"
            )
        if in_dim % g:
            raise CheckpointError(
                f"{source}: field {field}.group_size {g} does not divide the input dimension "
                f"{in_dim} of module {m} ({m}.weight in {f}, {b}-bit)"
            )
        shapes.append((m, field, f, g, b, in_dim, scales.shape[-1]))
    for m, field, f, g, b, in_dim, groups in shapes:
        if groups * g != in_dim:
            raise CheckpointError(
                f"{source}: field {field} (group_size {g}, bits {b}) does not match module "
                f"{m} in {f}: {m}.weight packs {in_dim} values a row, {m}.scales has "
                f"{groups} groups, not {in_dim // g}"
            )
    return spec


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Config, arrays and quantization of a checkpoint directory or GGUF file."""
    path = Path(path)
    if is_gguf(path):
        from conform_mlx.impl import gguf

        try:
            raw, arrays, quant, summary = gguf.read(path)
        except gguf.GGUFError as e:
            raise CheckpointError(str(e)) from None
        config = LlamaConfig.from_dict(raw, source=str(path))
        weights = {n: (a, str(path)) for n, a in arrays.items()}
        return Checkpoint(config, raw, weights, quant, summary)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory or a .gguf file")
    config = LlamaConfig.from_dir(path)
    weights = read_weights(weight_files(path))
    raw = json.loads((path / "config.json").read_text())
    quant = quantization_spec(raw.get("quantization"), weights, str(path / "config.json"))
    bits = sorted({q["bits"] for q in quant.values()})
    summary = "safetensors" + (f", {'/'.join(map(str, bits))}-bit (mlx-lm format)" if bits else "")
    return Checkpoint(config, raw, weights, quant, summary)


def dequantized(ckpt: Checkpoint) -> Checkpoint:
    """The same checkpoint with every quantized module turned into float32 weights."""
    weights = dict(ckpt.weights)
    for module, q in ckpt.quantization.items():
        packed, where = weights.pop(f"{module}.weight")
        scales = weights.pop(f"{module}.scales")[0].astype(mx.float32)
        biases = weights.pop(f"{module}.biases")[0].astype(mx.float32)
        weights[f"{module}.weight"] = (mx.dequantize(packed, scales, biases, **q), where)
    summary = f"{ckpt.summary}, de-quantized to float32 at load"
    summary = summary if ckpt.quantization else ckpt.summary
    return Checkpoint(ckpt.config, ckpt.raw_config, weights, {}, summary)


def check_weights(model: Model, weights: dict[str, tuple[mx.array, str]]) -> None:
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
    packed = {n for n in expected if n.endswith(".weight") and n[:-7] + ".scales" in expected}
    for name, shape in expected.items():
        arr, f = weights[name]
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name} in {f} has shape {tuple(arr.shape)}, the config implies "
                f"{tuple(shape)}"
            )
        want = "uint32 (packed quantized)" if name in packed else FLOAT_NAMES
        ok = arr.dtype == mx.uint32 if name in packed else arr.dtype in FLOAT_DTYPES
        if not ok:
            dtype = str(arr.dtype).removeprefix("mlx.core.")
            raise CheckpointError(f"tensor {name} in {f} has dtype {dtype}, expected {want}")


def check_finite(weights: dict[str, tuple[mx.array, str]]) -> None:
    """Refuse NaN or Inf in any float tensor (weights, norms, a quantized module's scales
    and biases), naming the tensor and its file. Unchecked, such a weight surfaces, if
    at all, as bad logits that a report blames on the engine. Runs on MLX's default
    device; packed integer weights cannot hold either value."""
    floats = [(name, a, f) for name, (a, f) in weights.items() if a.dtype in FLOAT_DTYPES]
    if not floats:
        return
    # A sum is NaN or Inf when any element is, and costs a third of an elementwise
    # isfinite on MLX's CPU; a sum that overflowed is told apart by the exact test.
    sums = mx.stack([a.sum().astype(mx.float32) for _, a, _ in floats]).tolist()
    for (name, a, f), total in zip(floats, sums):
        if not math.isfinite(total) and not mx.isfinite(a).all().item():
            bad = int(mx.logical_not(mx.isfinite(a)).sum().item())
            raise CheckpointError(
                f"tensor {name} in {f} holds {bad} non-finite value(s) (NaN or Inf); to "
                "study such a model anyway, skip the check (--allow-non-finite)"
            )


def check_checkpoint(ckpt: Checkpoint, finite: bool = True) -> Model:
    """Check every tensor against the model ``ckpt.config`` describes (names, shapes,
    dtypes, quantization) and, with ``finite``, for NaN and Inf; returns that model,
    still unfilled (MLX allocates its parameters lazily)."""
    model = Model(ckpt.config)
    if ckpt.quantization:
        nn.quantize(model, class_predicate=lambda p, _m: ckpt.quantization.get(p, False))
    check_weights(model, ckpt.weights)
    if finite:
        check_finite(ckpt.weights)
    return model


def build(
    ckpt: Checkpoint, dtype: str | mx.Dtype = "float32", fuse: bool = True, finite: bool = True
) -> Model:
    """A model holding ``ckpt``'s weights: floats cast to ``dtype``; packed quantized
    weights kept, their scales and biases cast to ``dtype`` (the activation dtype).

    The weights are checked and installed under their HF names; then, with ``fuse``,
    each layer's q/k/v and gate/up projections are joined into one matmul each
    (``Model.fuse_projections``), so the model's parameters are named ``qkv_proj``
    and ``gate_up_proj`` where the checkpoint has the separate ones. ``finite``: as
    for ``check_checkpoint``.
    """
    target = parse_dtype(dtype)
    model = check_checkpoint(ckpt, finite)
    model.load_weights(
        [
            (n, a if a.dtype == mx.uint32 else a.astype(target))
            for n, (a, _) in ckpt.weights.items()
        ],
        strict=True,
    )
    if fuse:
        model.fuse_projections()
    mx.eval(model.parameters())
    model.keep_transposes()
    model.weights_format = ckpt.summary
    return model


def load(
    path: str | Path,
    dtype: str | mx.Dtype = "float32",
    dequantize: bool = False,
    fuse: bool = True,
    finite: bool = True,
) -> Model:
    """Build the model a checkpoint directory or GGUF file describes and fill it
    (``fuse``, ``finite``: as for ``build``).

    Raises ConfigError or CheckpointError naming the file and tensor at fault.
    """
    parse_dtype(dtype)  # a bad dtype fails before any file is read
    ckpt = read_checkpoint(path)
    if finite:  # the file's own values, before a cast could turn a large one into inf
        check_finite(ckpt.weights)
    return build(dequantized(ckpt) if dequantize else ckpt, dtype, fuse, finite=False)
