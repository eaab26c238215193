"""The cross-engine conformance report: one row per property, one column per engine.

Tests carry ``@pytest.mark.conformance("property")`` (the name may hold ``{param}``
fields filled from the test's parameters) and may record one metric per case
through the ``metric`` fixture. ``suites.report`` turns each case's outcome (pass,
fail, skipped with its reason, xfail with its reason) into a row here; a
property's status is its worst case's. A complete run writes
``<report dir>/engines/<engine>.json`` and merges every complete engine file there
into ``<report dir>/engines.json``; a partial run writes
``engines/<engine>.partial.json``, which no merge reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Worst first: a property's status is the first of these any of its cases has.
STATUS_ORDER = ["fail", "xpass", "xfail", "pass", "skipped"]
# Table order; properties not listed follow in the order they were seen.
PROPERTY_ORDER = [
    "logits parity float32",
    "logits parity float16",
    "logits parity bfloat16",
    "logits parity float32, block size 4",
    "greedy match float32, 64 steps",
    "greedy top-5 rule float16",
    "greedy top-5 rule bfloat16",
    "RoPE offsets: decode after p cached",
    "chunked prefill",
    "RoPE base from rope_parameters",
    "RoPE base from top-level rope_theta",
    "token accounting P+G-1",
    "KV bytes vs formula",
    "block accounting",
    "fork keeps history",
]


def _worst(metrics: list[list]) -> list | None:
    """[label, value, "max"|"min"]: the worst value of the cases' metrics."""
    if not metrics:
        return None
    label, _, worst = metrics[0]
    pick = max if worst == "max" else min
    return [label, pick(m[1] for m in metrics), worst]


def summarize(cases: list[dict]) -> dict[str, dict]:
    """property -> {status, counts, metric, passing_metric, reasons}.

    ``metric`` is the worst over the cases that set the status (the xfailed ones of
    an xfail property); ``passing_metric`` the worst over its passing cases.
    """
    grouped: dict[str, list[dict]] = {}
    for c in cases:
        grouped.setdefault(c["property"], []).append(c)
    out = {}
    for prop, group in grouped.items():
        status = min((c["status"] for c in group), key=STATUS_ORDER.index)
        counts: dict[str, int] = {}
        for c in group:
            counts[c["status"]] = counts.get(c["status"], 0) + 1
        reasons = list(dict.fromkeys(c["reason"] for c in group if c["reason"]))
        out[prop] = {
            "status": status,
            "counts": counts,
            "metric": _worst([c["metric"] for c in group if c["status"] == status and c["metric"]]),
            "passing_metric": _worst(
                [c["metric"] for c in group if c["status"] == "pass" and c["metric"]]
            ),
            "reasons": reasons,
            "cases": {c["test"]: c["status"] for c in group},
        }
    order = {name: i for i, name in enumerate(PROPERTY_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def _metric_text(metric: list | None) -> str:
    if metric is None:
        return ""
    label, value, worst = metric
    number = f"{value:.3g}" if isinstance(value, float) else str(value)
    return f"{label} {worst} {number}"


def _cell(p: dict) -> str:
    """status, its metric, and for a skip its reason without the 'engine X:' prefix."""
    text = f"{p['status']} {_metric_text(p['metric'])}".strip()
    if p["status"] == "skipped" and p["reasons"]:
        text += f" ({p['reasons'][0].split(': ', 1)[-1][:40]})"
    return text


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def engine_table(summary: dict[str, dict]) -> str:
    body = []
    for name, p in summary.items():
        counts = ", ".join(f"{n} {s}" for s, n in p["counts"].items())
        metric = _metric_text(p["metric"])
        if p["status"] != "pass" and p["passing_metric"]:
            metric += f" (passing cases: {_metric_text(p['passing_metric'])})"
        note = "; ".join(p["reasons"]) if p["status"] != "pass" else ""
        body.append([name, p["status"], counts, metric, note[:160]])
    return _table(["property", "status", "cases", "metric", "reason"], body)


def cross_table(merged: dict) -> str:
    """Property x engine cells: status and metric (reasons are in the JSON)."""
    engines = merged["engines"]
    body = []
    for prop, cells in merged["table"].items():
        row = [prop]
        for e in engines:
            p = cells.get(e)
            row.append("-" if p is None else _cell(p))
        body.append(row)
    return _table(["property", *engines], body)


def file_name(engine: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", engine) + ".json"


def write_engine_json(engine: str, version: str, summary: dict, path: Path, header: dict) -> Path:
    """header: the run's machine, reference, run and partial fields (suites.report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"engine": engine, "version": version, **header, "properties": summary}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def merge_engine_files(root: Path) -> tuple[Path, dict]:
    """Combine every complete root/engines/*.json into root/engines.json."""
    files = sorted((root / "engines").glob("*.json"))
    docs = [json.loads(f.read_text()) for f in files if not f.name.endswith(".partial.json")]
    docs.sort(key=lambda d: (d["engine"] != "impl", d["engine"]))  # ours first
    table: dict[str, dict] = {}
    for d in docs:
        for prop, p in d["properties"].items():
            table.setdefault(prop, {})[d["engine"]] = p
    order = {name: i for i, name in enumerate(PROPERTY_ORDER)}
    merged = {
        "engines": [d["engine"] for d in docs],
        "versions": {d["engine"]: d["version"] for d in docs},
        "machines": {d["engine"]: d["machine"] for d in docs},
        "runs": {d["engine"]: d.get("run") for d in docs},
        "table": dict(sorted(table.items(), key=lambda kv: order.get(kv[0], len(order)))),
    }
    path = root / "engines.json"
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return path, merged
