#!/usr/bin/env bash
# Everything the GPU machine checks (issue: custom kernels), as named steps.
#
# Here, first: ../shared/gpu/prepare-mlx-cuda.sh (MLX CUDA + mlx-lm into .gpu1/.gpu2)
# and wheels for transformers 5.24.0 and asv (see README "GPU runs") into .whl/.
# Device call 1, carry [".gpu1"]:  mkdir -p /root/stage && cp .gpu1/part.* /root/stage/
# Device call 2, carry [".gpu2", ".whl"]:  STEPS="..." bash tools/gpu_run.sh
# Later calls on the same warm machine need only carry [".whl"] (and .gpurepo for asv).
#
# Steps (STEPS, default all but asv, in this order):
#   grid        the paged decode attention grid (suites/test_kernels.py); ~8 min of
#               kernel compiles on an H100, so it is usually a call of its own
#   fused-grid  the RoPE + cache-write and add + RMSNorm grids (suites/test_fused_kernels.py)
#   suites      pytest suites/ (all but the grids) with every kernel active
#   kernel-bench  decode kernel vs its ops twin (tools/gpu_kernels_check.py --skip-tests)
#   model-bench   TinyLlama shape, float16, ours vs mlx-lm vs the floor (tools/gpu_bench.py)
#   asv         the TinyLlama asv benchmarks into asv history for this commit; needs
#               .gpurepo (git bundle of main: git bundle create .gpurepo/main.bundle main)
# Logs and JSON go to $OUT (the device tool brings back at most 8 files).
set -uo pipefail
OUT=${OUT:-results/gpu}
STEPS=${STEPS:-"grid fused-grid suites kernel-bench model-bench"}
mkdir -p "$OUT"
if [ ! -d /root/site/mlx ]; then  # a machine that already holds MLX keeps it
  cat /root/stage/part.* .gpu2/part.* | xz -d | tar x -C /root || exit 1
fi
# mlx-lm, our transformers release and asv, beside the machine's own packages.
python3 -m pip install -q --no-index --no-deps --upgrade --target /root/site-extra .whl/*.whl \
  2>&1 | grep -v "WARNING: Running pip as" || true
# MLX CUDA runs float32 matmuls in TF32 unless told not to; float32 parity needs IEEE.
export MLX_ENABLE_TF32=${MLX_ENABLE_TF32:-0}
export PYTHONPATH=/root/site-extra:/root/site:$PWD PYTHONUNBUFFERED=1
export PATH=/root/site-extra/bin:$PATH
{
  nvidia-smi -L
  python3 -c "import mlx.core as mx, transformers; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available(), 'transformers', transformers.__version__)"
  echo "steps: $STEPS"
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
PYTEST="python3 -m pytest -q -p no:cacheprovider -rs"
for step in $STEPS; do
  case $step in
    grid) run kernel-grid $PYTEST suites/test_kernels.py ;;
    fused-grid) run fused-grid $PYTEST suites/test_fused_kernels.py ;;
    suites)
      run suites $PYTEST suites/ --ignore=suites/test_kernels.py \
        --ignore=suites/test_fused_kernels.py
      cp results/parity.json "$OUT/parity-gpu.json" 2>/dev/null ;;
    kernel-bench) run kernel-bench python3 tools/gpu_kernels_check.py --skip-tests ;;
    model-bench) run model-bench python3 tools/gpu_bench.py --out "$OUT/gpu-bench.json" ;;
    asv) run asv bash tools/gpu_asv.sh "$OUT/asv-results.tar" ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
