"""``conform gate``: fail when the current commit is slower than a baseline.

Runs ``asv continuous`` on a quick subset (bench_engine.Gate*: float32 prefill of
128 tokens, decode at contexts 16 and 512 on the small preset) with the two
commits' rounds interleaved, so drift on a shared machine hits both alike. asv
compares each benchmark's samples with a statistical test and reports a
regression only when the median ratio exceeds ``--factor`` *and* the samples
differ significantly; it then exits 1 (2 on benchmark errors).

Results go to a temporary directory, not results/asv, so gate runs never enter
the committed history. ``--prove`` plants two commits on top of HEAD, one that
decodes every token twice (a 2x decode slowdown) and one that changes nothing
the benchmarks run, and checks the gate fails the first and passes the second.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conform import REPO_ROOT
from conform.history import asv_config

GATE_BENCH = r"^bench_engine\.Gate"
# Chosen from A/A runs (the same code as both commits) on the 2-core CI machine;
# see the README's "Regression gate" section for the measured spread.
DEFAULT_FACTOR = 1.3
DEFAULT_ROUNDS = 4


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def run_gate(base: str, head: str, factor: float, rounds: int) -> int:
    base_sha, head_sha = git("rev-parse", base), git("rev-parse", head)
    print(f"conform gate: {head} ({head_sha[:8]}) vs {base} ({base_sha[:8]}), factor {factor}")
    subprocess.run(["asv", "machine", "--yes"], cwd=REPO_ROOT, check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="conform-gate-") as tmp:
        cmd = [
            "asv",
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
    verdict = {
        0: "PASS",
        1: "FAIL: slower beyond the factor (or a commit failed to build; see above)",
        2: "ERROR in a benchmark",
    }.get(code, f"asv exited {code}")
    print(f"conform gate: {verdict} ({time.perf_counter() - t0:.0f} s)")
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
SLOW_DECODE = (
    "impl/engine.py",
    "    plan = cache.plan(list(seqs), 1)\n",
    "    plan = cache.plan(list(seqs), 1)\n"
    "    mx.eval(model(mx.array(ids)[:, None], cache, plan))  # planted: decode twice\n",
)


def prove(factor: float, rounds: int) -> int:
    unchanged = plant(None, "gate proof: no code change")
    slow = plant(SLOW_DECODE, "gate proof: decode twice (2x slower)")
    a = run_gate("HEAD", unchanged, factor, rounds)
    b = run_gate("HEAD", slow, factor, rounds)
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
    if args.prove:
        return prove(args.factor, args.rounds)
    try:
        git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        print(
            f"conform gate: no baseline commit {args.base!r}; nothing to compare", file=sys.stderr
        )
        return 0
    return run_gate(args.base, args.head, args.factor, args.rounds)


if __name__ == "__main__":
    raise SystemExit(main())
