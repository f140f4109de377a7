"""Optimizer-step microbenchmarks: SparseAdamW against dense torch.optim.AdamW.

``pytest bench --benchmark-only -k adamw``: one group per (N, tensors, rho), one row per
provider (the dense baseline is fused on CUDA, foreach on the CPU, as a user would run it).
"""

import pytest
import torch
from bench_sparse_adamw import make_model, random_selection
from conftest import DEVICE

import gallop_kernels as gk

SIZES = (1 << 28, 1 << 30) if DEVICE.type == "cuda" else (1 << 20, 1 << 22)


@pytest.mark.parametrize("provider", ("gallop SparseAdamW", "torch AdamW"))
@pytest.mark.parametrize("tensors", (1, 64))
@pytest.mark.parametrize("rho", (0.01,))
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n=2^{n.bit_length() - 1}")
def test_adamw_step(timed, device, n, rho, tensors, provider):
    torch.manual_seed(0)
    params, grads = make_model(n, tensors, device, torch.bfloat16)
    for p, g in zip(params, grads):
        p.grad = g
    if provider == "torch AdamW":
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=(device.type == "cuda") or None)
    else:
        sel = random_selection(params, rho)
        opt = gk.SparseAdamW([(f"w{i}", p) for i, p in enumerate(params)], selection=sel, lr=1e-4, weight_decay=0.01)
    timed(opt.step, group=f"adamw step n=2^{n.bit_length() - 1} tensors={tensors} rho={rho} bf16")
