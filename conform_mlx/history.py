"""``conform history``: add points to the committed asv history.

One series per machine, named for what it is (``--machine``; the CI-class CPU
machine's name is ``CPU_MACHINE``), with every fact asv records filled in, and one
BLAS (``asv.conf.json``'s matrix sets ``CONFORM_BLAS``, so the BLAS is part of the
environment's name and a point on another BLAS can never join the series unnoticed).

    conform history                    # the CPU machine: Small* for every commit of main
                                       # since the series began that has no point yet
    conform history --range HEAD^!     # just HEAD
    conform history --gpu              # on an NVIDIA machine: TinyLlama*, --python=same
    conform history --publish          # asv publish, with its JS and CSS vendored from
                                       # npm so the pages work offline (needs npm)

``suites/test_history.py`` checks the result: every benchmark the README lists shows
data in ``asv publish``, and the CPU series has no hole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from conform_mlx import REPO_ROOT

CPU_MACHINE = "ci-linux-x86_64-2cpu"
HISTORY_BLAS = "openblas"
# The CPU series: the small preset, and the gate's subset (so its lines show history too).
CPU_BENCH = r"^bench_engine\.(Small|Gate)"
# The first commit the current benchmarks can run against: they import conform_mlx,
# the one import name since e091ff0. Points from 607d878 (the engine door and
# OpenBLAS) on stay in the series; older ones live in git history (results/asv/README.md).
SERIES_START = "e091ff09cd2b72e74ba926c9f0e1e9ef913609f4"


def results_dir(machine: str) -> Path:
    conf = json.loads((REPO_ROOT / "asv.conf.json").read_text())
    return REPO_ROOT / conf["results_dir"] / machine


def machine_facts(gpu: str | None = None) -> dict[str, str]:
    """What asv records about a machine, read off this one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    facts = {
        "arch": platform.machine(),
        "cpu": cpu,
        "num_cpu": str(os.cpu_count()),
        "os": f"{platform.system()} {platform.release()}",
        "ram": str(ram),
    }
    if gpu:
        facts["gpu"] = gpu
    return facts


def register(machine: str, facts: dict[str, str]) -> None:
    args = [f"--{k}={v}" for k, v in facts.items() if k != "gpu"]
    if _asv("machine", "--yes", f"--machine={machine}", *args):
        raise SystemExit(f"conform history: asv machine failed for {machine!r} (see above)")
    # The entry is written here in full: asv's CLI has no flag for extra facts (gpu),
    # and on the lent GPU machine `asv machine --yes` kept only the name (2026-11-27).
    path = Path.home() / ".asv-machine.json"
    doc = json.loads(path.read_text())
    doc[machine] = {"machine": machine, **facts}
    path.write_text(json.dumps(doc, indent=4))


def _asv(*args: str, config: Path | None = None) -> int:
    cmd = [sys.executable, "-m", "asv", *args]
    if config is not None:
        cmd[4:4] = ["--config", str(config)]  # after the subcommand
    print("+", " ".join(cmd), flush=True)
    # asv gives benchmark processes ASV_PYTHONPATH as their PYTHONPATH, dropping the
    # caller's: pass a source tree on PYTHONPATH (no pip install) through.
    env = {**os.environ}
    if "PYTHONPATH" in env:
        env.setdefault("ASV_PYTHONPATH", env["PYTHONPATH"])
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode


def asv_config(tmp: Path, results: Path | None = None, cpu_matrix: bool = True) -> Path:
    """asv.conf.json written into ``tmp`` with absolute paths, so asv can run from
    anywhere: results into ``results`` (default the committed history), HTML into
    ``tmp``. ``cpu_matrix=False`` drops the CPU series' BLAS matrix: on a GPU the
    matmuls run on the device, and the GPU machine has no OpenBLAS to demand."""
    conf = json.loads((REPO_ROOT / "asv.conf.json").read_text())
    if not cpu_matrix:
        conf.pop("matrix", None)
    # asv runs from the folder of the config it is given, where {conf_dir} would point:
    # the commands name the repository's files (constraints.txt) by absolute path.
    conf["install_command"] = [
        c.replace("{conf_dir}", str(REPO_ROOT)) for c in conf["install_command"]
    ]
    conf.update(
        repo=str(REPO_ROOT),
        benchmark_dir=str(REPO_ROOT / conf["benchmark_dir"]),
        env_dir=str(REPO_ROOT / conf["env_dir"]),
        results_dir=str(results or REPO_ROOT / conf["results_dir"]),
        html_dir=str(tmp / "html"),
    )
    path = tmp / "asv.conf.json"
    path.write_text(json.dumps(conf, indent=2))
    return path


