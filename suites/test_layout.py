"""The import graph stays as designed: the suites, benchmarks and tools use only the
public names of impl/ (its kernels included), and each engine has one adapter (mlx-lm is
imported by exactly one production module)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conform_mlx import REPO_ROOT

CONSUMERS = ("suites", "conform_bench", "tools")
PRODUCTION = ("impl", "conform_mlx", "reference", "conform_bench", "tools")
GUARDED = "conform_mlx.impl"
MLX_LM_ADAPTER = "conform_mlx/engines/mlx_lm_engine.py"


def python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO_ROOT / f).rglob("*.py"))


def private_uses(source: str) -> list[str]:
    """Private names of impl (and its kernels) that ``source`` imports, reads or patches."""
    tree = ast.parse(source)
    modules: set[str] = set()  # local names bound to impl modules or objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _guarded(node.module or ""):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _guarded(alias.name):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if not node.attr.startswith("__") and _root(node.value) in modules:
                found.append(f"{ast.unparse(node)}")
        elif isinstance(node, ast.Call) and _is_setattr(node) and len(node.args) >= 2:
            target, name = node.args[0], node.args[1]
            if (
                _root(target) in modules
                and isinstance(name, ast.Constant)
                and str(name.value).startswith("_")
                and not str(name.value).startswith("__")
            ):
                found.append(f"setattr({ast.unparse(target)}, {name.value!r})")
    return found


def _guarded(module: str) -> bool:
    return module == GUARDED or module.startswith(GUARDED + ".")


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_setattr(node: ast.Call) -> bool:
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "setattr") or (
        isinstance(f, ast.Name) and f.id == "setattr"
    )


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_consumers_use_only_public_names():
    offenders = {
        str(p.relative_to(REPO_ROOT)): uses
        for p in python_files(*CONSUMERS)
        if (uses := private_uses(p.read_text()))
    }
    assert offenders == {}


@pytest.mark.parametrize(
    "source",
    [
        "from conform_mlx.impl.paged_cache import _Pools",
        "import conform_mlx.impl.engine\nconform_mlx.impl.engine._compiled_step(1)",
        "from conform_mlx.impl.kernels import rope\nrope._memo.clear()",
        "from conform_mlx.impl import model\nmodel._x",
        "from conform_mlx.impl.paged_cache import PagedKVCache\n"
        "monkeypatch.setattr(PagedKVCache, '_block_needs', f)",
    ],
)
def test_a_private_use_is_caught(source):
    assert private_uses(source)


def test_a_public_use_passes():
    assert private_uses("from conform_mlx.impl.kernels import rope\nrope.rope_step") == []


def test_mlx_lm_has_one_adapter():
    importers = [
        str(p.relative_to(REPO_ROOT))
        for p in python_files(*PRODUCTION)
        if "mlx_lm" in imports_of(p)
    ]
    assert importers == [MLX_LM_ADAPTER]
