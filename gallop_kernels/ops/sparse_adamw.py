"""Launcher for the compiled sparse AdamW step (csrc/sparse_adamw.cu and its host build).

One call updates the selected entries of many parameters: it packs one table row
per parameter (pointers, counts, offsets, dtypes and that parameter's step
constants), then runs ONE pass over all entries of a device: the CUDA kernel
for CUDA tensors, the host build (same per-entry function) for CPU tensors.
The per-entry math is torch.optim.AdamW's single-tensor math, see
csrc/gallop/adamw_math.h; ``gallop_kernels.reference.sparse_adamw_step`` is its
oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._ext import require_ext

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Row:
    """One parameter's update.

    param: the dense (local) weights, contiguous, fp32/bf16/fp16. grad: the dense
    gradient shaped like param (fp32/bf16/fp16), or, with ``grad_compact``, the
    fp32 gradient of the selected entries only (k,). indices: (k,) int64 flat
    indices. exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad), master (optional
    fp32 master weights): (k,) float32. step: the step number this update makes
    (1 for the first).
    """

    name: str
    param: torch.Tensor
    grad: torch.Tensor
    indices: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None
    master: torch.Tensor | None
    grad_compact: bool
    step: float
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool


def supports(param: torch.Tensor, grad: torch.Tensor, grad_compact: bool = False) -> bool:
    """True when the kernel can update ``param`` from ``grad`` (dtypes and layout)."""
    if param.dtype not in KERNEL_DTYPES or not param.is_contiguous():
        return False
    if grad_compact:
        return grad.dtype == torch.float32 and grad.is_contiguous()
    return grad.dtype in KERNEL_DTYPES and grad.is_contiguous()


def check_row(r: Row) -> None:
    """Raise ValueError, naming the parameter, unless the kernel can run ``r``."""
    if not supports(r.param, r.grad, r.grad_compact):
        if r.param.dtype not in KERNEL_DTYPES or r.grad.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"parameter {r.name!r}: sparse AdamW kernel not supported: grad {r.grad.dtype}, "
                f"param {r.param.dtype} (supported: {', '.join(str(d) for d in KERNEL_DTYPES)})"
            )
        raise ValueError(f"parameter {r.name!r}: the sparse AdamW kernel needs a contiguous parameter and gradient")
    k = r.indices.numel()
    dev = r.param.device
    if r.indices.dtype != torch.int64 or r.indices.dim() != 1 or not r.indices.is_contiguous():
        raise ValueError(f"parameter {r.name!r}: indices must be a contiguous 1-D int64 tensor")
    want = k if r.grad_compact else r.param.numel()
    if r.grad.numel() != want:
        raise ValueError(f"parameter {r.name!r}: gradient has {r.grad.numel()} entries, expected {want}")
    states = [("exp_avg", r.exp_avg), ("exp_avg_sq", r.exp_avg_sq)]
    if r.amsgrad:
        if r.max_exp_avg_sq is None:
            raise ValueError(f"parameter {r.name!r}: amsgrad needs max_exp_avg_sq")
        states.append(("max_exp_avg_sq", r.max_exp_avg_sq))
    if r.master is not None:
        states.append(("master", r.master))
    for key, t in states:
        if t.dtype != torch.float32 or t.numel() != k or not t.is_contiguous():
            raise ValueError(f"parameter {r.name!r}: {key} must be a contiguous float32 tensor of {k} entries")
    for what, t in [("gradient", r.grad), ("indices", r.indices)] + states:
        if t.device != dev:
            raise ValueError(f"parameter {r.name!r}: {what} is on {t.device}, the parameter on {dev}")


_DTYPE_CODE = {torch.float32: "DTYPE_FLOAT32", torch.bfloat16: "DTYPE_BFLOAT16", torch.float16: "DTYPE_FLOAT16"}


def _fill(C, table: torch.Tensor, i: int, r: Row, offset: int) -> None:
    # Step constants in double, as torch's _single_tensor_adam computes them from
    # Python floats; pybind11 rounds each to float32 as ATen rounds a scalar.
    bias_correction1 = 1 - r.beta1**r.step
    bias_correction2 = 1 - r.beta2**r.step
    step_size = r.lr / bias_correction1
    C.sparse_adamw_fill_row(
        table.data_ptr(),
        i,
        r.param.data_ptr(),
        r.grad.data_ptr(),
        r.indices.data_ptr(),
        r.exp_avg.data_ptr(),
        r.exp_avg_sq.data_ptr(),
        r.max_exp_avg_sq.data_ptr() if r.amsgrad else 0,
        r.master.data_ptr() if r.master is not None else 0,
        r.indices.numel(),
        offset,
        getattr(C, _DTYPE_CODE[r.param.dtype]),
        getattr(C, _DTYPE_CODE[r.grad.dtype]),
        r.grad_compact,
        1 - r.lr * r.weight_decay,
        1 - r.beta1,
        r.beta2,
        1 - r.beta2,
        bias_correction2**0.5,
        r.eps,
        -step_size,
        r.amsgrad,
        r.maximize,
        r.weight_decay != 0,
    )


def inverse_scale(grad_scale: torch.Tensor) -> torch.Tensor:
    """1 / grad_scale as float32, rounded as torch.amp.GradScaler.unscale_ rounds it."""
    return grad_scale.double().reciprocal().float()


def sparse_adamw_step(
    rows: list[Row],
    *,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Update every row, one pass per device (one CUDA launch per device).

    grad_scale: gradients are multiplied by its float32 inverse. found_inf: a
    tensor whose nonzero value makes the kernel skip the whole step on the
    device (no host read here). Raises ValueError naming the first row the
    kernel cannot run, before anything is changed.
    """
    rows = [r for r in rows if r.indices.numel()]
    for r in rows:
        check_row(r)
    if not rows:
        return
    C = require_ext("the sparse AdamW kernel")
    by_device: dict[torch.device, list[Row]] = {}
    for r in rows:
        by_device.setdefault(r.param.device, []).append(r)
    for dev, rs in by_device.items():
        _launch(C, dev, rs, grad_scale, found_inf)


