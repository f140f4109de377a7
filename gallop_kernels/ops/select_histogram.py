"""The exact fallback of the Triton selection: score, one shared histogram and index emission.

Runs when the window plan misses (ops/select_triton.py); same output as
:func:`gallop_kernels.reference.topk_keys`, same plan (gallop_kernels.radix).

Pass 1 (``_histogram_kernel``) reads theta and grad in their own dtype, computes the
float32 score exactly as ``keys.score`` does, maps it to the signed order key
and counts the key's high 16 bits in ONE histogram shared by every tensor of the
selection. A prefix sum over the histogram gives the boundary bin. Pass 2
(``_emit_kernel``) re-reads theta and grad, appends the flat indices above the
boundary bin and buffers the boundary bin's candidates (key, position), which are
resolved exactly with torch ops on the small buffer. A boundary bin larger than
``config.candidate_cap`` (heavy ties) gets a low-digit histogram instead and two
more passes (keys above the exact threshold, then ties in position order), as in
the reference. Its first pass issues one global atomic per nonzero key: slow on a
GPU (L2-atomic bound), hence only the fallback.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import keys, radix
from ..radix import BITS, NUM_BINS
from .score import signed_key

# 4096 weights per program: 16 per thread at 8 warps, i.e. two 16-byte loads per
# thread for bf16. One program per block keeps the emission order-preserving
# within a block with a single scalar atomic per program.
BLOCK = 4096
NUM_WARPS = 8
_HALF = NUM_BINS // 2  # high digit of the order key = (signed key >> 16) + 2**15


@triton.jit
def _key_at(theta_ptr, grad_ptr, offs, mask, theta_stride, grad_stride, eps, CRITERION: tl.constexpr):
    """Signed key of the weights at flat indices ``offs``."""
    return signed_key(theta_ptr + offs * theta_stride, grad_ptr + offs * grad_stride, mask, eps, CRITERION)


@triton.jit
def _histogram_kernel(
    theta_ptr, grad_ptr, hist_ptr, n, theta_stride, grad_stride, eps,
    CRITERION: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 1: add the high digit of every key to the shared int64 histogram."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    key = _key_at(theta_ptr, grad_ptr, offs, mask, theta_stride, grad_stride, eps, CRITERION)
    # Exact zeros (zero gradients; pafi of theta = 0) are common and would all hit
    # one bin: count them with one atomic per program instead of one per weight.
    zero = mask & (key == 0)
    tl.atomic_add(hist_ptr + ((key >> 16) + HALF), 1, mask=mask & (key != 0), sem="relaxed")
    zeros = tl.sum(zero.to(tl.int64), axis=0)
    tl.atomic_add(hist_ptr + HALF, zeros, mask=zeros > 0, sem="relaxed")


@triton.jit
def _append(out_ptr, count_ptr, seg_dst_ptr, seg_cnt_ptr, prog, offs, take):
    """Append offs[take] to ``out`` in order; record where this program's run went."""
    taken = take.to(tl.int32)
    cnt = tl.sum(taken, axis=0).to(tl.int64)
    dst = tl.atomic_add(count_ptr, cnt, sem="relaxed")
    tl.store(out_ptr + (dst + tl.cumsum(taken, axis=0) - 1), offs, mask=take)
    tl.store(seg_dst_ptr + prog, dst)
    tl.store(seg_cnt_ptr + prog, cnt)


