"""Plain-PyTorch reference for GaLLoP: the contract every kernel is tested against.

Selection works on 32-bit *order keys* (gallop_kernels.keys: the score and the key,
re-exported here). Top-k over keys is done with histograms over the key's
high and low 16 bits, never a full sort, and never with an O(N) score tensor:
parameters are streamed in chunks, so extra memory is O(chunk + bins + k).

Tie rule (part of the contract): among equal keys, the earlier source (the
parameter's position in ``named_parameters()``) wins, then the lower flat index.
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw as _torch_adamw

from . import radix
from .criteria import CRITERIA, GRADIENT_CRITERIA  # noqa: F401 (re-exported)
from .distributed import gather, scatter_
from .keys import (  # noqa: F401 (Source, key_to_score, random_score, score: re-exported)
    SIGN, Source, chunk_scores, key_to_score, random_score, raise_nonfinite, score, signed_key,
)

SCOPES = ("global", "per_tensor")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def num_to_select(rho: float, n: int) -> int:
    """k = round(rho * n), half away from zero, and at least 1 when n > 0."""
    if n == 0:
        return 0
    return min(n, max(1, math.floor(rho * n + 0.5)))


# ----------------------------------------------------------------------------
# chunked top-k over keys
# ----------------------------------------------------------------------------


class LocalComm:
    """Collectives of a single process: identities. See gallop_kernels.distributed for ranks."""

    bytes_sent = 0
    world, rank = 1, 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_cat(self, t: torch.Tensor) -> torch.Tensor:
        return t


def topk_keys(
    sources: list[Source],
    k: int,
    criterion: str,
    eps: float = 1e-8,
    seed: int = 0,
    comm: LocalComm | None = None,
    config: radix.Config | None = None,
) -> tuple[list[torch.Tensor], int | None]:
    """Exactly k weights with the largest keys over ``sources``, ties by position.

    Returns the sorted int64 flat indices selected in each source and the
    threshold key (the k-th largest signed key + 2**31; None when k == 0).
    ``config`` sets the chunk and candidate buffer sizes (radix.Config;
    default radix.DEFAULT). Raises
    ValueError on a NaN or Inf score. With a ``comm`` over several ranks, ``sources`` are this rank's shards
    and k counts over all ranks: only histograms and the boundary bin's
    candidates cross ranks.
    """
    config = config or radix.DEFAULT
    chunk = config.chunk
    comm = comm or LocalComm()
    devices = [s.param.device for s in sources]
    empty = [torch.empty(0, dtype=torch.int64, device=d) for d in devices]
    if k == 0:
        return empty, None
    dev = devices[0] if devices else torch.device("cpu")

    def stream():  # (source number, chunk start, int32 signed keys)
        for si, src in enumerate(sources):
            for start, s in chunk_scores(src, criterion, eps, seed, chunk):
                yield si, start, signed_key(s)

    # Pass 1: histogram of the high digit (key >> 16, i.e. signed key >> 16 + 2**15).
    hist = torch.zeros(radix.NUM_BINS, dtype=torch.int64, device=dev)
    for _, _, sk in stream():
        hist += torch.bincount((sk >> radix.BITS) + (radix.NUM_BINS // 2), minlength=radix.NUM_BINS).to(dev)
    hist = comm.all_sum(hist).cpu()
    if radix.has_nonfinite(hist):
        raise_nonfinite(sources, criterion, eps, seed, chunk)
        raise ValueError(f"a {criterion} score is NaN or Inf on another rank")
    hi_bin, above = radix.boundary(hist, k)
    need = k - above  # weights still to take from the boundary bin, in key order
    collect = int(hist[hi_bin]) <= config.candidate_cap
    bin_first = (hi_bin << radix.BITS) - SIGN  # signed keys of the bin are [bin_first, bin_last]
    bin_last = bin_first + radix.NUM_BINS - 1

    # Pass 2: emit everything above the boundary bin; resolve the bin itself from a
    # candidate buffer, or histogram its low digit when it is too large to buffer.
    picked = [[] for _ in sources]
    cand_key, cand_pos = [], []
    low_hist = torch.zeros(radix.NUM_BINS, dtype=torch.int64, device=dev)
    for si, start, sk in stream():
        over = sk > bin_last
        picked[si].append(over.nonzero().reshape(-1) + start)
        in_bin = ((sk >= bin_first) & ~over).nonzero().reshape(-1)
        if collect:
            cand_key.append(sk[in_bin].to(dev, torch.int64))
            cand_pos.append((in_bin + (sources[si].offset + start)).to(dev))
        else:
            low_hist += torch.bincount(sk[in_bin] - bin_first, minlength=radix.NUM_BINS).to(dev)

    if collect:
        keys = comm.all_cat(torch.cat(cand_key) if cand_key else torch.empty(0, dtype=torch.int64, device=dev))
        pos = comm.all_cat(torch.cat(cand_pos) if cand_pos else torch.empty(0, dtype=torch.int64, device=dev))
        chosen, threshold = radix.resolve_candidates(keys, pos, need)
        for si, src in enumerate(sources):
            mine = chosen[(chosen >= src.offset) & (chosen < src.offset + src.numel)]
            picked[si].append((mine - src.offset).to(devices[si]))
    else:
        lo_bin, above_lo = radix.boundary(comm.all_sum(low_hist).cpu(), need)
        threshold = bin_first + lo_bin
        _take_ties(sources, stream, picked, threshold, bin_last, need - above_lo, comm, dev)

    out = [torch.sort(torch.cat(p)).values if p else e for p, e in zip(picked, empty)]
    return out, threshold + SIGN


def _take_ties(sources, stream, picked, threshold, bin_last, ties, comm, dev) -> None:
    """Heavy-tie passes: keys above ``threshold`` in its bin, then ``ties`` keys equal
    to it, first in position order across all sources (and ranks)."""
    equal = torch.zeros(len(sources), dtype=torch.int64)
    for si, start, sk in stream():
        picked[si].append(((sk > threshold) & (sk <= bin_last)).nonzero().reshape(-1) + start)
        equal[si] += int((sk == threshold).sum())
    offsets = torch.tensor([s.offset for s in sources], dtype=torch.int64)
    all_off, all_eq = (comm.all_cat(t.to(dev)).cpu() for t in (offsets, equal))
    has = all_eq > 0  # pieces with ties have distinct offsets; empty ones may share
    all_off, all_eq = all_off[has], all_eq[has]
    order = torch.argsort(all_off)
    quota = dict(zip(all_off[order].tolist(), radix.tie_quota(all_eq[order], ties).tolist()))
    left = [quota.get(s.offset, 0) if int(equal[si]) else 0 for si, s in enumerate(sources)]
    for si, start, sk in stream():
        if left[si]:
            eq = (sk == threshold).nonzero().reshape(-1)[: left[si]]
            left[si] -= eq.numel()
            picked[si].append(eq + start)


# ----------------------------------------------------------------------------
# sparse AdamW
# ----------------------------------------------------------------------------


def sparse_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    step: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    master: torch.Tensor | None = None,
    grad_compact: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdamW step on the selected entries of ``param`` only.

    Gathers the selected weights and gradients into float32, runs
    torch.optim.AdamW's own single-tensor math on that compact copy with the
    compact float32 states, and scatters the result back. Unselected weights are
    not touched, so weight decay never reaches them.

    master: (k,) float32 master weights of the selected entries, updated in place
    and used instead of the gathered weights (for bf16/fp16 params). grad_compact:
    ``grad`` holds the (k,) selected gradient entries, not a dense gradient.
    grad_scale: the gradient is multiplied by ``1 / grad_scale`` rounded to float32
    (as GradScaler.unscale_ does). found_inf: when nonzero, nothing changes, not
    even ``step`` (reads it on the host).
    """
    if found_inf is not None and float(found_inf) != 0:
        return
    theta = master if master is not None else gather(param, indices).float()
    g = grad.float() if grad_compact else gather(grad, indices).float()
    if grad_scale is not None:
        g = g * grad_scale.double().reciprocal().float().to(g.device)
    _torch_adamw(
        [theta],
        [g],
        [exp_avg],
        [exp_avg_sq],
        [max_exp_avg_sq] if amsgrad else [],
        [step],
        foreach=False,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
    )
    scatter_(param, indices, theta)
