"""``conform gate``: fail when the current commit is slower than a baseline.

Runs ``asv continuous`` on a quick subset (bench_engine.Gate*: float32 prefill of
128 tokens, decode at contexts 16 and 512 on the small preset) with the two
commits' rounds interleaved, so drift on a shared machine hits both alike. asv
compares each benchmark's samples with a statistical test and reports a
regression only when the median ratio exceeds ``--factor`` *and* the samples
differ significantly.

Exit status: 0 no regression, 1 a measured regression and nothing else, 2 the gate
could not compare (an unknown ref, no git repository, no asv, a benchmark that
failed or was skipped on either commit, nothing selected). A gate that cannot
measure never passes.

Results go to a temporary directory, not results/asv, so gate runs never enter
the committed history. ``--prove`` plants two commits on top of HEAD, one that
decodes every token twice (a 2x decode slowdown) and one that changes nothing
the benchmarks run, and checks the gate fails the first and passes the second.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conform_mlx import REPO_ROOT
from conform_mlx.history import asv_config

GATE_PREFIX = "bench_engine.Gate"
GATE_BENCH = r"^bench_engine\.Gate"
# Chosen from A/A runs (the same code as both commits) and planted 2x slowdowns on
# the 2-core CI machine; docs/benchmarks.md ("The regression gate") has the spread.
DEFAULT_FACTOR = 1.5
DEFAULT_ROUNDS = 6


class GateError(Exception):
    """The gate cannot compare; the message says why (exit status 2)."""


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def commit_of(ref: str) -> str:
    """The full hash ``ref`` names, or GateError saying why there is none."""
    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
    except (OSError, subprocess.CalledProcessError):
        top = None
    if top != REPO_ROOT.resolve():  # a copy without .git, perhaps inside another repo
        raise GateError(f"{REPO_ROOT} is not a git repository: the gate compares commits")
    try:
        return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError:
        raise GateError(f"unknown ref {ref!r}: no such commit") from None


def check_measured(results: Path, commits: dict[str, str]) -> int:
    """Raise GateError unless every selected benchmark has a number on both commits;
    returns how many benchmark values were compared per commit."""
    counts = {}
    for label, sha in commits.items():
        files = list(results.glob(f"*/{sha[:8]}-*.json"))
        if not files:
            raise GateError(f"no results for {label} ({sha[:8]}): did it build? (see above)")
        doc = json.loads(files[0].read_text())
        values = [
            (name, v)
            for name, row in doc["results"].items()
            if name.startswith(GATE_PREFIX)
            for v in (row[0] if isinstance(row[0], list) else [row[0]])
        ]
        if not values:
            raise GateError(f"no benchmark matching {GATE_BENCH!r} ran for {label}")
        bad = [name for name, v in values if v is None or (isinstance(v, float) and math.isnan(v))]
        if bad:
            raise GateError(f"{label} ({sha[:8]}): {', '.join(sorted(set(bad)))} failed or skipped")
        counts[label] = len(values)
    return min(counts.values())


def run_gate(base: str, head: str, factor: float, rounds: int) -> int:
    """0 no regression, 1 a measured regression; GateError when it cannot compare."""
    base_sha, head_sha = commit_of(base), commit_of(head)
    if importlib.util.find_spec("asv") is None:
        raise GateError("asv is not installed (pip install -e '.[bench]')")
    print(f"conform gate: {head} ({head_sha[:8]}) vs {base} ({base_sha[:8]}), factor {factor}")
    asv = [sys.executable, "-m", "asv"]
    machine = subprocess.run([*asv, "machine", "--yes"], cwd=REPO_ROOT, capture_output=True)
    if machine.returncode:
        raise GateError(f"asv machine --yes failed: {machine.stderr.decode().strip()}")
    with tempfile.TemporaryDirectory(prefix="conform-gate-") as tmp:
        cmd = [
            *asv,
            "continuous",
            "--config",
            str(asv_config(Path(tmp), results=Path(tmp) / "results")),
            "--interleave-rounds",
            "--factor",
            str(factor),
            "--bench",
            GATE_BENCH,
            "-a",
            f"rounds={rounds}",
            "-a",
            "repeat=(5, 10, 10.0)",
            "--no-only-changed",  # print every ratio: the spread is part of the evidence
            "--show-stderr",
            base_sha,
            head_sha,
        ]
        t0 = time.perf_counter()
        code = subprocess.run(cmd, cwd=REPO_ROOT).returncode
        # asv's own status also says 1 for a benchmark that newly fails, and 0 when
        # nothing ran: only numbers on both sides make a verdict.
        n = check_measured(Path(tmp) / "results", {"base": base_sha, "head": head_sha})
    if code not in (0, 1):
        raise GateError(f"asv continuous exited {code} (see above)")
    verdict = "PASS" if code == 0 else "FAIL: slower beyond the factor"
    print(
        f"conform gate: {verdict}, {n} benchmark values compared ({time.perf_counter() - t0:.0f} s)"
    )
    return code


def plant(edit: tuple[str, str, str] | None, message: str) -> str:
    """A commit on top of HEAD with one text edit (path, old, new), made in a scratch
    worktree so the user's checkout is untouched; returns its sha."""
    with tempfile.TemporaryDirectory(prefix="conform-plant-") as tmp:
        work = Path(tmp) / "wt"
        git("worktree", "add", "--detach", str(work), "HEAD")
        try:
            if edit is None:
                (work / "README.md").write_text((work / "README.md").read_text() + "\n")
            else:
                path, old, new = edit
                text = (work / path).read_text()
                assert old in text, f"cannot plant: {old!r} not in {path}"
                (work / path).write_text(text.replace(old, new, 1))
            env_git = ["git", "-C", str(work)]
            subprocess.run(
                [*env_git, "commit", "-qam", message],
                check=True,
                env={
                    "GIT_AUTHOR_NAME": "gate",
                    "GIT_AUTHOR_EMAIL": "gate@invalid",
                    "GIT_COMMITTER_NAME": "gate",
                    "GIT_COMMITTER_EMAIL": "gate@invalid",
                },
            )
            return subprocess.run(
                [*env_git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
            ).stdout.strip()
        finally:
            git("worktree", "remove", "--force", str(work))


# Decode runs the whole forward pass twice per token: the 2x slowdown to catch.
# The anchor is decode()'s own plan line; suites/test_gate.py checks it is in the file.
SLOW_DECODE = (
    "impl/engine.py",
    "    plan = _plan_decode(model, cache, seqs, steps is not None)\n"
    "    return _step(model, mx.array(ids)",
    "    plan = _plan_decode(model, cache, seqs, steps is not None)\n"
    "    mx.eval(model(mx.array(ids)[:, None], cache, plan))  # planted: decode twice\n"
    "    return _step(model, mx.array(ids)",
)


def _status(gate, *args) -> int:
    """The gate's exit status, 2 for a GateError (printed), for the proof's two runs."""
    try:
        return gate(*args)
    except GateError as e:
        print(f"conform gate: error: {e}", file=sys.stderr)
        return 2


def prove(factor: float, rounds: int) -> int:
    unchanged = plant(None, "gate proof: no code change")
    slow = plant(SLOW_DECODE, "gate proof: decode twice (2x slower)")
    a = _status(run_gate, "HEAD", unchanged, factor, rounds)
    b = _status(run_gate, "HEAD", slow, factor, rounds)
    ok = a == 0 and b == 1
    print(
        f"gate proof: unchanged commit -> exit {a} (want 0), 2x decode -> exit {b} (want 1): "
        + ("PASS" if ok else "FAIL")
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="conform gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD~1", help="baseline commit (default: the parent)")
    p.add_argument("--head", default="HEAD", help="commit under test")
    p.add_argument("--factor", type=float, default=DEFAULT_FACTOR)
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    p.add_argument("--prove", action="store_true", help="check the gate on planted commits")
    args = p.parse_args(argv)
    if not args.factor > 1:
        p.error(f"--factor must be above 1 (a ratio of times), got {args.factor}")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    try:
        if args.prove:
            commit_of("HEAD")
            return prove(args.factor, args.rounds)
        return run_gate(args.base, args.head, args.factor, args.rounds)
    except GateError as e:
        print(f"conform gate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
