"""The parity report: one row per case, readable without the test code."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from conform import REPO_ROOT

COLUMNS = [
    "shape",
    "dtype",
    "phase",
    "max|dlogit|",
    "NMSE",
    "cosine",
    "KL mean",
    "KL max",
    "top1",
    "top5",
]


def _rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        if "greedy_first_divergence" in r:
            k = r["greedy_first_divergence"]
            text = "identical for 64 steps" if k is None else f"first differ at step {k}"
            out.append([r["shape"], r["dtype"], "greedy", text, "", "", "", "", "", ""])
            continue
        for phase in ("prefill", "decode"):
            m = r[phase]
            out.append(
                [
                    r["shape"],
                    r["dtype"],
                    phase,
                    f"{m['max_abs']:.2e}",
                    f"{m['nmse']:.2e}",
                    f"{m['cosine']:.8f}",
                    f"{m['kl_mean']:.1e}",
                    f"{m['kl_max']:.1e}",
                    f"{m['top1_agreement']:.0%}",
                    f"{m['top5_overlap']:.0%}",
                ]
            )
    return out


def parity_table(rows: list[dict]) -> str:
    body = _rows(rows)
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_parity_json(rows: list[dict], path: Path | None = None) -> Path:
    import mlx.core as mx

    path = path or REPO_ROOT / "results" / "parity.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": f"{platform.machine()} {platform.system()}, "
        f"MLX {mx.__version__} {mx.default_device()}",
        "reference": "HF transformers LlamaForCausalLM, float32, eager attention, torch CPU",
        "cases": rows,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
