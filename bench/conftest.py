"""pytest-benchmark set-up for ``pytest bench --benchmark-only``.

The benchmark modules import the standalone table scripts' helpers (bench_select.py,
bench_sparse_adamw.py), so both ways of benchmarking run the same inputs and providers.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    """The device the microbenchmarks run on: CUDA when present, else the CPU."""
    return DEVICE


@pytest.fixture
def timed(benchmark, device):
    """benchmark(fn) that waits for queued device work inside each timed call."""
    from _common import sync

    def run(fn, group: str):
        benchmark.group = group
        benchmark.extra_info["device"] = str(device)

        def call():
            out = fn()
            sync(device)
            return out

        return benchmark.pedantic(call, rounds=5, warmup_rounds=1, iterations=1)

    return run
