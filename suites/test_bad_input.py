"""Bad input to the ``conform`` commands: exit status 2 and one line on stderr naming
the flag, file or field at fault, before any work is done; a traceback only for a
bug (issue 11).

Every validate case here is refused before the model runs: ``timed_greedy`` is
replaced by one that fails the test, so a check made after the run (or none at all,
and a 51 GB pool) shows up as that failure rather than as minutes of work.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conform_mlx import DEFAULT_MODEL
from conform_mlx.cli import main

pytestmark = pytest.mark.impl_only("tests the conform command's input checks, which run impl")

RANDOM_SHAPE = "tiny-gqa4"  # a random checkpoint: config.json and weights, no tokenizer


@pytest.fixture
def no_run(monkeypatch) -> None:
    import conform_mlx.validate

    def ran(*args, **kwargs):
        raise AssertionError("the run started: the bad input was not refused before it")

    monkeypatch.setattr(conform_mlx.validate, "timed_greedy", ran)


def exit_status(argv: list[str], capsys) -> tuple[int | str | None, str]:
    """``conform argv``'s exit status (argparse's errors raise SystemExit) and stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_refused(code: int | str | None, err: str, prog: str, message: str) -> None:
    assert code == 2, f"exit status {code!r}, stderr: {err!r}"
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and message in last, last


def broken_tokenizer(tmp_path: Path) -> Path:
    model = Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "broken-tokenizer"))
    (model / "tokenizer.json").write_text("{not json")
    return model


