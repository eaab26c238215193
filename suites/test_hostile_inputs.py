"""Damaged models through every command that takes one: ``validate``, ``reference`` and
``kld`` each refuse the same table of cases with exit status 2 and one line naming the
file (and the field or tensor), before any work and without writing anything.

GGUF damage is generated, not hand-picked: the file is cut at every boundary between
its sections (header fields, each key-value pair, each tensor's info, the data start,
the middle of a tensor's data), and counts, lengths, types and offsets are overwritten
with values past the end. All go through the one door, ``conform_mlx.models.open_model``.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conform_mlx.cli import main
from conform_mlx.reference.gguf_writer import write_gguf

pytestmark = pytest.mark.impl_only(
    "tests how the conform commands refuse damaged models; they run impl"
)

Damage = Callable[[bytearray, gguf.GGUFReader], None]
COMMANDS = ["validate", "reference", "kld"]


def field_end(field) -> int:
    return field.offset + sum(p.nbytes for p in field.parts)


def section_boundaries(reader: gguf.GGUFReader) -> list[int]:
    """Every offset where one part of the file ends and the next begins."""
    cuts = {4, len(reader.data) - 1}
    cuts |= {field_end(f) for f in reader.fields.values()}
    for t in reader.tensors:
        cuts |= {field_end(t.field), int(t.data_offset), int(t.data_offset) + t.n_bytes // 2}
    return sorted(c for c in cuts if 0 < c < len(reader.data))


def put(fmt: str, value) -> Callable[[bytearray, int], None]:
    def write(data: bytearray, offset: int) -> None:
        struct.pack_into("<" + fmt, data, offset, value)

    return write


def tensor_info(reader: gguf.GGUFReader, index: int) -> dict[str, int]:
    """Byte offsets of one tensor info's parts: n_dims, the type and the data offset."""
    f = reader.tensors[index].field
    starts = np.cumsum([0] + [p.nbytes for p in f.parts])[:-1] + f.offset
    # parts: name length, name, n_dims, dims, type, offset
    return {"n_dims": int(starts[2]), "type": int(starts[4]), "offset": int(starts[5])}


def by_name(reader: gguf.GGUFReader, name: str) -> int:
    return next(i for i, t in enumerate(reader.tensors) if t.name == name)


def at_tensor(name: str, part: str, fmt: str, value) -> Damage:
    def damage(data: bytearray, reader: gguf.GGUFReader) -> None:
        put(fmt, value)(data, tensor_info(reader, by_name(reader, name))[part])

    return damage


def shift_offset(name: str, by: int) -> Damage:
    def damage(data: bytearray, reader: gguf.GGUFReader) -> None:
        where = tensor_info(reader, by_name(reader, name))["offset"]
        old = struct.unpack_from("<Q", data, where)[0]
        struct.pack_into("<Q", data, where, old + by)

    return damage


def in_data(name: str, fmt: str, value, skip: int = 0) -> Damage:
    def damage(data: bytearray, reader: gguf.GGUFReader) -> None:
        put(fmt, value)(data, int(reader.tensors[by_name(reader, name)].data_offset) + skip)

    return damage


def rename_tensor(name: str, to: str) -> Damage:
    def damage(data: bytearray, reader: gguf.GGUFReader) -> None:
        f = reader.tensors[by_name(reader, name)].field
        start = f.offset + f.parts[0].nbytes
        assert len(to) == len(name)
        data[start : start + len(to)] = to.encode()

    return damage


