"""No import name of ours is another installed distribution's.

transformers 5.25 imports Hugging Face's ``kernels`` package whenever it is installed;
a top-level ``kernels`` package of ours, first on ``sys.path`` under ``python -m
pytest``, was imported in its place and every suite failed at collection. The names
that can collide are the ones our distribution installs and the root folders that are
regular packages (importable by name from a checkout). docs/layout.md states the rule.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from conform_mlx import REPO_ROOT

pytestmark = pytest.mark.impl_only("checks this project's import names against installed packages")

DIST = "conform-mlx"
# What a fresh process started in a checkout does when transformers loads its kernel
# hub: it imports Hugging Face's ``kernels``, which must win over anything of ours.
HF_KERNELS_PROBE = (
    "import kernels; from kernels import CUDAProperties; "
    "from transformers import LlamaConfig; "
    "import conform_mlx.cli, conform_mlx.reference.hf, conform_mlx.impl.model; "
    "print(kernels.__file__)"
)


def our_import_names(root: Path = REPO_ROOT) -> set[str]:
    """Top-level names our distribution installs, and the root folders that are
    regular packages (a folder without ``__init__.py`` shadows nothing: a namespace
    portion loses to a regular package found later on the path)."""
    installed = {
        name for name, dists in importlib.metadata.packages_distributions().items() if DIST in dists
    }
    return installed | {p.parent.name for p in root.glob("*/__init__.py")}


def clashes(ours: set[str], installed: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each of ``ours`` that another distribution also provides, with those distributions."""
    return {
        name: others
        for name in sorted(ours)
        if (others := sorted({d for d in installed.get(name, []) if d != DIST}))
    }


def test_no_name_of_ours_is_another_distributions():
    ours = our_import_names()
    assert "conform_mlx" in ours and "suites" in ours
    assert clashes(ours, importlib.metadata.packages_distributions()) == {}


def test_a_clash_is_caught():
    installed = {"kernels": ["kernels"], "conform_mlx": [DIST], "mlx": ["mlx", "mlx-cpu"]}
    assert clashes({"kernels", "conform_mlx"}, installed) == {"kernels": ["kernels"]}


def test_root_kernels_folder_is_not_a_package():
    assert (REPO_ROOT / "kernels").is_dir()
    assert not (REPO_ROOT / "kernels" / "__init__.py").exists()


def probe(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HF_KERNELS_PROBE], cwd=cwd, capture_output=True, text=True
    )


def test_hf_kernels_imports_beside_ours():
    """Run from the repository root, where ``sys.path`` starts with the checkout."""
    done = probe(REPO_ROOT)
    assert done.returncode == 0, done.stderr
    hf_kernels = Path(importlib.metadata.distribution("kernels").locate_file("kernels"))
    assert Path(done.stdout.strip()).resolve().parent == hf_kernels.resolve()


def test_a_kernels_package_at_the_root_would_shadow_it(tmp_path):
    """The bug itself: a root folder ``kernels/`` with ``__init__.py`` wins."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    done = probe(tmp_path)
    assert done.returncode != 0
    assert "CUDAProperties" in done.stderr
