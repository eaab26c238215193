#!/usr/bin/env bash
# Everything the GPU machine checks, in one call (issue: custom kernels).
#
# Here, first: ../shared/gpu/prepare-mlx-cuda.sh (MLX CUDA + mlx-lm into .gpu1/.gpu2)
# and a transformers wheel matching ours into .whl/ (see README "GPU runs").
# Device call 1, carry [".gpu1"]:  mkdir -p /root/stage && cp .gpu1/part.* /root/stage/
# Device call 2, carry [".gpu2", ".whl"]:  bash tools/gpu_run.sh
# (.whl holds the mlx-lm wheel from .gpu2 and transformers==5.24.0.)
# It writes logs and JSON into $OUT (the device tool brings them back).
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
if [ ! -d /root/site/mlx ]; then  # a machine that already holds MLX keeps it
  cat /root/stage/part.* .gpu2/part.* | xz -d | tar x -C /root || exit 1
fi
# mlx-lm and our transformers release, beside the machine's own packages.
python3 -m pip install -q --no-index --no-deps --upgrade --target /root/site-extra .whl/*.whl || exit 1
# MLX CUDA runs float32 matmuls in TF32 unless told not to; float32 parity needs IEEE.
export MLX_ENABLE_TF32=${MLX_ENABLE_TF32:-0}
export PYTHONPATH=/root/site-extra:/root/site:$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  python3 -c "import mlx.core as mx, transformers; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/device.txt"
status=0
run() {  # name, command...
  local name=$1; shift
  echo "== $name"
  "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "== $name exit $rc"
  [ $rc -eq 0 ] || status=1
}
# The grid compiles a kernel per (dtype, head_dim, group, block size): ~8 minutes on
# an H100, so it can run as its own call: GRID=only or GRID=skip.
if [ "${GRID:-run}" != skip ]; then
  run kernel-grid python3 -m pytest suites/test_kernels.py -q -p no:cacheprovider -rs
fi
[ "${GRID:-run}" = only ] && exit $status
run suites python3 -m pytest suites/ -q -p no:cacheprovider -rs --ignore=suites/test_kernels.py
cp results/parity.json "$OUT/parity-gpu.json" 2>/dev/null
[ "${BENCH:-run}" = skip ] && exit $status
run kernel-bench python3 tools/gpu_kernels_check.py
run model-bench python3 tools/gpu_bench.py --out "$OUT/gpu-bench.json"
exit $status
