"""The ``conform`` command and the README's promises about it."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest

from conform import REPO_ROOT
from conform.cli import main
from reference.checkpoints import write_random_checkpoint


def test_validate_on_the_default_model_passes_and_writes_json(tmp_path, capsys):
    assert (
        main(["validate", "--max-new-tokens", "6", "--block-size", "4", "--out-dir", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    assert "result     PASS" in out and "GQA 4:1" in out
    report = json.loads((tmp_path / "validate-tiny-gqa-float32.json").read_text())
    prompt, gen = report["prompt"]["ids"], report["generated"]["ids"]
    assert report["engine"]["name"] == "impl" and report["block_size"] == 4
    assert report["cache"]["cached_tokens"] == len(prompt) + len(gen) - 1
    assert report["timing"]["decode_steps"] == len(gen) - 1
    assert report["parity"]["nmse"] <= report["parity"]["nmse_limit"]
    assert report["parity"]["greedy_first_divergence"] is None
    assert set(report["checks"]) == {
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
    report = json.loads((tmp_path / "validate-tiny-gqa-float32-mlx-lm.json").read_text())
    assert report["block_size"] is None and "blocks_used" not in report["checks"]
    assert report["cache"]["granularity"] == 256 and report["passed"]
    (peer,) = report["compare"]
    assert peer["tokens"] == report["generated"]["ids"] and peer["decode_steps"] == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--engine", "nope"], "unknown engine 'nope'; known: impl, impl-compiled, mlx-lm, hf"),
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
    import conform.validate

    real = conform.validate.compare_logits
    monkeypatch.setattr(
        conform.validate, "compare_logits", lambda got, ref: real(got + 0.5 * (got.std()), ref)
    )
    assert main(["validate", "--max-new-tokens", "3", "--out-dir", str(tmp_path)]) == 1
    assert "FAIL: parity_nmse" in capsys.readouterr().out


def test_python_m_form_runs():
    out = subprocess.run(
        [sys.executable, "-m", "conform", "validate", "--help"], capture_output=True, text=True
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
