#!/usr/bin/env bash
# asv history from the GPU machine: the TinyLlama-preset benchmarks of this commit,
# run in the machine's own Python (--python=same), recorded under the commit's hash.
# Called by tools/gpu_run.sh (step asv) with the results folder as $1.
#
# The device gets a copy of the working tree without .git, so the commit comes as a
# bundle made here: mkdir -p .gpurepo && git bundle create .gpurepo/main.bundle main
set -euo pipefail
out=${1:?where the results tarball goes}
results=/tmp/asv-results
machine=${ASV_MACHINE:-lent-h100-mlx-cuda}
rm -rf /tmp/conform-repo && git clone -q -b main .gpurepo/main.bundle /tmp/conform-repo
hash=$(git -C /tmp/conform-repo rev-parse HEAD)
# The same configuration as asv.conf.json, but the repository is the bundle's clone
# and results go where the device tool brings them back.
python3 - "$results" <<'PY'
import json, sys
conf = json.load(open("asv.conf.json"))
conf.update(repo="/tmp/conform-repo", results_dir=sys.argv[1], html_dir="/tmp/asv-html")
json.dump(conf, open("/tmp/asv-gpu.json", "w"), indent=2)
PY
# asv drops PYTHONPATH from the benchmark processes' environment but passes
# ASV_PYTHONPATH on as PYTHONPATH.
export ASV_PYTHONPATH=$PYTHONPATH
cp /tmp/asv-gpu.json asv-gpu.conf.json  # benchmark_dir is relative to the config's folder
python3 -m asv machine --config asv-gpu.conf.json --yes --machine "$machine"
# Bounded, so whatever finished is still packed and brought back.
timeout "${ASV_TIMEOUT:-500}" python3 -m asv run --config asv-gpu.conf.json --python=same \
  --set-commit-hash "$hash" --machine "$machine" --bench "${ASV_BENCH:-TinyLlama}" \
  --show-stderr || echo "asv run ended with status $?"
rm -f asv-gpu.conf.json
tar cf "$out" -C "$results" .  # one file: the device tool brings back at most 8
