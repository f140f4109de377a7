"""One place that answers: which backends can run here?"""

from __future__ import annotations

import importlib.util
import os

import torch

from ._ext import _C


def triton_interpreter() -> bool:
    """True when Triton kernels run on the CPU through TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> dict[str, bool]:
    """Which execution paths this installation can use.

    reference: plain PyTorch, always. triton: Triton is installed and either a
    CUDA device is present or the interpreter is on. ext_host: the compiled
    extension's CPU build of the kernels' math. ext_cuda: its CUDA kernels, built
    and with a device to run on.
    """
    has_triton = importlib.util.find_spec("triton") is not None
    return {
        "reference": True,
        "triton": has_triton and (torch.cuda.is_available() or triton_interpreter()),
        "ext_host": _C is not None,
        "ext_cuda": _C is not None and bool(_C.built_with_cuda) and torch.cuda.is_available(),
    }
