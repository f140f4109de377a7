"""The selection plan every backend shares: how to find the k largest order keys exactly.

Two plans, one set of helpers:

- the histogram plan (``reference.topk_keys``, the distributed path and the Triton
  fallback): a 2**16-bin histogram of the key's high digit gives the boundary bin
  (:func:`boundary`); its candidates are resolved exactly (:func:`resolve_candidates`),
  or, when too many, a low-digit histogram and a tie quota (:func:`tie_quota`) finish.
- the window plan (:func:`select_window`, the fast path of the Triton and host
  backends): a strided sample of the scores predicts a window of keys around the
  k-th largest; one counting pass checks it, one emission pass writes the result.
  Backends plug in through :class:`Primitives`; a miss falls back to the histogram plan.

Keys here are *signed* order keys (``keys.signed_key``: int32, the float
order), except where a function says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from . import keys

# The 32-bit key is split into two 16-bit digits: a high-digit histogram, then a
# low-digit one inside the boundary bin. Structural, not a tuning knob.
BITS = 16
NUM_BINS = 1 << BITS

# High digits of non-finite keys: +Inf/+NaN above 0xFF80, -Inf/-NaN up to 0x007F.
_NONFINITE_LOW, _NONFINITE_HIGH = 0x0080, 0xFF80
# Signed keys of the finite floats: [-FLT_MAX, FLT_MAX] maps to [FINITE_MIN, FINITE_MAX].
FINITE_MAX = 0x7F7FFFFF
FINITE_MIN = -FINITE_MAX - 1
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


# Which of (theta, grad) each streamed criterion reads. random is a counter-based hash
# and float64 weights are rare: both stay on the reference, so the fast backends' kernels
# handle these criteria in three dtypes.
READS = {"gallop": (True, True), "saft": (False, True), "magnitude": (True, False), "pafi": (True, False)}
STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def streams(sources: list, criterion: str) -> bool:
    """Whether a fast backend's passes can score ``sources`` by ``criterion`` (else the
    reference runs: random, float64)."""
    return criterion in READS and all(
        t is None or t.dtype in STREAM_DTYPES for s in sources for t in (s.param, s.grad)
    )


def flat(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A 1-D view of ``t`` in flat-index order and its stride; copies only when no
    such view exists (e.g. a transposed matrix)."""
    f = t.detach().reshape(-1)
    return f, (f.stride(0) if f.numel() else 1)


@dataclass(frozen=True)
class Config:
    """Tuning knobs of a selection. None of them changes the result, only time and memory.

    chunk: weights the reference scores at a time (its extra memory is O(chunk)).
    candidate_cap: the histogram plan buffers a boundary bin of at most this many
      weights (16 bytes each); a larger one costs a low-digit pass and two tie passes.
    window_cap: the window plan buffers at most this many candidates (12 bytes each);
      a larger window falls back to the histogram plan.
    sample_stride, sample_max: the window plan samples every stride-th weight of
      each source, stride the least odd multiple of sample_stride that keeps the
      sample at most sample_max keys (20 bytes each while it is scored); odd, and
      257 prime, so the sample does not align with power-of-two rows.
    margin_sigmas, margin_min: the window spans the k-th key's expected rank in the
      sample, plus and minus margin_sigmas binomial standard deviations plus
      margin_min sample ranks.
    """

    chunk: int = keys.CHUNK
    candidate_cap: int = 1 << 20
    window_cap: int = 1 << 23
    sample_stride: int = 257
    sample_max: int = 1 << 22
    margin_sigmas: float = 6.0
    margin_min: int = 64


DEFAULT = Config()


# ----------------------------------------------------------------------------
# the histogram plan's pieces
# ----------------------------------------------------------------------------


def has_nonfinite(hist: torch.Tensor) -> bool:
    """Whether a high-digit histogram counted any NaN or Inf score."""
    return bool(int(hist[:_NONFINITE_LOW].sum()) or int(hist[_NONFINITE_HIGH:].sum()))


def resolve_candidates(key: torch.Tensor, pos: torch.Tensor, need: int) -> tuple[torch.Tensor, int]:
    """The ``need`` best boundary-bin candidates: their global positions and the last key taken.

    Candidates may arrive out of position order (ranks, GPU programs): ordering by
    position first makes the stable key sort break ties by position.
    """
    by_pos = torch.sort(pos, stable=True).indices
    top = by_pos[torch.sort(key[by_pos], descending=True, stable=True).indices[:need]]
    return pos[top], int(key[top[-1]])