# (id, argv given the paths below, message); {random}: a checkpoint without
# tokenizer.json, {broken}: tiny-gqa with a corrupt one, {file}: an existing file.
VALIDATE_CASES = [
    ("block-size-zero", ["--block-size", "0"], "--block-size must be positive, got 0"),
    ("block-size-negative", ["--block-size", "-3"], "--block-size must be positive, got -3"),
    (
        "block-size-past-context",
        ["--block-size", "100000000"],
        "--block-size 100000000 is larger than the model's context length "
        "max_position_embeddings=512",
    ),
    (
        "block-size-past-run",
        ["--block-size", "32"],
        "--block-size 32 is larger than this run needs: 5 prompt + 5 new tokens = 10 slots",
    ),
    ("max-new-tokens-zero", ["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    ("max-new-tokens-negative", ["--max-new-tokens", "-2"], "--max-new-tokens must be positive"),
    (
        "max-new-tokens-past-context",
        ["--max-new-tokens", "100000000"],
        "exceeds the context length max_position_embeddings=512",
    ),
    (
        "default-prompt-without-tokenizer",
        ["--model", "{random}"],
        "in a GGUF file), so the default prompt 'The quick brown fox' cannot be encoded; "
        "pass --tokens IDS",
    ),
    (
        "prompt-without-tokenizer",
        ["--model", "{random}", "--prompt", "hello"],
        "has no tokenizer (tokenizer.json, or tokenizer metadata in a GGUF file), so "
        "--prompt cannot be encoded; pass --tokens IDS",
    ),
    ("empty-prompt", ["--prompt", ""], "--prompt is empty"),
    ("empty-tokens", ["--tokens", " "], "argument --tokens: wants at least one token id"),
    (
        "corrupt-tokenizer",
        ["--model", "{broken}"],
        "broken-tokenizer/tokenizer.json: cannot be read as a tokenizer",
    ),
    (
        "corrupt-tokenizer-with-tokens",
        ["--model", "{broken}", "--tokens", "1,2"],
        "broken-tokenizer/tokenizer.json: cannot be read as a tokenizer",
    ),
    ("out-dir-is-a-file", ["--out-dir", "{file}"], "a-file: exists and is not a directory"),
    ("out-dir-under-a-file", ["--out-dir", "{file}/reports"], "a-file/reports: cannot create"),
]


@pytest.mark.parametrize(
    "argv,message", [c[1:] for c in VALIDATE_CASES], ids=[c[0] for c in VALIDATE_CASES]
)
def test_validate_refuses_bad_input_before_the_run(
    argv, message, checkpoint, tmp_path, capsys, no_run
):
    paths = {"random": "", "broken": "", "file": str(tmp_path / "a-file")}
    (tmp_path / "a-file").write_text("")
    if "{random}" in argv:
        paths["random"] = str(checkpoint(RANDOM_SHAPE))
    if "{broken}" in argv:
        paths["broken"] = str(broken_tokenizer(tmp_path))
    argv = [a.format(**paths) for a in argv]
    out = [] if "--out-dir" in argv else ["--out-dir", str(tmp_path / "reports")]
    code, err = exit_status(["validate", *argv, *out], capsys)
    assert_refused(code, err, "conform validate", message)


def set_config(model: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads((model / "config.json").read_text())
    edit(cfg)
    (model / "config.json").write_text(json.dumps(cfg))


def _index_with_an_empty_weight_map(model: Path) -> None:
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": []}))


# The loader's own tests (test_loader.py) cover each field; these show the command's
# exit status for the faults that escaped it as tracebacks.
CHECKPOINT_CASES = [
    (
        "rms_norm_eps-null",
        lambda m: set_config(m, lambda c: c.update(rms_norm_eps=None)),
        "config.json: field rms_norm_eps must be a number, got None",
    ),
    (
        "rope_theta-null",
        lambda m: set_config(m, lambda c: c["rope_parameters"].update(rope_theta=None)),
        "config.json: field rope_parameters.rope_theta must be a number, got None",
    ),
    (
        "hidden_act-gelu",
        lambda m: set_config(m, lambda c: c.update(hidden_act="gelu")),
        "config.json: hidden_act 'gelu' is not implemented",
    ),
    (
        "weight_map-list",
        _index_with_an_empty_weight_map,
        "model.safetensors.index.json: field weight_map must be a non-empty object",
    ),
]


@pytest.mark.parametrize(
    "fault,message", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_validate_refuses_a_bad_checkpoint(fault, message, checkpoint, tmp_path, capsys, no_run):
    model = Path(shutil.copytree(checkpoint(RANDOM_SHAPE), tmp_path / "model"))
    fault(model)
    argv = ["validate", "--model", str(model), "--tokens", "1,2,3"]
    code, err = exit_status([*argv, "--out-dir", str(tmp_path / "reports")], capsys)
    assert_refused(code, err, "conform validate", message)


MAKE_CHECKPOINT_CASES = [
    ("out-dir-is-a-file", ["{file}"], "out_dir {file}: exists and is not a directory"),
    ("out-dir-under-a-file", ["{file}/ckpt"], "out_dir {file}/ckpt: cannot create it"),
    ("seed-negative", ["{dir}", "--seed", "-1"], "argument --seed: must be in [0, 2**32)"),
    ("seed-past-64-bits", ["{dir}", "--seed", str(2**64)], "argument --seed: must be in"),
]


@pytest.mark.parametrize(
    "argv,message",
    [c[1:] for c in MAKE_CHECKPOINT_CASES],
    ids=[c[0] for c in MAKE_CHECKPOINT_CASES],
)
def test_make_checkpoint_refuses_bad_arguments(argv, message, tmp_path, capsys):
    paths = {"file": str(tmp_path / "a-file"), "dir": str(tmp_path / "ckpt")}
    (tmp_path / "a-file").write_text("")
    argv = [a.format(**paths) for a in argv]
    code, err = exit_status(["make-checkpoint", "tiny-mqa", *argv], capsys)
    assert_refused(code, err, "conform make-checkpoint", message.format(**paths))


TRAIN_TINY_CASES = [
    ("steps-zero", ["--steps", "0"], "argument --steps: must be positive, got 0"),
    ("steps-negative", ["--steps", "-1"], "argument --steps: must be positive, got -1"),
    # --steps 1: where the argument is not checked, the test fails in seconds, not minutes.
    ("seed-negative", ["--seed", "-1", "--steps", "1"], "argument --seed: must be in [0, 2**32)"),
    ("out-is-a-file", ["--out", "{file}", "--steps", "1"], "{file}: exists and is not a directory"),
]


@pytest.mark.parametrize(
    "argv,message", [c[1:] for c in TRAIN_TINY_CASES], ids=[c[0] for c in TRAIN_TINY_CASES]
)
def test_train_tiny_refuses_bad_arguments(argv, message, tmp_path, capsys):
    paths = {"file": str(tmp_path / "a-file")}
    (tmp_path / "a-file").write_text("")
    argv = [a.format(**paths) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "ckpt")]
    code, err = exit_status(["train-tiny", *argv, *out], capsys)
    assert_refused(code, err, "conform train-tiny", message.format(**paths))
