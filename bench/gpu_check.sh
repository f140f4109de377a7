#!/usr/bin/env bash
# The prepared GPU check (about 7 minutes on one H200): build the extension with nvcc,
# run the tests on the GPU, then the benchmarks; prints the tables for bench/RESULTS.md.
# Usage: bash bench/gpu_check.sh   (logs also go to $OUT when the device tool sets it)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/gpu_check.log
status=0
run() {  # run a step under a time limit; remember a failure, keep going
  local limit=$1; shift
  echo "=== $* (limit ${limit}s)"
  timeout "$limit" "$@" || { echo "!!! failed ($?): $*"; status=1; }
}
{
  date -u +"%Y-%m-%d %H:%M UTC"; git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  run 240 python3 -m pip install -q --no-build-isolation --no-deps -e .
  python3 -c "import gallop_kernels as g; print(g.backends())"
  # GPU tests: CUDA kernel == host build bit for bit; Triton on CUDA == reference exactly.
  run 150 python3 -m pytest -q -x tests/test_sparse_adamw_ext.py -k "cuda or gpu"
  run 150 python3 -m pytest -q -x tests/test_select_triton.py
  # The application on the GPU: finetune in bf16 on a tiny random Llama; gallop plan --measure on the 1.1B TinyLlama shape.
  run 150 python3 -m pytest -q -x -s tests/test_finetune.py -k "test_finetune_on_cuda_in_bf16 or test_plan_measures_the_tinyllama_shape_on_cuda or test_same_seed_and_data_select"
  run 120 python3 bench/bench_select.py --sizes 1e6 1e8 1e9 --dtypes bf16 fp32 --rhos 0.001 0.01 0.1
  run 90 python3 bench/bench_sparse_adamw.py --sizes 26 28 30
  exit "$status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
