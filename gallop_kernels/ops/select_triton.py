"""Triton selection backend: the window plan's count and emission passes on the GPU.

Same contract and output as :func:`gallop_kernels.reference.topk_keys` (one process).
The plan is gallop_kernels.radix.select_window: a strided sample predicts a window
(lo, hi] of order keys around the k-th largest, then

- ``_count_kernel`` reads theta and grad once and writes, per block of BLOCK
  weights, how many keys are > hi, in (lo, hi], == lo and non-finite: block
  reductions and four plain stores per program, no atomics;
- ``_emit_kernel`` reads them again and writes each block's selected positions at
  the block's exclusive prefix offset (order-preserving, no shared counter), and
  its window candidates (key, position) at its own offset, or in ties mode its
  first quota[b] keys == lo.

One launch per pass for all sources of one (theta dtype, grad dtype, layout): a
program finds its source in a program -> source table and the source's pointers,
size, strides and bases in a per-source int64 table (int -> pointer casts). A
window miss falls back to the histogram plan (ops/select_histogram.py).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import keys, radix, reference
from ..criteria import CRITERIA
from .score import signed_key
from .select_histogram import topk_keys_histogram

# 2048 weights per program at 8 warps: 8 per thread, one 16-byte load of bf16, two
# of fp32 (4096 took the collect emission to 128 registers). Counts cost 16 bytes
# per block (0.2% of bf16 theta and grad).
BLOCK = 2048
NUM_WARPS = 8
# Registers (tests/test_triton_compile.py holds the budgets): the count and the ties
# emission fit 64 (4 blocks of 8 warps per SM, 50% occupancy); the collect emission
# takes 64-80 (37.5%): its scattered stores keep 64-bit addresses, and capping it
# at 64 with maxnreg makes ptxas spill.
# Per-source table columns (int64).
_COLUMNS = ("theta", "grad", "n", "theta_stride", "grad_stride", "base", "first_block", "first_program")
_FINITE_MAX = tl.constexpr(radix.FINITE_MAX)
_FINITE_MIN = tl.constexpr(radix.FINITE_MIN)


@triton.jit
def _block_keys(table_ptr, source_ptr, theta_like, grad_like, eps,
                CRITERION: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block: its global number, its first global position, lanes,
    lane mask and the signed keys of its weights."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(source_ptr + pid).to(tl.int64) * 8
    local = pid - tl.load(row + 7)  # int64 from here: offsets pass 2**31
    start = local * BLOCK
    lane = tl.arange(0, BLOCK)
    size = tl.minimum(tl.load(row + 2) - start, BLOCK).to(tl.int32)
    theta = tl.load(row).to(tl.pointer_type(theta_like.dtype.element_ty), bitcast=True)
    grad = tl.load(row + 1).to(tl.pointer_type(grad_like.dtype.element_ty), bitcast=True)
    if ALIGNED:  # contiguous, 16-byte aligned, n % 16 == 0: 16-byte vector loads
        mask = lane < tl.multiple_of(size, 16)
        theta_ptrs = tl.multiple_of(theta + start, 16) + lane
        grad_ptrs = tl.multiple_of(grad + start, 16) + lane
    else:
        mask = lane < size
        flat_index = start + lane
        theta_ptrs = theta + flat_index * tl.load(row + 3)
        grad_ptrs = grad + flat_index * tl.load(row + 4)
    key = signed_key(theta_ptrs, grad_ptrs, mask, eps, CRITERION)
    return tl.load(row + 6) + local, tl.load(row + 5) + start, lane, mask, key


@triton.jit
def _count_kernel(table_ptr, source_ptr, theta_like, grad_like, counts_ptr, eps, lo, hi,
                  CRITERION: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1: per block, int32 counts of keys > hi, in (lo, hi], == lo, non-finite."""
    block, first, lane, mask, key = _block_keys(
        table_ptr, source_ptr, theta_like, grad_like, eps, CRITERION, ALIGNED, BLOCK)
    out = counts_ptr + block * 4
    tl.store(out, tl.sum((mask & (key > hi)).to(tl.int32), axis=0))
    tl.store(out + 1, tl.sum((mask & (key > lo) & (key <= hi)).to(tl.int32), axis=0))
    tl.store(out + 2, tl.sum((mask & (key == lo)).to(tl.int32), axis=0))
    tl.store(out + 3, tl.sum((mask & ((key > _FINITE_MAX) | (key < _FINITE_MIN))).to(tl.int32), axis=0))


