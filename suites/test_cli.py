"""The ``conform`` command and the README's promises about it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conform_mlx import DEFAULT_MODEL, REPO_ROOT, VERSIONED, versions
from conform_mlx.cli import main
from conform_mlx.metrics import compare_logits
from conform_mlx.reference.checkpoints import write_random_checkpoint
from conform_mlx.validate_io import write_json

pytestmark = pytest.mark.impl_only("tests the conform command, which runs impl")

KNOWN = "impl, impl-compiled, impl-dequantized, impl-batch-invariant, mlx-lm, hf, llama.cpp"


def test_validate_on_the_default_model_passes_and_writes_json(tmp_path, capsys):
    assert (
        main(["validate", "--max-new-tokens", "6", "--block-size", "4", "--out-dir", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    assert "result     PASS" in out and "GQA 4:1" in out
    (path,) = tmp_path.glob("validate-tiny-gqa-float32-bs4-impl-*.json")
    report = json.loads(path.read_text())
    prompt, gen = report["prompt"]["ids"], report["generated"]["ids"]
    assert report["engine"]["name"] == "impl" and report["block_size"] == 4
    assert report["cache"]["cached_tokens"] == len(prompt) + len(gen) - 1
    assert report["timing"]["decode_steps"] == len(gen) - 1
    assert report["parity"]["nmse"] <= report["parity"]["nmse_limit"]
    assert report["parity"]["greedy_first_divergence"] is None
    assert report["parity"]["greedy_identical"] and report["parity"]["non_finite"] == {}
    assert report["failures"] == {}
    assert report["versions"] == versions() and report["versions"]["mlx"] == mx.__version__
    assert f"versions   mlx {mx.__version__}, mlx-lm " in out
    assert set(report["checks"]) == {
        "logits_finite",
        "parity_nmse",
        "cached_tokens_rule",
        "kv_bytes_match_formula",
        "blocks_used",
    }


def test_validate_another_engine_and_compare_a_third(tmp_path, capsys):
    """--engine picks what is validated (its own JSON file); --compare times more."""
    pytest.importorskip("mlx_lm", reason="needs the peers extra")
    argv = ["validate", "--engine", "mlx-lm", "--compare", "impl-compiled"]
    assert main([*argv, "--max-new-tokens", "3", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "engine     mlx-lm (mlx-lm " in out and "compare    impl-compiled" in out
    (path,) = tmp_path.glob("validate-tiny-gqa-float32-mlx-lm-*.json")
    report = json.loads(path.read_text())
    assert report["block_size"] is None and "blocks_used" not in report["checks"]
    assert report["cache"]["granularity"] == 256 and report["passed"]
    (peer,) = report["compare"]
    assert peer["tokens"] == report["generated"]["ids"] and peer["decode_steps"] == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--engine", "nope"], f"unknown engine 'nope'; known: {KNOWN}"),
        (["--compare", "nope"], "unknown engine 'nope'"),
        (["--engine", "hf", "--dtype", "float16"], "the HF reference runs in float32 only"),
    ],
)
def test_validate_refuses_an_engine_it_cannot_run(tmp_path, capsys, argv, message):
    assert main(["validate", *argv, "--out-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_validate_reports_bad_input_with_exit_status_2(tmp_path, capsys):
    code = main(["validate", "--tokens", "1,99999", "--out-dir", str(tmp_path)])
    assert code == 2
    assert "token id 99999 at index 1 is outside the vocabulary [0, 512)" in capsys.readouterr().err
    assert main(["validate", "--model", str(tmp_path), "--tokens", "1"]) == 2
    assert "config.json: not found" in capsys.readouterr().err


def test_validate_fails_when_parity_breaks(tmp_path, monkeypatch, capsys):
    import conform_mlx.validate

    real = conform_mlx.validate.compare_logits
    monkeypatch.setattr(
        conform_mlx.validate,
        "compare_logits",
        lambda got, ref, **kw: real(got + 0.5 * (got.std()), ref, **kw),
    )
    assert main(["validate", "--max-new-tokens", "3", "--out-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: parity_nmse" in out and "parity_nmse: NMSE " in out


def strict_load(path: Path) -> dict:
    """json.loads that refuses NaN and Infinity, as strict JSON parsers do."""

    def refuse(constant: str):
        raise ValueError(f"{path.name}: bare {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_non_finite_logits_are_named_and_agree_with_nothing():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 32)).astype(np.float32)
    got = ref.copy()
    got[2, 5] = np.inf
    d = compare_logits(got, ref)
    assert d.non_finite == {"ours": [2]}
    assert d.top1_agreement is None and d.top5_overlap is None and d.cosine is None
    # inf, not NaN: a limit check fails whichever way it is written
    assert not d.nmse <= 1e-10 and d.nmse > 1e-10 and d.max_abs > 0
    ref[0] = np.nan
    d = compare_logits(got, ref, first_position=4)
    assert d.non_finite == {"ours": [6], "reference": [4]}
    assert compare_logits(ref[1:], ref[1:]).non_finite == {}


def nan_model(tmp_path: Path) -> Path:
    model = Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "nan-model"))
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"][3] = np.nan
    save_file(tensors, model / "model.safetensors")
    return model


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, capsys):
    argv = ["validate", "--model", str(nan_model(tmp_path)), "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tensor model.norm.weight in " in err and "1 non-finite value(s)" in err
    assert "--allow-non-finite" in err and not list((tmp_path / "out").glob("*"))


def test_allowed_nan_weights_fail_with_every_metric_saying_so(tmp_path, capsys):
    """Both sides load the NaN, so both are named; no agreement is claimed; strict JSON."""
    model = nan_model(tmp_path)
    argv = ["validate", "--model", str(model), "--max-new-tokens", "2", "--allow-non-finite"]
    assert main([*argv, "--out-dir", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "FAIL: logits_finite, parity_nmse" in out and "100.0%" not in out
    assert "greedy tokens: not compared (non-finite logits)" in out
    (path,) = (tmp_path / "out").glob("validate-nan-model-float32-bs16-impl-*.json")
    report = strict_load(path)
    p, positions = report["parity"], list(range(6))  # 5 prompt + 2 generated - 1
    assert p["non_finite"] == {"ours": positions, "reference": positions}
    assert p["top1_agreement"] is None and p["top5_overlap"] is None
    assert p["greedy_identical"] is None and p["nmse"] is None and p["max_abs"] is None
    assert not report["checks"]["logits_finite"] and not report["checks"]["parity_nmse"]
    assert report["failures"]["logits_finite"].startswith(
        "NaN or inf in ours at 6 positions (0, 1, 2, 3, 4, 5); reference at 6 positions"
    )


def test_report_is_strict_json_written_whole(tmp_path, monkeypatch):
    import conform_mlx.validate_io

    report = {
        "model_dir": "/m/tiny",
        "dtype": "float16",
        "block_size": 8,
        "engine": {"name": "impl"},
        "digest": "0123abcd",
        "parity": {"nmse": float("nan"), "max_abs": np.float32("inf"), "ok": np.int64(3)},
    }
    path = write_json(report, tmp_path)
    assert path.name == "validate-tiny-float16-bs8-impl-0123abcd.json"
    assert strict_load(path)["parity"] == {"nmse": None, "max_abs": None, "ok": 3}

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conform_mlx.validate_io.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_json({**report, "new": 1}, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # old report, no temp file
    assert "new" not in strict_load(path)


def test_report_names_say_what_was_run(tmp_path, capsys):
    """Another block size, prompt or same-named model folder: another file."""
    same_name = Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "elsewhere" / "tiny-gqa"))
    runs = [
        ["--block-size", "4"],
        ["--block-size", "8"],
        ["--block-size", "4", "--tokens", "1,264,319"],
        ["--block-size", "4", "--model", str(same_name)],
    ]
    for argv in runs:
        assert main(["validate", *argv, "--max-new-tokens", "2", "--out-dir", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.glob("validate-*.json"))
    assert len(names) == len(runs), names
    assert sum(n.startswith("validate-tiny-gqa-float32-bs4-impl-") for n in names) == 3


def test_python_m_form_runs():
    out = subprocess.run(
        [sys.executable, "-m", "conform_mlx", "validate", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--max-new-tokens" in out.stdout
    assert "--engine ENGINE" in out.stdout and "--compare ENGINE" in out.stdout


def test_random_checkpoints_are_deterministic(tmp_path):
    digest = []
    for run in ("a", "b"):
        path = write_random_checkpoint("tiny-mqa", tmp_path / run, seed=5)
        digest.append(hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest())
    assert digest[0] == digest[1]
    other = write_random_checkpoint("tiny-mqa", tmp_path / "c", seed=6)
    assert hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest() != digest[0]


def test_versions_names_every_release_reports_depend_on(capsys):
    assert main(["versions"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(VERSIONED)
    assert f"torch {importlib.metadata.version('torch')}" in lines


def readme() -> str:
    return (REPO_ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    command = re.search(
        r"```sh\n(pip install -e '\.\[cpu,test\]' && python -m pytest suites/)\n```", readme()
    )
    assert command, "README's quickstart test command not found"
    assert command.group(1) in (REPO_ROOT / ".ci" / "run").read_text()


def test_api_doc_python_example_runs(monkeypatch, capsys):
    block = (REPO_ROOT / "docs" / "api.md").read_text().split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", block, flags=re.S)
    assert len(code) == 2
    monkeypatch.chdir(REPO_ROOT)
    for snippet in code:
        exec(compile(snippet, "docs/api.md", "exec"), {})
    assert "(2, 512)" in capsys.readouterr().out