def _launch(C, dev: torch.device, rows: list[Row], grad_scale, found_inf) -> None:
    cuda = dev.type == "cuda"
    if cuda and not C.built_with_cuda:
        raise RuntimeError(
            "the sparse AdamW kernel got CUDA tensors but gallop_kernels._C was built without CUDA "
            "(no nvcc at build time). Rebuild with nvcc on PATH: pip install --no-build-isolation -e ."
        )
    if not cuda and dev.type != "cpu":
        raise ValueError(f"the sparse AdamW kernel runs on CPU or CUDA tensors, not {dev}")
    table = torch.empty(len(rows) * C.SPARSE_ADAMW_ROW_BYTES, dtype=torch.uint8, pin_memory=cuda)
    offset = 0
    for i, r in enumerate(rows):
        _fill(C, table, i, r, offset)
        offset += r.indices.numel()
    inv = None if grad_scale is None else inverse_scale(grad_scale.to(dev))
    inf = None if found_inf is None else found_inf.to(device=dev, dtype=torch.float32).reshape(1)
    inv_ptr = 0 if inv is None else inv.data_ptr()
    inf_ptr = 0 if inf is None else inf.data_ptr()
    if cuda:
        with torch.cuda.device(dev):
            # Pinned source + non_blocking: the caching host allocator keeps the
            # buffer alive until the copy has run; the device copy is freed in
            # stream order after the kernel.
            dtable = table.to(dev, non_blocking=True)
            stream = torch.cuda.current_stream(dev).cuda_stream
            C.sparse_adamw_step_cuda(dtable.data_ptr(), len(rows), offset, inv_ptr, inf_ptr, stream)
    else:
        C.sparse_adamw_step_host(table.data_ptr(), len(rows), offset, inv_ptr, inf_ptr, torch.get_num_threads())
