#!/usr/bin/env bash
# The prepared GPU check: build the extension with nvcc, run the GPU tests, then the benchmarks;
# prints the tables for bench/RESULTS.md. The whole run stops within GPU_CHECK_BUDGET seconds
# (default 480, i.e. 8 minutes): each step gets at most its own limit and at most what is left,
# and the steps run in order of importance (selection, optimizer, application), so a slow
# early step costs the later ones, never the lease. Unmeasured since the redesigns of issues
# 9-11: the step limits are guesses from the bandwidth floors.
# Usage: bash bench/gpu_check.sh   (logs also go to $OUT when the device tool sets it)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/gpu_check.log
BUDGET=${GPU_CHECK_BUDGET:-480}
START=$(date +%s)
status=0
run() {  # run a step under min(its limit, the time left); remember a failure, keep going
  local limit=$1; shift
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then echo "!!! skipped (budget spent): $*"; status=1; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $* (limit ${limit}s, $((BUDGET - left))s spent)"
  timeout "$limit" "$@" || { echo "!!! failed ($?): $*"; status=1; }
}
{
  date -u +"%Y-%m-%d %H:%M UTC"; git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  run 180 python3 -m pip install -q --no-build-isolation --no-deps -e .
  python3 -c "import gallop_kernels as g; print(g.backends(), g.why_unavailable())"
  # Selection: the interpreter-exact tests on CUDA tensors (mostly JIT compiles of the kernel
  # variants), then the tables: 1e8 / 1e9 at three rhos, 1e9 on LLM-like and adversarial data,
  # 8e9 and the 291 LLaMA-3-8B tensors (a select_mask at the floor is ~2 ms at 1e9, ~15 ms at 8e9;
  # a fallback ~125 ms / ~1 s; torch.topk 33 ms at 1e9; filling 8e9 weights takes seconds).
  run 100 python3 -m pytest -q -x tests/test_select_triton.py tests/test_radix.py
  run 70 python3 bench/bench_select.py --sets 1e8 1e9 --rhos 0.001 0.01 0.1
  run 40 python3 bench/bench_select.py --sets 1e9 --rhos 0.01 --data llm equal zeros30
  run 50 python3 bench/bench_select.py --sets 8e9 llama3-8b --rhos 0.01 --providers select_mask
  # Optimizer: CUDA kernel == host build bit for bit; CUDA-graph replay == eager; torch.compile
  # (inductor) of opt.step is one graph and equals eager. Then 1 and 104 tensors at 2^28 and 2^30,
  # the 291 LLaMA-3-8B shapes, the host time per step, and a TinyLlama-1.1B training step with
  # dense and with compact gradients.
  run 90 python3 -m pytest -q -x tests/test_sparse_adamw_ext.py -k "cuda or gpu or graph or compiled"
  run 60 python3 bench/bench_sparse_adamw.py --sizes 28 30 --rhos 0.01 --tensors 1 104 --llama3-8b
  run 50 python3 bench/bench_sparse_adamw.py --skip-step --host-tensors 1 --train tinyllama
  # reselect: the CUDA kernel against AdamW with carried state across reselects; then its cost on
  # the 291 LLaMA-3-8B shapes against one step and one select_mask (goal: <= their sum).
  run 60 python3 -m pytest -q -x tests/test_reselect.py -k cuda
  run 60 python3 bench/bench_reselect.py --reps 3
  # The application: offloaded estimation on CUDA equals on-device estimation, finetune in bf16 on a
  # tiny random Llama, the same selection on cpu and cuda, gallop plan --measure on the
  # TinyLlama-1.1B shape (batch 1 x 512; the table is printed).
  run 90 python3 -m pytest -q -x -s tests/test_estimate.py tests/test_finetune.py -k "test_offloaded_estimation_on_cuda or test_finetune_on_cuda_in_bf16 or test_plan_measures_the_tinyllama_shape_on_cuda or test_same_seed_and_data_select"
  # FSDP2 on one NCCL rank: offloaded estimation's host sums scored on the host, the exchanges on the GPU.
  run 40 python3 -m pytest -q -x tests/test_distributed.py -k "offloaded_estimation_on_cuda"
  exit "$status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