@triton.jit
def _emit_kernel(table_ptr, source_ptr, theta_like, grad_like, out_ptr, out_dst_ptr, quota_ptr,
                 cand_key_ptr, cand_pos_ptr, cand_dst_ptr, eps, lo, hi,
                 TIES: tl.constexpr, CRITERION: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: positions of keys > hi (and, TIES, of the first quota[b] keys == lo) to
    out[out_dst[b]:] in order; without TIES, keys in (lo, hi] and their positions to
    cand_key/cand_pos[cand_dst[b]:]."""
    block, first, lane, mask, key = _block_keys(
        table_ptr, source_ptr, theta_like, grad_like, eps, CRITERION, ALIGNED, BLOCK)
    take = mask & (key > hi)
    if TIES:
        tie = mask & (key == lo)
        take = take | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= tl.load(quota_ptr + block)))
    else:  # candidates first: key is dead after this, fewer live registers
        cand = mask & (key > lo) & (key <= hi)
        slot = tl.cumsum(cand.to(tl.int32), axis=0) - 1
        dst = tl.load(cand_dst_ptr + block)
        tl.store(cand_key_ptr + dst + slot, key, mask=cand)
        tl.store(cand_pos_ptr + dst + slot, first + lane, mask=cand)
    out = out_ptr + tl.load(out_dst_ptr + block)
    tl.store(out + (tl.cumsum(take.to(tl.int32), axis=0) - 1), first + lane, mask=take)


def _launch(kernel, sources: list[int], grid: int, *args, **meta) -> None:
    """Every kernel launch goes through here (tests see which sources each pass reads)."""
    kernel[(grid,)](*args, BLOCK=BLOCK, num_warps=NUM_WARPS, **meta)


class _Group:
    """Sources launched together: same dtypes and layout; their program -> source table."""

    def __init__(self, theta_like: torch.Tensor, grad_like: torch.Tensor, aligned: bool):
        self.theta_like, self.grad_like, self.aligned = theta_like, grad_like, aligned
        self.sources: list[int] = []
        self.blocks: list[int] = []
        self.programs = 0


class TritonPrimitives:
    """radix.Primitives on Triton kernels for ``sources`` (k > 0 selections only)."""

    def __init__(self, sources: list[keys.Source], criterion: str, eps: float, device: torch.device):
        reads_theta, reads_grad = radix.READS[criterion]
        self.criterion, self.eps, self.device = criterion, eps, device
        groups: dict[tuple, _Group] = {}
        rows, self._views = [], []
        base, blocks = 0, 0
        for i, s in enumerate(sources):
            n, nb = s.numel, triton.cdiv(s.numel, BLOCK)
            t = radix.flat(s.param) if reads_theta else None
            g = radix.flat(s.grad) if reads_grad else None
            (t, ts), (g, gs) = t or g, g or t  # an unread tensor is passed as the read one
            aligned = n % 16 == 0 and all(v.data_ptr() % 16 == 0 and st == 1 for v, st in ((t, ts), (g, gs)))
            if nb:
                grp = groups.setdefault((t.dtype, g.dtype, aligned), _Group(t, g, aligned))
                rows.append([t.data_ptr(), g.data_ptr(), n, ts, gs, base, blocks, grp.programs])
                grp.sources.append(i)
                grp.blocks.append(nb)
                grp.programs += nb
                self._views += [t, g]  # the table holds raw addresses: keep copies alive
            else:
                rows.append([0] * len(_COLUMNS))
            base, blocks = base + n, blocks + nb
        self.num_blocks = blocks
        self.groups = list(groups.values())
        self.table = torch.tensor(rows, dtype=torch.int64).to(device)
        for grp in self.groups:  # built on the device: 4 bytes per block, no host copy
            ids = torch.tensor(grp.sources, dtype=torch.int32).to(device)
            grp.program_source = torch.repeat_interleave(
                ids, torch.tensor(grp.blocks).to(device), output_size=grp.programs)

    def _sweep(self, kernel, *args, **meta) -> None:
        for grp in self.groups:
            _launch(kernel, grp.sources, grp.programs, self.table, grp.program_source, grp.theta_like,
                    grp.grad_like, *args, CRITERION=self.criterion, ALIGNED=grp.aligned, **meta)

    def count(self, lo: int, hi: int) -> torch.Tensor:
        """See radix.Primitives.count."""
        counts = torch.empty(self.num_blocks, 4, dtype=torch.int32, device=self.device)
        self._sweep(_count_kernel, counts, self.eps, lo, hi)
        return counts

    def emit(self, lo, hi, out, out_dst, quota, cand_key, cand_pos, cand_dst) -> None:
        """See radix.Primitives.emit."""
        ties = quota is not None
        if ties:  # unused buffers: the same dtypes, so the same kernel signature
            cand_key, cand_pos, cand_dst = quota, out, out_dst
        else:
            quota = cand_key
        self._sweep(_emit_kernel, out, out_dst, quota, cand_key, cand_pos, cand_dst, self.eps, lo, hi, TIES=ties)


def topk_keys_triton(
    sources: list[keys.Source],
    k: int,
    criterion: str,
    eps: float = 1e-8,
    seed: int = 0,
    *,
    config: radix.Config = radix.DEFAULT,
    trace: list | None = None,
) -> tuple[list[torch.Tensor], int | None]:
    """Exactly k weights with the largest keys over ``sources``, ties by position.

    Same contract and output as :func:`gallop_kernels.reference.topk_keys`
    (single process): sorted int64 flat indices per source, and the threshold
    order key (None when k == 0). theta and grad may be fp32, bf16 or fp16, each
    in its own dtype. Raises ValueError on a NaN or Inf score. Reads theta and grad
    twice when the sampled window holds the k-th key, else falls back to the
    histogram plan. ``trace``: a list that receives the radix.Plan.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    if not radix.streams(sources, criterion):
        return reference.topk_keys(sources, k, criterion, eps, seed, config=config)
    if k == 0:
        return [torch.empty(0, dtype=torch.int64, device=s.param.device) for s in sources], None
    dev = sources[0].param.device
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        prims = TritonPrimitives(sources, criterion, eps, dev)
        fallback = lambda: topk_keys_histogram(sources, k, criterion, eps, config)  # noqa: E731
        return radix.select_window(sources, k, criterion, eps, prims, fallback, config, trace)