@triton.jit
def _emit_kernel(
    theta_ptr, grad_ptr, out_ptr, count_ptr, seg_dst_ptr, seg_cnt_ptr, key_buf_ptr, pos_buf_ptr, aux_ptr,
    n, theta_stride, grad_stride, base, prog0, eps, lo, hi,
    CRITERION: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Passes 2-4, by MODE (lo, hi are signed keys):

    collect: append keys > hi; keys in [lo, hi] go to the candidate buffers
      (key_buf, pos_buf = base + index), their count in aux.
    low: append keys > hi; count keys in [lo, hi] in the low-digit histogram aux.
    above: append keys in (lo, hi]; store this program's count of keys == lo in aux.
    ties: append the first aux[program] keys == lo of this program.
    """
    pid = tl.program_id(0).to(tl.int64)
    prog = prog0 + pid
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if MODE == "ties":
        quota = tl.load(aux_ptr + prog)
        mask = mask & (quota > 0)  # programs past the quota read nothing
    key = _key_at(theta_ptr, grad_ptr, offs, mask, theta_stride, grad_stride, eps, CRITERION)
    if MODE == "collect":
        _append(out_ptr, count_ptr, seg_dst_ptr, seg_cnt_ptr, prog, offs, mask & (key > hi))
        cand = mask & (key >= lo) & (key <= hi)
        taken = cand.to(tl.int32)
        dst = tl.atomic_add(aux_ptr, tl.sum(taken, axis=0).to(tl.int64), sem="relaxed")
        slot = dst + tl.cumsum(taken, axis=0) - 1
        tl.store(key_buf_ptr + slot, key, mask=cand)
        tl.store(pos_buf_ptr + slot, base + offs, mask=cand)
    elif MODE == "low":
        _append(out_ptr, count_ptr, seg_dst_ptr, seg_cnt_ptr, prog, offs, mask & (key > hi))
        in_bin = mask & (key >= lo) & (key <= hi)
        tl.atomic_add(aux_ptr + (key - lo), 1, mask=in_bin, sem="relaxed")
    elif MODE == "above":
        _append(out_ptr, count_ptr, seg_dst_ptr, seg_cnt_ptr, prog, offs, mask & (key > lo) & (key <= hi))
        tl.store(aux_ptr + prog, tl.sum((mask & (key == lo)).to(tl.int64), axis=0))
    else:
        tie = mask & (key == lo)
        rank = tl.cumsum(tie.to(tl.int64), axis=0) - 1
        _append(out_ptr, count_ptr, seg_dst_ptr, seg_cnt_ptr, prog, offs, tie & (rank < quota))


# ----------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------


def _plan(numels: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Per source: its grid, its first global program number, and its first global
    position. Python ints, so nothing overflows at 2**31 elements."""
    grids, prog_base, bases, p, b = [], [], [], 0, 0
    for n in numels:
        grids.append(triton.cdiv(n, BLOCK))
        prog_base.append(p)
        bases.append(b)
        p += grids[-1]
        b += n
    return grids, prog_base + [p], bases + [b]


def _launch(kernel, theta, grad, grid, *args, **meta) -> None:
    """Every kernel launch goes through here (tests count the reads of theta and grad)."""
    kernel[(grid,)](theta, grad, *args, BLOCK=BLOCK, num_warps=NUM_WARPS, **meta)


class _Pass:
    """One emission pass over all sources: its per-program segment table."""

    def __init__(self, programs: int, device):
        self.dst = torch.zeros(programs, dtype=torch.int64, device=device)
        self.cnt = torch.zeros(programs, dtype=torch.int64, device=device)

    def in_order(self, out: torch.Tensor, prog_base: list[int]) -> list[torch.Tensor]:
        """The indices this pass appended, per source and ascending: programs cover
        increasing index ranges, so ordering the runs by program orders them."""
        ends = self.cnt.cumsum(0)
        total = int(ends[-1]) if ends.numel() else 0
        shift = torch.repeat_interleave(self.dst - (ends - self.cnt), self.cnt, output_size=total)
        ordered = out[shift + torch.arange(total, device=out.device)]
        cuts = torch.cat([ends.new_zeros(1), ends])[prog_base].tolist()
        return list(ordered.split([b - a for a, b in zip(cuts, cuts[1:])]))


def topk_keys_histogram(sources, k, criterion, eps, config: radix.Config = radix.DEFAULT):
    """reference.topk_keys by the histogram plan on the GPU (k > 0; the criteria of
    radix.READS; fp32/bf16/fp16 on the current device). Reads theta and grad twice
    (four times when more than config.candidate_cap weights share the boundary bin)."""
    dev = sources[0].param.device
    reads_theta, reads_grad = radix.READS[criterion]
    views = []
    for s in sources:  # an unread tensor is passed as the read one: fewer kernel variants
        t = radix.flat(s.param) if reads_theta else None
        g = radix.flat(s.grad) if reads_grad else None
        views.append((t or g, g or t))
    grids, prog_base, bases = _plan([s.numel for s in sources])
    live = [i for i, g in enumerate(grids) if g]

    def sweep(kernel, buffers, scalars, grid_of=grids.__getitem__, **meta):
        """Launch ``kernel`` over every source: theta, grad, *buffers, n, strides, *scalars(i)."""
        for i in live:
            (t, ts), (g, gs) = views[i]
            if grid_of(i) > 0:
                args = (*buffers, t.numel(), ts, gs, *scalars(i))
                _launch(kernel, t, g, grid_of(i), *args, CRITERION=criterion, **meta)

    hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=dev)  # int64: all-zero grads of 8e9 weights
    sweep(_histogram_kernel, (hist,), lambda i: (eps,), HALF=_HALF)
    hist = hist.cpu()
    if radix.has_nonfinite(hist):
        keys.raise_nonfinite(sources, criterion, eps)
        raise ValueError(f"a {criterion} score is NaN or Inf")  # the kernel saw one the reference did not
    hi_bin, above = radix.boundary(hist, k)
    need = k - above
    bin_first = (hi_bin << BITS) - keys.SIGN  # signed keys of the boundary bin
    bin_last = bin_first + NUM_BINS - 1

    out = torch.empty(k, dtype=torch.int64, device=dev)
    count = torch.zeros(1, dtype=torch.int64, device=dev)
    unused_keys = torch.zeros(1, dtype=torch.int32, device=dev)  # same pointer type: same kernel variant

    def emit(mode, aux, lo, hi, key_buf=unused_keys, pos_buf=count, **grid_of):
        p = _Pass(prog_base[-1], dev)
        buffers = (out, count, p.dst, p.cnt, key_buf, pos_buf, aux)
        sweep(_emit_kernel, buffers, lambda i: (bases[i], prog_base[i], eps, lo, hi), MODE=mode, **grid_of)
        return p.in_order(out, prog_base)

    cand_n = int(hist[hi_bin])
    if cand_n <= config.candidate_cap:
        cand_key = torch.empty(cand_n, dtype=torch.int32, device=dev)
        pos = torch.empty(cand_n, dtype=torch.int64, device=dev)
        picked = emit("collect", torch.zeros(1, dtype=torch.int64, device=dev), bin_first, bin_last, cand_key, pos)
        # Candidates arrive in program-completion order; resolve_candidates orders them.
        chosen, threshold = radix.resolve_candidates(cand_key, pos, need)
        chosen = torch.sort(chosen).values
        cuts = torch.searchsorted(chosen, torch.tensor(bases, device=dev)).tolist()
        picked = [radix.merge(p, chosen[a:b] - bases[i]) for i, (p, a, b) in enumerate(zip(picked, cuts, cuts[1:]))]
    else:
        low = torch.zeros(NUM_BINS, dtype=torch.int64, device=dev)
        picked = emit("low", low, bin_first, bin_last)
        lo_bin, above_lo = radix.boundary(low.cpu(), need)
        threshold = bin_first + lo_bin
        ties = torch.zeros(prog_base[-1], dtype=torch.int64, device=dev)
        picked = [radix.merge(a, b) for a, b in zip(picked, emit("above", ties, threshold, bin_last))]
        quota = radix.tie_quota(ties, need - above_lo)  # ties go to the lowest positions
        last = int(quota.nonzero()[-1]) + 1 if int(quota.sum()) else 0
        tied = emit("ties", quota, threshold, threshold, grid_of=lambda i: min(grids[i], last - prog_base[i]))
        picked = [radix.merge(a, b) for a, b in zip(picked, tied)]
    return [p.to(d) for p, d in zip(picked, (s.param.device for s in sources))], threshold + keys.SIGN