Q8 = "blk.0.attn_q.weight"
NORM = "blk.0.attn_norm.weight"
# (id, damage, what the one error line must also name)
GGUF_DAMAGE: list[tuple[str, Damage, str]] = [
    ("bad-magic", lambda d, r: put("4s", b"GGUX")(d, 0), "not a GGUF file"),
    ("version-99", lambda d, r: put("I", 99)(d, 4), "cannot read GGUF"),
    ("tensor-count-past-end", lambda d, r: put("Q", 2**40)(d, 8), "cannot read GGUF"),
    ("kv-count-past-end", lambda d, r: put("Q", 2**40)(d, 16), "cannot read GGUF"),
    ("key-length-past-end", lambda d, r: put("Q", 2**40)(d, 24), "cannot read GGUF"),
    ("n-dims-9", at_tensor(Q8, "n_dims", "I", 9), "cannot read GGUF"),
    ("unknown-type", at_tensor(Q8, "type", "I", 99), "cannot read GGUF"),
    ("offset-past-end", at_tensor(Q8, "offset", "Q", 2**40), "cannot read GGUF"),
    ("offset-off-alignment", shift_offset(Q8, 1), Q8),
    ("q8_0-relabelled-q4_0", at_tensor(Q8, "type", "I", 2), Q8),
    ("duplicate-name", rename_tensor("blk.0.attn_k.weight", Q8), "cannot read GGUF"),
    # MLX keeps Q8_0 as affine: a bad block scale makes that group's scale and bias.
    ("nan-in-q8_0-scale", in_data(Q8, "H", 0x7E00), "layers.0.self_attn.q_proj."),
    ("inf-in-q8_0-scale", in_data(Q8, "H", 0x7C00), "layers.0.self_attn.q_proj."),
    ("nan-in-f32-norm", in_data(NORM, "f", float("nan"), skip=8), "input_layernorm.weight"),
]


@pytest.fixture(scope="module")
def good_gguf(trained_dir, tmp_path_factory) -> Path:
    return write_gguf(trained_dir, tmp_path_factory.mktemp("gguf") / "good.gguf", "Q8_0")


def damaged_gguf(good: Path, tmp_path: Path, damage: Damage | int) -> Path:
    data = bytearray(good.read_bytes())
    if isinstance(damage, int):
        data = data[:damage]
    else:
        damage(data, gguf.GGUFReader(good))
    out = tmp_path / "damaged.gguf"
    out.write_bytes(bytes(data))
    return out


def nan_safetensors(trained_dir: Path, tmp_path: Path) -> Path:
    model = Path(shutil.copytree(trained_dir, tmp_path / "nan-model"))
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"][1, 2] = np.inf
    save_file(tensors, model / "model.safetensors")
    return model


