#!/usr/bin/env bash
# Everything an NVIDIA machine checks and times, as named steps, on any Linux machine
# with a CUDA GPU where the project is installed:
#
#   pip install -e '.[cuda,test,peers,bench]' && bash tools/gpu_run.sh
#
# Steps (STEPS, default all but asv, in this order):
#   grid          the paged decode and prefill attention grids (suites/test_kernels.py,
#                 suites/test_prefill_kernel.py); ~12 min, mostly kernel compiles
#   fused-grid    the RoPE + cache-write, add + RMSNorm and row-kernel grids
#                 (suites/test_fused_kernels.py)
#   suites        pytest suites/ (all but the grids) with every kernel active
#   kernel-bench  each kernel vs what it replaces, and the decode launch-shape sweep
#                 (tools/gpu_kernels_check.py --skip-tests)
#   model-bench   TinyLlama shape, float16, engines interleaved vs the floor (tools/gpu_bench.py)
#   profile       per-kernel time of a decode step under ncu, impl-compiled vs mlx-lm
#                 (tools/gpu_profile.py)
#   policy-ab     impl's step policies against each other and mlx-lm in one process
#                 (tools/gpu_policy_ab.py); not in the default list
#   encode-cost   host encode time per op kind (tools/gpu_encode_cost.py); not in the default
#   quantized     SmolLM2-135M GGUF Q4_1 (if installed) and a 4-bit TinyLlama shape,
#                 engines interleaved (tools/gpu_bench.py --model / --quantize 4 --quick)
#   asv           the TinyLlama asv benchmarks for this commit (conform history --gpu;
#                 needs a git checkout)
#   bench-8b      Llama-3-8B shape, float16: decode b=1 at 512 / 4096 / 16384, prefill 4096,
#                 512 after 8192 cached, b=8/32 mixed; impl-compiled vs mlx-lm (16 GB checkpoint
#                 written on first use); not in the default list
#   bench-7b      Llama-2-7B shape (context 4096): decode at 512 / 4096, prefill 4096, 512
#                 after 3584, b=8/16 mixed (BATCHES_7B; two engines' caches for b=32 do not
#                 fit an H100's 80 GB beside the weights); not in the default list
#   parts-ab-8b   the decode kernel's partition policy at Llama-3-8B's long contexts
#   pool-io       the KV pool's write and context gather, as words against element by
#                 element, at Llama-2-7B's and Llama-3-8B's heads (gpu_kernels_check --pool-io)
#   profile-7b    ncu of a chunked and a fresh prefill step at the Llama-2-7B shape
#   long-context  the paged decode kernel at Llama-3-8B's heads to 32k tokens against MLX's
#                 attention over a contiguous cache (gpu_kernels_check --decode-at)
#   chunk-ab      causal against masked chunked prefill (policy variants) with mlx-lm
#   chunk-ab-8b   the same and fine table buckets at Llama-3-8B's shape, 512 after 8192
# PYTEST_ARGS adds pytest options to the grids and suites (e.g. "-n 14" with pytest-xdist).
# Logs and JSON go to $OUT (default reports/gpu, git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/gpu}
STEPS=${STEPS:-"grid fused-grid suites kernel-bench model-bench"}
mkdir -p "$OUT"
# MLX CUDA runs float32 matmuls in TF32 unless told not to; float32 parity needs IEEE.
export MLX_ENABLE_TF32=${MLX_ENABLE_TF32:-0} PYTHONUNBUFFERED=1
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
PYTEST="python3 -m pytest -q -p no:cacheprovider -rs ${PYTEST_ARGS:-}"
# xdist workers each with numpy's 16 BLAS threads ran the grids out of time.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
BIG="--engine impl-compiled --engine mlx-lm --prefill 4096 --chunk 512"
for step in $STEPS; do
  case $step in
    grid) run kernel-grid $PYTEST suites/test_kernels.py suites/test_prefill_kernel.py ;;
    fused-grid) run fused-grid $PYTEST suites/test_fused_kernels.py ;;
    suites)
      run suites $PYTEST suites/ --report "$OUT" --ignore=suites/test_kernels.py \
        --ignore=suites/test_fused_kernels.py --ignore=suites/test_prefill_kernel.py ;;
    kernel-bench) run kernel-bench python3 tools/gpu_kernels_check.py --skip-tests ;;
    model-bench) run model-bench python3 tools/gpu_bench.py --out "$OUT/gpu-bench.json" ;;
    profile) run profile python3 tools/gpu_profile.py --out "$OUT/profile.json" ;;
    policy-ab) run policy-ab python3 tools/gpu_policy_ab.py ;;
    encode-cost) run encode-cost python3 tools/gpu_encode_cost.py ;;
    quantized)
      run smollm2 python3 tools/gpu_bench.py --model smollm2-135m --quick --out "$OUT/smollm2.json"
      run tinyllama-4bit python3 tools/gpu_bench.py --quantize 4 --quick \
        --out "$OUT/tinyllama-4bit.json" ;;
    asv) run asv python3 -m conform_mlx history --gpu ;;
    bench-8b)
      run bench-8b python3 tools/gpu_bench.py --preset llama3-8b $BIG --cached 8192 \
        --contexts 512 4096 16384 --out "$OUT/bench-8b.json" ;;
    bench-7b)
      run bench-7b python3 tools/gpu_bench.py --preset llama2-7b $BIG --cached 3584 \
        --contexts 512 4096 --batches ${BATCHES_7B:-8 16} --out "$OUT/bench-7b.json" ;;
    long-context)
      run long-context python3 tools/gpu_kernels_check.py --decode-at llama3-8b \
        --contexts 4096 16384 32768 --json "$OUT/long-context.json" ;;
    chunk-ab)
      run chunk-ab python3 tools/gpu_policy_ab.py --variant default --variant causal-chunks ;;
    chunk-ab-8b)
      run chunk-ab-8b python3 tools/gpu_policy_ab.py --preset llama3-8b --variant default \
        --variant causal-chunks --variant fine-chunk-buckets --contexts 512 --cached 8192 \
        --batch 8 --reps 8 ;;
    parts-ab-8b)
      run parts-ab-8b python3 tools/gpu_policy_ab.py --preset llama3-8b --variant default \
        --variant head-warps-256 --contexts 4096 16384 32768 --cached 8192 --batch 8 --reps 20 ;;
    pool-io)
      run pool-io-7b python3 tools/gpu_kernels_check.py --pool-io llama2-7b \
        --contexts 1000 3584 8192 --json "$OUT/pool-io-7b.json"
      run pool-io-8b python3 tools/gpu_kernels_check.py --pool-io llama3-8b \
        --contexts 1000 8192 --json "$OUT/pool-io-8b.json" ;;
    profile-7b)
      run profile-7b-chunked python3 tools/gpu_profile.py --preset llama2-7b --point chunked \
        --cache-control none --steps 1 --top 8
      run profile-7b-prefill python3 tools/gpu_profile.py --preset llama2-7b --point prefill \
        --cache-control none --steps 1 --top 8 ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