def boundary(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest key, and how many keys lie in higher bins."""
    from_top = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, k))  # first position with count >= k
    b = NUM_BINS - 1 - i
    return b, int(from_top[i]) - int(hist[b])


def tie_quota(equal: torch.Tensor, ties: int) -> torch.Tensor:
    """How many of its keys equal to the threshold each piece takes, pieces in position
    order: the first ``ties`` such keys overall, each piece what earlier ones left."""
    before = torch.cumsum(equal, 0) - equal
    return (ties - before).clamp(min=0).minimum(equal)


# ----------------------------------------------------------------------------
# the window plan
# ----------------------------------------------------------------------------


class Primitives(Protocol):
    """The two streaming passes a backend gives :func:`select_window`.

    The backend cuts its sources into ``num_blocks`` blocks of consecutive weights,
    numbered in global position order (source by source, ascending within one), a
    block never straddling two sources. A weight's global position is its flat index
    plus the sizes of the sources before it (:func:`bases`). lo <= hi, signed int32 keys.
    """

    num_blocks: int
    device: torch.device

    def count(self, lo: int, hi: int) -> torch.Tensor:
        """(num_blocks, 4) int32 on ``device``: per block, how many keys are > hi,
        in (lo, hi], == lo, and non-finite (NaN or Inf scores)."""

    def emit(
        self,
        lo: int,
        hi: int,
        out: torch.Tensor,
        out_dst: torch.Tensor,
        quota: torch.Tensor | None,
        cand_key: torch.Tensor | None,
        cand_pos: torch.Tensor | None,
        cand_dst: torch.Tensor | None,
    ) -> None:
        """Per block b, ascending: write the global positions of its keys > hi and, with
        a ``quota``, of its first quota[b] keys == lo, to out[out_dst[b]:]; with
        candidate buffers, write its keys in (lo, hi] (int32) and their global
        positions (int64) to cand_key[cand_dst[b]:] and cand_pos[cand_dst[b]:].
        out_dst, cand_dst: int64 (num_blocks,); quota: int32 (num_blocks,)."""


@dataclass
class Plan:
    """What :func:`select_window` decided: the window, the counts it saw and the mode.

    mode: "collect" (the k-th key is in (lo, hi]: candidates resolved exactly),
    "ties" (the k-th key is lo: ties taken by position), "miss" (k is outside the
    window's counts) or "overflow" (more than window_cap candidates); the last two
    ran the fallback.
    """

    lo: int
    hi: int
    above: int = 0
    window: int = 0
    equal: int = 0
    mode: str = ""


def stride(n: int, config: Config) -> int:
    """The sampling stride for n weights (see Config)."""
    times = -(-n // (config.sample_stride * config.sample_max))
    return config.sample_stride * (times | 1)


def sample_keys(sources: list, criterion: str, eps: float, stride: int) -> torch.Tensor:
    """Signed keys of every ``stride``-th weight of each source (flat index 0, stride, ...),
    scored with keys.score, so bit for bit the keys the passes compute.

    Sources with the same dtypes are sampled together: a few large ops, whatever
    the number of tensors.
    """
    groups: dict[tuple, tuple[list, list]] = {}
    for s in sources:
        if s.numel == 0:
            continue
        g = s.grad if s.grad is not None else s.param  # criteria without a gradient ignore it
        thetas, grads = groups.setdefault((s.param.dtype, g.dtype), ([], []))
        thetas.append(_every(s.param, stride))
        grads.append(_every(g, stride))
    out = [keys.signed_key(keys.score(criterion, torch.cat(t), torch.cat(g), eps)) for t, g in groups.values()]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int32)


def _every(t: torch.Tensor, stride: int) -> torch.Tensor:
    """t.reshape(-1)[::stride] without copying t when no flat view exists."""
    try:
        return t.detach().view(-1)[::stride]
    except RuntimeError:  # e.g. a transposed matrix
        return take(t, torch.arange(0, t.numel(), stride, device=t.device))


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t.reshape(-1)[idx] without copying t when no flat view exists."""
    try:
        return t.detach().view(-1)[idx]
    except RuntimeError:  # e.g. a transposed matrix: gather the indexed weights only
        return t.detach()[torch.unravel_index(idx, t.shape)]


def window(sample: torch.Tensor, k: int, n: int, config: Config) -> tuple[int, int]:
    """Signed keys (lo, hi), lo <= hi, such that the k-th largest of n keys very likely
    lies in [lo, hi], from a sample of them.

    The number of sample keys above the k-th largest is binomial(m, k/n), so its
    sample rank is k*m/n give or take sqrt(m p (1-p)).
    """
    m = sample.numel()
    p = k / n
    rank = p * m
    margin = config.margin_sigmas * math.sqrt(m * p * (1 - p)) + config.margin_min
    r_hi, r_lo = math.floor(rank - margin), math.ceil(rank + margin)
    if m == 0:
        return _INT32_MIN, _INT32_MAX
    top = torch.topk(sample, min(m, max(r_lo, 0) + 1)).values.cpu()
    # Past the sample's top the window opens to every larger key (few of them: k is
    # small). Past its bottom it stops at the sample's smallest key, so that ties
    # there (all weights equal, exact zeros) are counted as == lo, not as candidates.
    hi = int(top[r_hi]) if r_hi >= 0 else _INT32_MAX
    lo = int(top[min(r_lo, m - 1)])
    return lo, hi


def select_window(
    sources: list,
    k: int,
    criterion: str,
    eps: float,
    prims: Primitives,
    fallback: Callable[[], tuple[list[torch.Tensor], int]],
    config: Config = DEFAULT,
    trace: list | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Exactly k weights with the largest keys over ``sources`` (k > 0), ties by position.

    Same output as reference.topk_keys: sorted int64 flat indices per source and the
    threshold order key. Reads theta and grad twice through ``prims`` (one count, one
    emission pass; one host sync in between) when the sampled window holds the k-th
    key; otherwise returns ``fallback()``. The Plan is appended to ``trace`` if given.
    Raises ValueError on a NaN or Inf score.
    """
    n = sum(s.numel for s in sources)
    lo, hi = window(sample_keys(sources, criterion, eps, stride(n, config)).to(prims.device), k, n, config)
    plan = Plan(lo, hi)
    if trace is not None:
        trace.append(plan)
    counts = prims.count(lo, hi)
    plan.above, plan.window, plan.equal, bad = counts.sum(0, dtype=torch.int64).tolist()  # the one sync
    if bad:
        keys.raise_nonfinite(sources, criterion, eps)
        raise ValueError(f"a {criterion} score is NaN or Inf")  # the kernel saw one the reference did not
    if plan.above < k <= plan.above + plan.window:
        plan.mode = "collect" if plan.window <= config.window_cap else "overflow"
    elif plan.above + plan.window < k <= plan.above + plan.window + plan.equal:
        plan.mode = "ties"
    else:
        plan.mode = "miss"
    if plan.mode in ("miss", "overflow"):
        return fallback()

    if plan.mode == "ties":  # everything > lo, then the first ties == lo by position
        quota = tie_quota(counts[:, 2].to(torch.int64), k - plan.above - plan.window)
        out = _buffer(k, torch.int64, prims.device)
        prims.emit(lo, lo, out, _starts(counts[:, 0] + counts[:, 1] + quota), quota.to(torch.int32), None, None, None)
        chosen, threshold = out, lo
    else:  # everything > hi, then the best of the window's candidates
        out = _buffer(plan.above, torch.int64, prims.device)
        cand_key = _buffer(plan.window, torch.int32, prims.device)
        cand_pos = _buffer(plan.window, torch.int64, prims.device)
        prims.emit(lo, hi, out, _starts(counts[:, 0]), None, cand_key, cand_pos, _starts(counts[:, 1]))
        del counts
        best, threshold = resolve_candidates(cand_key, cand_pos, k - plan.above)
        chosen = merge(out, torch.sort(best).values)
    return split(chosen, sources), threshold + keys.SIGN


def _buffer(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialized tensor of n elements whose storage is never empty, so that a
    kernel always gets a valid pointer."""
    return torch.empty(max(n, 1), dtype=dtype, device=device)[:n]


def _starts(sizes: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums in int64: where each block's run starts."""
    return torch.cumsum(sizes, 0, dtype=torch.int64).sub_(sizes)


def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two ascending, disjoint index tensors without sorting (fastest when b is the shorter).

    b's slots come from searching b in a (len(b) searches); a fills the other slots in
    order. Searching the long a in b instead took 312 of 567 ms of a CPU selection at
    rho = 10% (2e7 weights).
    """
    if not b.numel() or not a.numel():
        return a if b.numel() == 0 else b
    out = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    slots = torch.arange(b.numel(), device=b.device) + torch.searchsorted(a, b)
    taken = torch.zeros(out.numel(), dtype=torch.bool, device=out.device)
    taken[slots] = True
    out[slots] = b
    return out.masked_scatter_(~taken, a)


def bases(sources: list) -> list[int]:
    """Each source's first global position, and the total: the window plan numbers the
    weights of ``sources`` consecutively, in order (Python ints: no overflow)."""
    out = [0]
    for s in sources:
        out.append(out[-1] + s.numel)
    return out


def split(positions: torch.Tensor, sources: list) -> list[torch.Tensor]:
    """Ascending global positions -> each source's ascending local flat indices, on its
    device: views of ``positions``, shifted in place (no second copy of k indices)."""
    first = bases(sources)
    cuts = torch.searchsorted(positions, torch.tensor(first, device=positions.device)).tolist()
    return [positions[a:b].sub_(base).to(s.param.device) for s, base, a, b in zip(sources, first, cuts, cuts[1:])]
