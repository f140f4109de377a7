"""Launcher for the compiled sparse AdamW step (csrc/sparse_adamw.cu and its host build).

A :class:`StepPlan` holds the table of one step's rows (pointers, counts,
offsets into the compact state, dtype codes, hyper-parameters), built and
checked once. Each step then runs :meth:`StepPlan.run`, the body of the custom
op ``gallop::sparse_adamw_step`` (called through the dispatcher inside
``torch.compile``, directly in eager steps): it rewrites the table only when a
tensor's address changed, and runs ONE prepare pass (step counters and bias
corrections, on the device) and one pass per (param dtype, grad kind) over all
entries: the CUDA kernels for CUDA tensors, the host build (same per-entry
functions) for CPU tensors. Neither the step counter nor found_inf is read on
the host, so a step makes no host sync and can be captured in a CUDA graph.

The per-entry math is torch.optim.AdamW's single-tensor math, see
csrc/gallop/adamw_math.h; ``gallop_kernels.reference.sparse_adamw_step`` is its
oracle.
"""

from __future__ import annotations

import collections
import itertools
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from .._ext import require_ext
from ..distributed import index_dtype

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # gallop::DType
_COMPACT_GRAD = 3  # gallop::kCompactGrad
_INDEX_BITS = {torch.int32: 32, torch.int64: 64}  # SparseAdamWTensor.index_bits

# Host work done, for tests: plans built, tables written, steps launched.
STATS: collections.Counter = collections.Counter()


@dataclass
class Row:
    """One parameter's update in a :class:`StepPlan`.

    param: the dense (local) weights, contiguous, fp32/bf16/fp16. grad: the dense
    gradient shaped like param (fp32/bf16/fp16), or, with ``grad_compact``, the
    fp32 gradient of the selected entries only (k,). indices: (k,) flat indices,
    int32 (a tensor of fewer than 2^31 weights) or int64. exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad), master (optional
    fp32 master weights): (k,) float32. step_slot: this parameter's entry in the
    plan's float32 step counters; lr_slot: its group's entry in the float64
    learning rates.
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
    step_slot: int
    lr_slot: int
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool

    def states(self) -> list[torch.Tensor]:
        """exp_avg, exp_avg_sq, [max_exp_avg_sq], [master]: the table's state order."""
        return [self.exp_avg, self.exp_avg_sq] + ([self.max_exp_avg_sq] if self.amsgrad else []) + (
            [self.master] if self.master is not None else []
        )


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
    if r.indices.dtype not in _INDEX_BITS or r.indices.dim() != 1 or not r.indices.is_contiguous():
        raise ValueError(f"parameter {r.name!r}: indices must be a contiguous 1-D int32 or int64 tensor")
    if r.indices.dtype == torch.int32 and index_dtype(r.param.numel()) != torch.int32:
        raise ValueError(f"parameter {r.name!r}: {r.param.numel()} weights need int64 indices")
    want = k if r.grad_compact else r.param.numel()
    if r.grad.numel() != want:
        raise ValueError(f"parameter {r.name!r}: gradient has {r.grad.numel()} entries, expected {want}")
    if r.amsgrad and r.max_exp_avg_sq is None:
        raise ValueError(f"parameter {r.name!r}: amsgrad needs max_exp_avg_sq")
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if r.amsgrad else []) + (["master"] if r.master is not None else [])
    for key, t in zip(keys, r.states()):
        if t.dtype != torch.float32 or t.numel() != k or not t.is_contiguous():
            raise ValueError(f"parameter {r.name!r}: {key} must be a contiguous float32 tensor of {k} entries")
    for what, t in [("gradient", r.grad), ("indices", r.indices)] + list(zip(keys, r.states())):
        if t.device != dev:
            raise ValueError(f"parameter {r.name!r}: {what} is on {t.device}, the parameter on {dev}")


_PLANS: weakref.WeakValueDictionary[int, StepPlan] = weakref.WeakValueDictionary()
_PLAN_IDS = itertools.count(1)
# Ids of the plans SparseAdamW.reselect replaced (a few ints per reselect): a compiled or
# captured step still holding one would update the old selection's freed state.
_RETIRED: set[int] = set()


