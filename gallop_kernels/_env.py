"""One place that answers: which backends can run here?"""

from __future__ import annotations

import os

import torch

from ._ext import _C, _IMPORT_ERROR


def _triton_selection():
    """The Triton selection backend's entry point, or the exception importing it raised
    (kept, so that asking for the backend says why it is missing)."""
    try:  # the package imports without a working triton
        from .ops.select_triton import topk_keys_triton
    except (ImportError, RuntimeError) as err:
        return err
    return topk_keys_triton


TRITON_SELECTION = _triton_selection()


def triton_interpreter() -> bool:
    """True when Triton kernels run on the CPU through TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends() -> dict[str, bool]:
    """Which execution paths this installation can use; the same names are the
    ``backend`` arguments of :func:`select_mask` and :class:`SparseAdamW`.

    reference: plain PyTorch, always. triton: Triton imports and either a CUDA
    device is present or the interpreter is on. host: the compiled extension's
    CPU code (selection passes, the sparse AdamW kernel's host build). cuda: its
    CUDA kernels, built and with a device to run on. :func:`why_unavailable`
    says why a path is False.
    """
    return {name: not reason for name, reason in why_unavailable(all_paths=True).items()}


def why_unavailable(all_paths: bool = False) -> dict[str, str]:
    """Why each execution path that cannot run here cannot (``all_paths``: every path,
    with "" for those that can)."""
    triton = TRITON_SELECTION
    reasons = {
        "reference": "",
        "triton": (
            f"triton failed to import: {type(triton).__name__}: {triton}" if isinstance(triton, BaseException)
            else "" if torch.cuda.is_available() or triton_interpreter()
            else "no CUDA device, and TRITON_INTERPRET=1 was not set before triton was imported"
        ),
        "host": "" if _C is not None else f"gallop_kernels._C failed to import: {_IMPORT_ERROR}",
        "cuda": (
            f"gallop_kernels._C failed to import: {_IMPORT_ERROR}" if _C is None
            else "gallop_kernels._C was built without CUDA (no nvcc at build time)" if not _C.built_with_cuda
            else "" if torch.cuda.is_available()
            else "no CUDA device"
        ),
    }
    return reasons if all_paths else {name: why for name, why in reasons.items() if why}