def gpu_machine(gpu: str, cpu: str) -> str:
    """The GPU series' name: the card and the host CPU, since a host-bound step's time
    moves with the host (e.g. "nvidia-h100-80gb-hbm3-intel-xeon")."""

    def slug(text: str, drop: tuple[str, ...]) -> str:
        words = re.sub(r"\(r\)|\(tm\)|[^a-z0-9]+", " ", text.lower()).split()
        return "-".join(w for w in words if w not in drop)

    return f"nvidia-{slug(gpu, ('nvidia',))}-{slug(cpu, ('processor', 'cpu'))}"


def gpu_name() -> str:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return out.splitlines()[0]


# asv 0.6.6's pages load these from CDNs; each comes from its npm package instead.
# (stupidtable 1.0.1 is not on npm; 1.1.3 is its only release there.)
VENDORED = {
    "jquery-3.3.1.min.js": ("jquery@3.3.1", "dist/jquery.min.js"),
    "jquery.flot.min.js": ("flot@0.8.3", "jquery.flot.js"),
    "jquery.flot.time.min.js": ("flot@0.8.3", "jquery.flot.time.js"),
    "jquery.flot.selection.min.js": ("flot@0.8.3", "jquery.flot.selection.js"),
    "jquery.flot.categories.min.js": ("flot@0.8.3", "jquery.flot.categories.js"),
    "jquery.flot.orderBars.js": ("flot-orderbars@1.0.0", "js/jquery.flot.orderBars.js"),
    "stupidtable.min.js": ("stupid-table-plugin@1.1.3", "stupidtable.min.js"),
    "md5.min.js": ("blueimp-md5@2.19.0", "js/md5.min.js"),
    "bootstrap.min.js": ("bootstrap@3.1.1", "dist/js/bootstrap.min.js"),
    "bootstrap.min.css": ("bootstrap@3.1.1", "dist/css/bootstrap.min.css"),
}


def publish() -> int:
    """asv publish, then every CDN script and stylesheet of index.html from npm."""
    code = _asv("publish")
    if code:
        return code
    conf = json.loads((REPO_ROOT / "asv.conf.json").read_text())
    html = REPO_ROOT / conf["html_dir"]
    vendor = html / "vendor"
    vendor.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="conform-npm-") as tmp:
        for name, (package, member) in VENDORED.items():
            tgz = subprocess.run(
                ["npm", "pack", "--silent", "--pack-destination", tmp, package],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()[-1]
            with tarfile.open(Path(tmp) / tgz) as tar:
                data = tar.extractfile(f"package/{member}").read()
            (vendor / name).write_bytes(data)
    index = html / "index.html"
    text = index.read_text()
    for name in VENDORED:
        # The CDN tag, with its integrity hash (for the CDN's bytes), becomes a local one.
        pattern = r'(src|href)="https://[^"]*/' + re.escape(name) + r'"[^>]*?(/?>)'
        text, n = re.subn(pattern, rf'\1="vendor/{name}"\2', text)
        if n != 1:
            raise RuntimeError(f"asv's index.html no longer loads {name} from a CDN")
    index.write_text(text)
    print(f"vendored {len(VENDORED)} files into {vendor}; open {index}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="conform history", description=__doc__.split("\n\n")[0])
    p.add_argument("--machine", help=f"series name (default {CPU_MACHINE}, or from the GPU)")
    p.add_argument("--range", help="commits, asv-style (default: main since SERIES_START)")
    p.add_argument("--bench", help="benchmark regex (default CPU_BENCH, or TinyLlama with --gpu)")
    p.add_argument("--gpu", action="store_true", help="NVIDIA machine: --python=same, HEAD")
    p.add_argument("--publish", action="store_true", help="HTML pages that work offline")
    args = p.parse_args(argv)
    if args.publish:
        return publish()
    if args.gpu:
        gpu = gpu_name()
        facts = machine_facts(f"{gpu}, MLX CUDA backend")
        machine = args.machine or gpu_machine(gpu, facts["cpu"])
        register(machine, facts)
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        with tempfile.TemporaryDirectory(prefix="conform-history-") as tmp:
            return _asv(
                "run",
                "--python=same",
                f"--set-commit-hash={head}",
                f"--machine={machine}",
                f"--bench={args.bench or 'TinyLlama'}",
                "--show-stderr",
                config=asv_config(Path(tmp), cpu_matrix=False),
            )
    machine = args.machine or CPU_MACHINE
    register(machine, machine_facts())
    span = args.range or f"{SERIES_START}^..main"
    return _asv(
        "run",
        f"--machine={machine}",
        f"--bench={args.bench or CPU_BENCH}",
        "--skip-existing-successful",
        "--show-stderr",
        span,
    )


if __name__ == "__main__":
    raise SystemExit(main())
