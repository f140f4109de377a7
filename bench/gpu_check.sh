#!/usr/bin/env bash
# The prepared GPU check (budgeted at 8 minutes on one H200; unmeasured since the selection and optimizer
# redesigns): build the extension with nvcc,
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
  # CUDA kernel == host build bit for bit; CUDA-graph replay == eager; torch.compile (inductor) of
  # opt.step is one graph and equals eager.
  run 240 python3 -m pytest -q -x tests/test_sparse_adamw_ext.py -k "cuda or gpu or graph or compiled"
  # 1 and 104 tensors at N = 2^26..2^30, the 291 LLaMA-3-8B shapes, and the host time per step
  run 240 python3 bench/bench_sparse_adamw.py --sizes 26 28 30 --rhos 0.01 --tensors 1 104 --llama3-8b
  # a TinyLlama-1.1B training step with dense and with compact gradients
  run 180 python3 bench/bench_sparse_adamw.py --skip-step --host-tensors 1 --train tinyllama
  # Selection (unmeasured budget, guessed from the floors: the tests are mostly JIT
  # compiles of ~40 kernel variants; the table is 1e8/1e9 at 3 rhos, 8e9 and the
  # 291 LLaMA-3-8B tensors at 1%, 1e9 on LLM-like and adversarial data; a select_mask
  # at the floor is ~2 ms at 1e9 and ~15 ms at 8e9, a fallback ~125 ms / ~1 s,
  # torch.topk 33 ms at 1e9; filling 8e9 weights twice takes seconds).
  run 150 python3 -m pytest -q -x tests/test_select_triton.py tests/test_radix.py
  run 100 python3 bench/bench_select.py --sets 1e8 1e9 --rhos 0.001 0.01 0.1
  run 60 python3 bench/bench_select.py --sets 1e9 --rhos 0.01 --data llm equal zeros30
  run 70 python3 bench/bench_select.py --sets 8e9 llama3-8b --rhos 0.01 --providers select_mask
  # The application on the GPU: finetune in bf16 on a tiny random Llama, the same selection on cpu and cuda,
  # gallop plan --measure on the TinyLlama-1.1B shape (batch 1 x 512; the table is printed).
  run 120 python3 -m pytest -q -x -s tests/test_finetune.py -k "test_finetune_on_cuda_in_bf16 or test_plan_measures_the_tinyllama_shape_on_cuda or test_same_seed_and_data_select"
  exit "$status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
