"""Selection microbenchmarks: select_mask's top-k against torch.topk on a materialized score.

``pytest bench --benchmark-only -k select``: one group per (N, dtype, rho), one row per
provider, so pytest-benchmark's comparison table and ``--benchmark-json`` show both side
by side. Sizes are small on the CPU and LLM-scale on CUDA.
"""

import pytest
import torch
from bench_select import DTYPES, PROVIDERS, make_inputs, selector
from conftest import DEVICE

from gallop_kernels import reference

SIZES = (10**8, 10**9) if DEVICE.type == "cuda" else (1 << 20, 1 << 22)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("rho", (0.01,))
@pytest.mark.parametrize("dtype", ("bf16",))
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n={n:.0e}")
def test_select(timed, device, n, dtype, rho, provider):
    theta, grad = make_inputs(n, DTYPES[dtype], device)
    k = reference.num_to_select(rho, n)
    timed(selector(provider, theta, grad, k), group=f"select n={n:.0e} {dtype} rho={rho}")