def _check_live(plan_id: int) -> None:
    """Raise if the plan was retired by SparseAdamW.reselect."""
    if plan_id in _RETIRED:
        raise RuntimeError(
            f"sparse_adamw_step: StepPlan {plan_id} belongs to a selection that SparseAdamW.reselect replaced; "
            "a step compiled or captured in a CUDA graph before the reselect is stale: recompile or recapture it"
        )


class StepPlan:
    """The table of one device's rows, checked and laid out once.

    Rows are sorted by (param dtype, grad kind) into segments, one update
    launch each; ``steps`` (float32) holds every parameter's step count and
    ``lrs`` (float64) every group's learning rate, both on the rows' device.
    :meth:`tensors` gives the op's tensor arguments in table order.
    """

    def __init__(self, rows: list[Row], steps: torch.Tensor, lrs: torch.Tensor):
        rows = [r for r in rows if r.indices.numel()]
        for r in rows:
            check_row(r)
        if not rows:
            raise ValueError("StepPlan needs at least one row with selected entries")
        C = require_ext("the sparse AdamW kernel")
        dev = rows[0].param.device
        if dev.type == "cuda" and not C.built_with_cuda:
            raise RuntimeError(
                "the sparse AdamW kernel got CUDA tensors but gallop_kernels._C was built without CUDA "
                "(no nvcc at build time). Rebuild with nvcc on PATH: pip install --no-build-isolation -e ."
            )
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"the sparse AdamW kernel runs on CPU or CUDA tensors, not {dev}")
        for r in rows:
            if r.param.device != dev:
                raise ValueError(f"parameter {r.name!r} is on {r.param.device}, the plan's rows on {dev}")
        if steps.dtype != torch.float32 or lrs.dtype != torch.float64 or steps.device != dev or lrs.device != dev:
            raise ValueError(f"steps must be float32 and lrs float64, both on {dev}")
        for r in rows:
            if not (0 <= r.step_slot < steps.numel() and 0 <= r.lr_slot < lrs.numel()):
                raise ValueError(f"parameter {r.name!r}: step or lr slot out of range")
        if len({r.step_slot for r in rows}) != len(rows):
            raise ValueError("two rows share a step counter")
        kind = lambda r: (_DTYPE_CODE[r.param.dtype], _COMPACT_GRAD if r.grad_compact else _DTYPE_CODE[r.grad.dtype])  # noqa: E731
        self.rows = sorted(rows, key=kind)  # stable: parameter order within a segment
        self.device = dev
        self.steps, self.lrs = steps, lrs
        layout, hyper, segments = [], [], []
        for (pd, gk), seg in itertools.groupby(self.rows, key=kind):
            seg = list(seg)
            first, offset = len(layout) // C.SPARSE_ADAMW_LAYOUT_INTS, 0
            for r in seg:
                layout += [r.indices.numel(), offset, pd, gk, r.step_slot, r.lr_slot, int(r.amsgrad), int(r.maximize),
                           int(r.master is not None), _INDEX_BITS[r.indices.dtype]]
                hyper += [float(r.beta1), float(r.beta2), float(r.eps), float(r.weight_decay)]
                offset += r.indices.numel()
            segments += [first, len(seg), offset, pd, gk]
        self._layout, self._hyper = layout, hyper
        self.segments = torch.tensor(segments, dtype=torch.int64)  # host memory, read by the launcher
        self._expect = [(r.name, r.param.shape, r.param.dtype, r.grad.numel(), r.grad.dtype) for r in self.rows]
        nbytes = len(self.rows) * C.SPARSE_ADAMW_ROW_BYTES
        self.table = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        self._key = None
        self._param_ptrs = [r.param.data_ptr() for r in self.rows]
        self._static = self._static_key([r.indices for r in self.rows], [t for r in self.rows for t in r.states()], steps, lrs)
        self._graph_tables = []  # tables written during CUDA graph capture: alive as long as the plan
        self.id = next(_PLAN_IDS)
        _PLANS[self.id] = self
        STATS["plans"] += 1

    def retire(self) -> None:
        """Mark this plan replaced by SparseAdamW.reselect: running it raises from now on."""
        _RETIRED.add(self.id)

    def tensors(self):
        """(params, grads, indices, states) of the rows as built, in table order."""
        rows = self.rows
        return (
            [r.param for r in rows],
            [r.grad for r in rows],
            [r.indices for r in rows],
            [t for r in rows for t in r.states()],
        )

    def stale(self, params, grads, indices, states) -> str | None:
        """Why these tensors cannot take the rows' places (None: they can). Checked
        only when an address changed."""
        if not (len(params) == len(grads) == len(indices) == len(self.rows)):
            return f"{len(params)} params for {len(self.rows)} rows"
        for (name, shape, pdt, gnumel, gdt), r, p, g, i in zip(self._expect, self.rows, params, grads, indices):
            if p.shape != shape:
                return (
                    f"parameter {name!r} has shape {tuple(p.shape)} but was selected with shape {tuple(shape)}: "
                    "the model changed after selection"
                )
            if p.dtype != pdt or g.dtype != gdt or g.numel() != gnumel or i.numel() != r.indices.numel() or i.dtype != r.indices.dtype:
                return f"parameter {name!r}: its parameter or gradient changed dtype or size"
            if not (p.is_contiguous() and g.is_contiguous() and i.is_contiguous()):
                return f"parameter {name!r}: the sparse AdamW kernel needs a contiguous parameter and gradient"
            if p.device != self.device or g.device != self.device or i.device != self.device:
                return f"parameter {name!r}: a tensor moved off {self.device}"
        want = sum(len(r.states()) for r in self.rows)
        if len(states) != want:
            return f"{len(states)} state tensors for {want}"
        for r, s in zip((r for r in self.rows for _ in r.states()), states):
            if s.dtype != torch.float32 or s.numel() != r.indices.numel() or not s.is_contiguous() or s.device != self.device:
                return f"parameter {r.name!r}: a state tensor is not a contiguous float32 tensor of {r.indices.numel()} entries"
        return None

    def key(self, params, grads, indices, states, steps, lrs) -> list[int]:
        """Every address the table holds: when it is unchanged, so is the table."""
        return [t.data_ptr() for t in params] + [t.data_ptr() for t in grads] + self._static_key(indices, states, steps, lrs)

    @staticmethod
    def _static_key(indices, states, steps, lrs) -> list[int]:
        return [t.data_ptr() for t in indices] + [t.data_ptr() for t in states] + [steps.data_ptr(), lrs.data_ptr()]

    def _write(self, table, params, grads, indices, states, steps, lrs) -> torch.Tensor:
        """Fill ``table`` with these tensors' addresses; returns the host buffer written
        (the table itself on the CPU, a pinned staging copy for a CUDA table)."""
        C = require_ext("the sparse AdamW kernel")
        ptr = torch.Tensor.data_ptr
        host = table
        if self.device.type == "cuda":
            host = torch.empty(table.numel(), dtype=torch.uint8, pin_memory=True)
        C.sparse_adamw_fill_table(
            host.data_ptr(), [*map(ptr, params)], [*map(ptr, grads)], [*map(ptr, indices)], [*map(ptr, states)],
            steps.data_ptr(), lrs.data_ptr(), self._layout, self._hyper,
        )
        if host is not table:
            # Pinned source + non_blocking: the caching host allocator keeps the
            # buffer alive until the copy has run (and, during capture, for the graph).
            table.copy_(host, non_blocking=True)
        STATS["fills"] += 1
        return host

    def run(self, params, grads, indices, states, steps, lrs, grad_scale, found_inf, refresh: bool) -> None:
        """The op's body: rewrite the table if an address changed, then launch.

        refresh=False: the caller has just compared the addresses (SparseAdamW's
        eager step); True: compare here (inside a compiled graph).
        """
        _check_live(self.id)
        C = require_ext("the sparse AdamW kernel")
        table = self.table
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            # A graph keeps the addresses it was captured with: its own table,
            # never rewritten by later eager steps.
            table = torch.empty_like(self.table)
            host = self._write(table, params, grads, indices, states, steps, lrs)
            self._graph_tables.append((table, host))
        elif refresh:
            why = self.refresh(params, grads, indices, states, steps, lrs)
            if why is not None:
                raise ValueError(why)
        gs = 0 if grad_scale is None else grad_scale.data_ptr()
        fi = 0 if found_inf is None else found_inf.data_ptr()
        seg = self.segments
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # the launcher launches on the current device
                stream = torch.cuda.current_stream(self.device).cuda_stream
                C.sparse_adamw_step_cuda(table.data_ptr(), len(self.rows), seg.data_ptr(), seg.numel() // 5, gs, fi, stream)
        else:
            C.sparse_adamw_step_host(table.data_ptr(), len(self.rows), seg.data_ptr(), seg.numel() // 5, gs, fi, torch.get_num_threads())
        STATS["launches"] += 1

    def refresh(self, params, grads, indices, states, steps, lrs) -> str | None:
        """Rewrite the table when an address changed. Returns why the new tensors
        do not fit the rows (the table is then left alone), or None."""
        key = self.key(params, grads, indices, states, steps, lrs)
        if key == self._key:
            return None
        why = self.stale(params, grads, indices, states)
        if why is None:
            self._write(self.table, params, grads, indices, states, steps, lrs)
            self._key = key
        return why

    def refresh_grads(self, param_ptrs: list[int], grads) -> str | None:
        """:meth:`refresh` for an eager step, where only the gradients are new
        tensors: the other tensors are the plan's own (the optimizer re-plans when
        its state is replaced), so only the parameters' addresses (``p.data``
        reassigned) and the gradients' layout are checked (autograd keeps a
        gradient's shape, dtype and device those of its parameter)."""
        key = param_ptrs + [g.data_ptr() for g in grads] + self._static
        if key == self._key:
            return None
        if param_ptrs != self._param_ptrs:
            return "a parameter's storage changed since the step was planned"
        for r, g in zip(self.rows, grads):
            if not g.is_contiguous() or g.numel() != r.grad.numel() or g.dtype != r.grad.dtype:
                return f"parameter {r.name!r}: its gradient no longer fits the kernel row"
        params, _, indices, states = self.tensors()
        self._write(self.table, params, grads, indices, states, self.steps, self.lrs)
        self._key = key
        return None


def scalar_on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A grad scale / found_inf flag as the kernel reads it: one float32 on ``device``."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):  # GradScaler sums an empty dict to int 0 when no .grad exists
        t = torch.tensor(float(t))
    return t.to(device=device, dtype=torch.float32).reshape(1)


@torch.library.custom_op("gallop::sparse_adamw_step", mutates_args=("params", "states", "steps"))
def sparse_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    indices: list[torch.Tensor],
    states: list[torch.Tensor],
    steps: torch.Tensor,
    lrs: torch.Tensor,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    plan: int,
    refresh: bool,
) -> None:
    """One sparse AdamW step over the rows of StepPlan ``plan`` (see :class:`StepPlan`).

    params, grads, indices, states: the rows' tensors in table order (as
    ``StepPlan.tensors`` gives them); steps: float32 step counters, advanced
    unless found_inf is nonzero; lrs: float64 learning rates; grad_scale: the
    gradients are multiplied by float32(1 / double(scale)); found_inf: nonzero
    skips the whole step on the device. Mutates params, states and steps.
    """
    _check_live(plan)
    target = _PLANS.get(plan)
    if target is None:
        raise ValueError(f"sparse_adamw_step: no StepPlan with id {plan} (it was garbage collected)")
    target.run(params, grads, indices, states, steps, lrs, grad_scale, found_inf, refresh)


@sparse_adamw_step.register_fake
def _(params, grads, indices, states, steps, lrs, grad_scale, found_inf, plan, refresh) -> None:
    return None
