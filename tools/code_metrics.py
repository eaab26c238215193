"""How heavy the code is to read, measured rather than guessed (issue 28).

  python tools/code_metrics.py step   # project functions and modules one decode step runs
  python tools/code_metrics.py docs   # docstring + comment lines per code line, impl/

``step`` runs ``impl.engine.generate`` on a small random checkpoint and records, with a
profiler hook, every function of this project called between the start of one steady
decode step (``decode_lazy``) and the next: the pipelined step as the host runs it.
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tempfile
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script

from conform_mlx import blas  # noqa: E402

blas.load()

import mlx.core as mx  # noqa: E402

OURS = ("conform_mlx", "suites")
STEP = 4  # which decode step is traced (later than the first compile)


def step_functions(steps: int = 8) -> list[tuple[str, str]]:
    """(module, function) the host runs in one steady decode step, in call order."""
    from conform_mlx.impl import engine
    from conform_mlx.impl.loader import load
    from conform_mlx.reference.checkpoints import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = load(write_random_checkpoint("tiny-gqa8", Path(tmp) / "m", seed=0))
    compiled = engine.CompiledSteps(model)
    engine.generate(model, [1, 2, 3], steps, steps=compiled)  # trace the graphs first
    seen: list[tuple[str, str]] = []
    starts = 0

    def hook(frame, event, _arg) -> None:
        nonlocal starts
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        name = (module, frame.f_code.co_qualname)
        if name == ("conform_mlx.impl.engine", "decode_lazy"):
            starts += 1
        if starts == STEP and module.startswith(OURS) and name not in seen:
            seen.append(name)

    sys.setprofile(hook)
    try:
        engine.generate(model, [1, 2, 3], steps, steps=compiled)
    finally:
        sys.setprofile(None)
    mx.eval(mx.zeros(1))
    return seen


def doc_ratio(folder: Path) -> tuple[int, int]:
    """(docstring + comment lines, code lines) of the Python files under ``folder``."""
    docs = code = 0
    for path in sorted(folder.rglob("*.py")):
        source = path.read_text()
        doc_lines: set[int] = set()
        for node in ast.walk(ast.parse(source)):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                value = body[0].value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    doc_lines |= set(range(body[0].lineno, body[0].end_lineno + 1))
        comment_lines = {
            t.start[0]
            for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type == tokenize.COMMENT
        }
        for i, line in enumerate(source.splitlines(), start=1):
            if not line.strip():
                continue
            if i in doc_lines or (i in comment_lines and line.strip().startswith("#")):
                docs += 1
            else:
                code += 1
    return docs, code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["step", "docs"])
    args = p.parse_args()
    if args.what == "step":
        names = step_functions()
        modules = sorted({m for m, _ in names})
        print("\n".join(f"{m}.{f}" for m, f in names))
        print(f"{len(names)} functions in {len(modules)} modules: {', '.join(modules)}")
    else:
        docs, code = doc_ratio(ROOT / "impl")
        print(
            f"impl/ (kernels included): {docs} docstring+comment lines, {code} code lines, "
            f"{docs / code:.2f} per code line"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
