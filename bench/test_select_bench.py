"""Selection microbenchmarks: select_mask against torch.topk on a materialized score.

``pytest bench --benchmark-only -k select``: one group per (N, dtype, data, rho), one row per
provider, so pytest-benchmark's comparison table and ``--benchmark-json`` show both side
by side. Sizes are small on the CPU and LLM-scale on CUDA.
"""

import pytest
from bench_select import DTYPES, PROVIDERS, Weights, selector
from conftest import DEVICE

SIZES = ("1e8", "1e9") if DEVICE.type == "cuda" else ("1e6", "4e6")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("rho", (0.01,))
@pytest.mark.parametrize("data", ("normal", "llm"))
@pytest.mark.parametrize("dtype", ("bf16",))
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n={n}")
def test_select(timed, device, n, dtype, data, rho, provider):
    model = Weights([(int(float(n)),)], DTYPES[dtype], device, data)
    timed(selector(provider, model, rho), group=f"select n={n} {dtype} {data} rho={rho}")