@pytest.fixture(scope="module")
def good_mlx(trained_dir, tmp_path_factory) -> Path:
    """The trained model in mlx-lm's 4-bit format (by mlx-lm), with its tokenizer."""
    from conform_mlx.engines.mlx_lm_engine import quantize_checkpoint

    out = quantize_checkpoint(trained_dir, tmp_path_factory.mktemp("mlx") / "q4", 4, 32)
    shutil.copy(trained_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def quantization(**fields) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        cfg = json.loads((model / "config.json").read_text())
        cfg["quantization"].update(fields)
        (model / "config.json").write_text(json.dumps(cfg))

    return damage


def whole_quantization(value) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        cfg = json.loads((model / "config.json").read_text())
        cfg["quantization"] = value
        (model / "config.json").write_text(json.dumps(cfg))

    return damage


def tensor_edit(name: str, edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        tensors = load_file(model / "model.safetensors")
        tensors[name] = edit(tensors[name])
        save_file(tensors, model / "model.safetensors")

    return damage


def nan_first(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flat[0] = np.nan
    return a


UP = "model.layers.0.mlp.up_proj"
# (id, damage, what the one error line must also name) on the mlx-lm-format checkpoint.
MLX_DAMAGE = [
    ("bits-7", quantization(bits=7), "quantization.bits"),
    ("group-size-0", quantization(group_size=0), "quantization.group_size"),
    ("group-size-float", quantization(group_size=32.0), "quantization.group_size"),
    ("bits-float", quantization(bits=4.0), "quantization.bits"),
    ("quantization-a-string", whole_quantization("4bit"), "quantization"),
    ("override-a-string", quantization(**{UP: "8bit"}), UP),
    ("scales-a-column-short", tensor_edit(f"{UP}.scales", lambda a: a[:, :-1]), UP),
    ("nan-in-a-scale", tensor_edit(f"{UP}.scales", nan_first), f"{UP}.scales"),
    ("nan-in-a-bias", tensor_edit(f"{UP}.biases", nan_first), f"{UP}.biases"),
]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize(
    "damage,named", [c[1:] for c in MLX_DAMAGE], ids=[c[0] for c in MLX_DAMAGE]
)
def test_damaged_mlx_checkpoint_is_refused(name, damage, named, good_mlx, tmp_path, capsys):
    model = Path(shutil.copytree(good_mlx, tmp_path / "damaged-mlx"))
    damage(model)
    out = tmp_path / "out"
    assert_refused(name, command(name, model, out), out, capsys, "damaged-mlx", named)


def command(name: str, model: Path, out: Path) -> list[str]:
    """``name``'s argv on ``model``, writing under ``out`` if it ever got that far."""
    if name == "validate":
        return ["validate", "--model", str(model), "--tokens", "1,2,3", "--out-dir", str(out)]
    if name == "reference":
        args = ["--ctx", "16", "--max-windows", "1", "--out", str(out / "g.npz")]
        return ["reference", "--model", str(model), *args]
    goldens = str(out.parent / "no-goldens.npz")  # the model is refused before they are read
    args = ["--goldens", goldens, "--out-dir", str(out)]
    return ["kld", "--engine", "impl", "--model", str(model), *args]


def assert_refused(name: str, argv: list[str], out: Path, capsys, *named: str) -> None:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, f"exit status {code!r}, stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"conform {name}: error: "), err
    for text in named:
        assert text in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), "something was written"


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize(
    "damage,named", [c[1:] for c in GGUF_DAMAGE], ids=[c[0] for c in GGUF_DAMAGE]
)
def test_damaged_gguf_is_refused(name, damage, named, good_gguf, tmp_path, capsys):
    model = damaged_gguf(good_gguf, tmp_path, damage)
    out = tmp_path / "out"
    assert_refused(name, command(name, model, out), out, capsys, "damaged.gguf", named)


def test_every_boundary_is_a_case(good_gguf):
    """The truncation cases below reach every section: header, each key-value pair and
    tensor info, the data."""
    reader = gguf.GGUFReader(good_gguf)
    cuts = section_boundaries(reader)
    assert len(cuts) >= 3 + len(reader.fields) + 2 * len(reader.tensors)
    assert cuts[0] == 4 and cuts[-1] == good_gguf.stat().st_size - 1


@pytest.mark.parametrize("name", COMMANDS)
def test_a_gguf_cut_at_any_boundary_is_refused(name, good_gguf, tmp_path, capsys):
    cuts = section_boundaries(gguf.GGUFReader(good_gguf))
    for i, cut in enumerate(cuts):
        model = damaged_gguf(good_gguf, tmp_path, cut)
        out = tmp_path / f"out{i}"
        assert_refused(name, command(name, model, out), out, capsys, "damaged.gguf")


@pytest.mark.parametrize("name", COMMANDS)
def test_non_finite_safetensors_weight_is_refused(name, trained_dir, tmp_path, capsys):
    model = nan_safetensors(trained_dir, tmp_path)
    out = tmp_path / "out"
    argv = command(name, model, out)
    named = ("mlp.down_proj.weight in ", "model.safetensors holds 1 non-finite")
    assert_refused(name, argv, out, capsys, *named)


def test_the_undamaged_file_passes_the_door(good_gguf, tmp_path, capsys):
    """The baseline: the same file undamaged gets past every check above (validate runs;
    it has no tokenizer, which is what reference then names)."""
    out = tmp_path / "out"
    assert main(command("validate", good_gguf, out)) in (0, 1)
    capsys.readouterr()
    assert_refused(
        "reference", command("reference", good_gguf, out / "r"), out / "r", capsys, "no tokenizer"
    )


def test_without_the_door_reference_blames_the_logits(trained_dir, tmp_path, capsys, monkeypatch):
    """The bug this suite guards: ``reference`` once read a model its own way, so a NaN
    weight ran to the end and was reported as NaN logits, the tensor unnamed."""
    import dataclasses

    import conform_mlx.models

    model = nan_safetensors(trained_dir, tmp_path)
    unchecked = dataclasses.replace(conform_mlx.models.open_model(trained_dir), path=model)
    monkeypatch.setattr(conform_mlx.models, "open_model", lambda spec, finite=True: unchecked)
    out = tmp_path / "out"
    with pytest.raises(AssertionError, match="NaN or inf logits"):
        assert_refused("reference", command("reference", model, out), out, capsys, "non-finite")


def test_without_the_layout_check_a_relabelled_tensor_goes_unnamed(
    good_gguf, tmp_path, capsys, monkeypatch
):
    import conform_mlx.impl.gguf

    monkeypatch.setattr(conform_mlx.impl.gguf, "check_layout", lambda reader, path: None)
    model = damaged_gguf(good_gguf, tmp_path, at_tensor(Q8, "type", "I", 2))
    out = tmp_path / "out"
    with pytest.raises(AssertionError):
        assert_refused("validate", command("validate", model, out), out, capsys, Q8)
