"""The import graph stays as designed: the suites, benchmarks and tools use only the
public names of impl/ (its kernels included), and each engine has one adapter (mlx-lm is
imported by exactly one production module)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conform_mlx import REPO_ROOT

pytestmark = pytest.mark.impl_only("checks this repository's import graph, not an engine")

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


# Folder names of ours that are also other projects' import names (docs/layout.md): code
# and docs import them only under conform_mlx.
BARE = {"impl", "reference", "kernels", "conform", "benchmarks"}


def bare_imports(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out & BARE


def test_nothing_imports_our_folders_by_their_bare_names():
    sources = {str(p.relative_to(REPO_ROOT)): p.read_text() for p in python_files(*PRODUCTION)}
    sources |= {str(p.relative_to(REPO_ROOT)): p.read_text() for p in python_files("suites")}
    for doc in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)):
            sources[f"{doc.name} block {i}"] = block
    assert {name: found for name, s in sources.items() if (found := bare_imports(s))} == {}


def test_a_bare_import_is_caught():
    assert bare_imports("from impl.loader import load\nimport kernels.rope") == {"impl", "kernels"}
    assert bare_imports("from conform_mlx.impl.loader import load") == set()


def module_name(path: Path) -> str:
    """The import name of one of our files (pyproject maps impl/ and reference/ into
    conform_mlx)."""
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("impl", "reference"):
        parts.insert(0, "conform_mlx")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """module -> our modules it imports anywhere (TYPE_CHECKING and function bodies too)."""
    names = {module_name(p): p for p in files}
    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps & set(names) if d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop."""
    reach = {m: set(deps) for m, deps in graph.items()}
    changed = True
    while changed:  # transitive closure: small graphs, plain iteration
        changed = False
        for r in reach.values():
            more = set().union(*(reach[d] for d in r)) - r
            if more:
                r |= more
                changed = True
    loops = {
        frozenset({m} | {d for d in reach[m] if m in reach[d]}) for m in graph if m in reach[m]
    }
    return sorted(sorted(group) for group in loops)


def test_no_import_circles():
    assert cycles(import_graph(python_files("impl", "conform_mlx", "reference"))) == []


def test_an_import_circle_is_caught():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
