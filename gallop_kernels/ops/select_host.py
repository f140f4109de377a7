"""Host (CPU) backend of the window select: the compiled primitives and their driver.

Same contract and output as :func:`gallop_kernels.reference.topk_keys`. Two fused
passes over theta and grad in csrc/select_host.cpp (load, float32 score exactly as
``reference.score`` computes it, signed order key, compare), threaded over blocks of
``block`` consecutive weights of one source:

- :meth:`HostSources.count`: per block, the keys above a window [lo, hi], inside
  (lo, hi], equal to lo, and the NaN/Inf scores;
- :meth:`HostSources.emit`: per block, at offsets the caller computes from the
  counts, the positions above the window and the window's candidates (collect mode),
  or the positions above lo and the first ``quota`` keys equal to lo (ties mode).

The window comes from a strided sample of the scores (:func:`sample_window`); a
window that misses the k-th key, or holds more than ``candidate_cap`` candidates,
falls back to the exact histogram path of the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import reference
from .._ext import require_ext

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1 << 14  # weights per block: one row of counts per 64-128 KiB of bf16 theta and grad
ABOVE, INSIDE, EQUAL, NONFINITE = range(4)  # columns of count(); csrc/gallop/select.h CountColumn
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
_READS = {"gallop": (True, True), "saft": (False, True), "magnitude": (True, False), "pafi": (True, False)}
_DTYPE_CODE = {torch.float32: "DTYPE_FLOAT32", torch.bfloat16: "DTYPE_BFLOAT16", torch.float16: "DTYPE_FLOAT16"}


@dataclass(frozen=True)
class WindowConfig:
    """Tuning of the sampled window (not part of the contract: any value is exact).

    sample_every: at most one weight in this many is scored to place the window
    (an odd stride, so rows of power-of-two length are not sampled column-aligned);
    min_sample: the sample is at least this large (or every weight); sigmas: the
    window's half-width in standard deviations of the sample rank; candidate_cap:
    a window holding more candidates than this falls back to the histogram path.
    """

    sample_every: int = 256
    min_sample: int = 1 << 16
    sigmas: float = 5.0
    candidate_cap: int = 1 << 21


def supports(sources: list[reference.Source], criterion: str) -> bool:
    """True when the compiled passes can score ``sources`` by ``criterion`` (the
    rest, random and float64 weights, stays on the reference)."""
    if criterion not in _READS:
        return False
    return all(t is None or t.dtype in KERNEL_DTYPES for s in sources for t in (s.param, s.grad))


def _flat(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A 1-D view of ``t`` in flat-index order and its stride; copies only when no
    such view exists (e.g. a transposed matrix)."""
    f = t.detach().reshape(-1)
    return f, (f.stride(0) if f.numel() else 1)


class HostSources:
    """The source table of one selection on the CPU, built once and read by both passes.

    ``sources`` are reference.Sources on the CPU (param, grad as the criterion
    needs them, fp32/bf16/fp16, any strides); block b of the table is weights
    [i0, i0 + block) of one source, blocks numbered source after source.
    """

    def __init__(self, sources: list[reference.Source], criterion: str, eps: float, *, block: int = BLOCK,
                 num_threads: int | None = None):
        self._C = require_ext("the host selection backend")
        if criterion not in _READS:
            raise ValueError(f"criterion {criterion!r} has no host kernel; expected one of {tuple(_READS)}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        reads_theta, reads_grad = _READS[criterion]
        self.criterion, self.eps, self.block = criterion, float(eps), block
        self.num_threads = num_threads or torch.get_num_threads()
        self.views: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        self.bases = [s.offset for s in sources]
        self.numels = [s.numel for s in sources]
        self.first_block = []
        nb = 0
        for s in sources:
            _check_source(s, reads_theta, reads_grad)
            self.views.append((_flat(s.param) if reads_theta else None, _flat(s.grad) if reads_grad else None))
            self.first_block.append(nb)
            nb += -(-s.numel // block)
        self.num_blocks = nb
        if any(b < a for a, b in zip(self.bases, self.bases[1:])):
            raise ValueError("source offsets must not decrease: ties go to the lower global position")
        self.table = torch.empty(max(1, len(sources)) * self._C.SELECT_SOURCE_ROW_BYTES, dtype=torch.uint8)
        for i, ((t, g), s) in enumerate(zip(self.views, sources)):
            (tv, ts), (gv, gs) = t or (None, 1), g or (None, 1)
            self._C.select_fill_source(
                self.table.data_ptr(), i,
                0 if tv is None else tv.data_ptr(), 0 if gv is None else gv.data_ptr(),
                ts, gs, s.numel, s.offset, self.first_block[i],
                self._dtype_code(tv), self._dtype_code(gv),
            )  # fmt: skip

    def _dtype_code(self, t: torch.Tensor | None) -> int:
        return getattr(self._C, _DTYPE_CODE[torch.float32 if t is None else t.dtype])

    def _args(self, lo: int, hi: int) -> tuple:
        code = getattr(self._C, f"CRITERION_{self.criterion.upper()}")
        return (self.table.data_ptr(), len(self.views), self.num_blocks, self.block, code, self.eps, lo, hi)

    def count(self, lo: int, hi: int) -> torch.Tensor:
        """Pass 1: (num_blocks, 4) int64, per block the number of signed keys > hi,
        in (lo, hi], == lo, and of NaN/Inf scores (columns ABOVE, INSIDE, EQUAL, NONFINITE)."""
        _check_window(lo, hi)
        counts = torch.empty(self.num_blocks, self._C.SELECT_COUNT_COLUMNS, dtype=torch.int64)
        self._C.select_count_host(*self._args(lo, hi), counts.data_ptr(), self.num_threads)
        return counts

    def emit(
        self,
        lo: int,
        hi: int,
        selected_at: torch.Tensor,
        cand_at: torch.Tensor,
        num_selected: int,
        num_cand: int,
        quota: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Pass 2: (selected, cand_key, cand_pos), int64 global positions / int32 keys.

        Collect mode (``quota`` None): block b writes its positions with key > hi at
        selected[selected_at[b]:] and its keys in (lo, hi] with their positions at
        cand_key / cand_pos[cand_at[b]:]. Ties mode: block b writes its positions
        with key > lo at selected[selected_at[b]:] and its first quota[b] positions
        with key == lo at cand_pos[cand_at[b]:]; cand_key is None. Within a block,
        positions ascend. The offsets must leave room for what the block writes
        (exclusive prefix sums of count()'s columns do).
        """
        _check_window(lo, hi)
        for name, t in (("selected_at", selected_at), ("cand_at", cand_at), ("quota", quota)):
            if t is not None and (t.dtype != torch.int64 or t.shape != (self.num_blocks,) or not t.is_contiguous()):
                raise ValueError(f"{name} must be a contiguous int64 tensor of num_blocks={self.num_blocks} entries")
        ties = quota is not None
        selected = torch.empty(num_selected, dtype=torch.int64)
        cand_key = None if ties else torch.empty(num_cand, dtype=torch.int32)
        cand_pos = torch.empty(num_cand, dtype=torch.int64)
        self._C.select_emit_host(
            *self._args(lo, hi), ties, selected_at.data_ptr(), cand_at.data_ptr(),
            quota.data_ptr() if ties else 0, selected.data_ptr(),
            0 if cand_key is None else cand_key.data_ptr(), cand_pos.data_ptr(), self.num_threads,
        )  # fmt: skip
        return selected, cand_key, cand_pos

    def split(self, positions: torch.Tensor, per_block: torch.Tensor) -> list[torch.Tensor]:
        """Cut ``positions`` written block by block (``per_block`` of them per block)
        into one tensor of local flat indices per source."""
        ends = torch.cat([per_block.new_zeros(1), per_block.cumsum(0)])
        cuts = ends[torch.tensor(self.first_block + [self.num_blocks], dtype=torch.int64)].tolist()
        return [positions[a:b] - base for a, b, base in zip(cuts, cuts[1:], self.bases)]

    def locate(self, positions: torch.Tensor) -> list[torch.Tensor]:
        """Local flat indices of ascending global ``positions``, per source."""
        bases = torch.tensor(self.bases, dtype=torch.int64)
        lo = torch.searchsorted(positions, bases).tolist()
        hi = torch.searchsorted(positions, bases + torch.tensor(self.numels, dtype=torch.int64)).tolist()
        return [positions[a:b] - base for a, b, base in zip(lo, hi, self.bases)]

    def sample_keys(self, step: int) -> torch.Tensor:
        """Signed keys of every ``step``-th weight of every source (int32)."""
        keys = []
        for t, g in self.views:
            theta = None if t is None else t[0][::step]
            grad = None if g is None else g[0][::step]
            keys.append(reference._signed_key(reference.score(self.criterion, theta, grad, self.eps)))
        return torch.cat(keys) if keys else torch.empty(0, dtype=torch.int32)


def _check_source(s: reference.Source, reads_theta: bool, reads_grad: bool) -> None:
    for what, t, needed in (("parameter", s.param, reads_theta), ("gradient", s.grad, reads_grad)):
        if not needed:
            continue
        if t is None:
            raise ValueError(f"parameter {s.name!r} has no gradient")
        if t.device.type != "cpu":
            raise ValueError(f"parameter {s.name!r}: the host selection needs CPU tensors, the {what} is on {t.device}")
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"parameter {s.name!r}: {what} dtype {t.dtype} has no host kernel; expected one of {KERNEL_DTYPES}")
        if t.numel() != s.numel:
            raise ValueError(f"parameter {s.name!r}: {what} has {t.numel()} elements, the parameter {s.numel}")


def _check_window(lo: int, hi: int) -> None:
    if not (INT32_MIN <= lo <= hi <= INT32_MAX):
        raise ValueError(f"the window must be int32 signed keys with lo <= hi, got lo={lo}, hi={hi}")


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------


def sample_window(keys: torch.Tensor, k: int, n: int, sigmas: float) -> tuple[int, int]:
    """[lo, hi] of signed keys that holds the k-th largest of n keys with high
    probability, from ``keys``, a uniform sample of them.

    The number of sample keys above the k-th largest key is binomial(m, k / n):
    the window spans ``sigmas`` standard deviations of it on either side.
    """
    m = keys.numel()
    if m == 0:
        return INT32_MIN, INT32_MAX
    r = k * m / n  # expected sample rank (1 = largest) of the k-th largest key
    half = sigmas * math.sqrt(r * max(0.0, 1.0 - r / m)) + 2.0
    first, last = math.floor(r - half), math.ceil(r + half)  # sample ranks of hi and lo
    top = torch.topk(keys, min(m, max(last, 1))).values  # descending
    hi = int(top[first - 1]) if first >= 1 else INT32_MAX
    lo = int(top[last - 1]) if last <= m else INT32_MIN
    return lo, hi


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge ascending, disjoint index tensors ``a`` (large) and ``b`` (small)."""
    if not b.numel():
        return a
    at = torch.searchsorted(a, b)  # b[j] goes before a[at[j]]
    out = torch.empty(a.numel() + b.numel(), dtype=a.dtype)
    b_slot = at + torch.arange(b.numel())
    keep = torch.ones(out.numel(), dtype=torch.bool)
    keep[b_slot] = False
    out[keep] = a
    out[b_slot] = b
    return out


def topk_keys_host(
    sources: list[reference.Source],
    k: int,
    criterion: str,
    eps: float = 1e-8,
    seed: int = 0,
    *,
    block: int = BLOCK,
    num_threads: int | None = None,
    config: WindowConfig = WindowConfig(),
) -> tuple[list[torch.Tensor], int | None]:
    """Exactly k weights with the largest keys over ``sources``, ties by position.

    Same contract and output as :func:`gallop_kernels.reference.topk_keys`
    (single process, CPU tensors): sorted int64 flat indices per source and the
    threshold order key (None when k == 0). Raises ValueError on a NaN or Inf
    score. Reads theta and grad twice, plus a 1/``config.sample_every`` sample;
    a missed window costs the reference's passes on top.
    """
    if not supports(sources, criterion):  # random, float64: the reference
        return reference.topk_keys(sources, k, criterion, eps, seed)
    host = HostSources(sources, criterion, eps, block=block, num_threads=num_threads)
    if k == 0:
        return [torch.empty(0, dtype=torch.int64) for _ in sources], None
    n = sum(host.numels)
    step = min(config.sample_every, max(1, n // config.min_sample)) | 1  # about min_sample keys, or 1 in sample_every
    lo, hi = sample_window(host.sample_keys(step), k, n, config.sigmas)
    counts = host.count(lo, hi)
    total = counts.sum(0).tolist()
    if total[NONFINITE]:
        reference.raise_nonfinite(sources, criterion, eps)
        raise ValueError(f"a {criterion} score is NaN or Inf")  # the kernel saw one the reference did not
    above, inside, equal = total[ABOVE], total[INSIDE], total[EQUAL]
    collect = above < k <= above + inside
    ties = above + inside < k <= above + inside + equal
    if not (collect and inside <= config.candidate_cap) and not ties:
        return reference.topk_keys(sources, k, criterion, eps, seed)  # the window missed the k-th key

    def at(col: torch.Tensor) -> torch.Tensor:
        return col.cumsum(0) - col

    if collect:
        per_block = counts[:, ABOVE].contiguous()
        sel, cand_key, cand_pos = host.emit(lo, hi, at(per_block), at(counts[:, INSIDE]), above, inside)
        chosen, threshold = reference.resolve_candidates(cand_key, cand_pos, k - above)
        chosen = torch.sort(chosen).values
    else:
        per_block = (counts[:, ABOVE] + counts[:, INSIDE]).contiguous()
        eq = counts[:, EQUAL]
        quota = (k - above - inside - at(eq)).clamp(min=0).minimum(eq).contiguous()
        sel, _, chosen = host.emit(lo, hi, at(per_block), at(quota), above + inside, k - above - inside, quota)
        threshold = lo  # chosen: block by block, ascending
    out = [_merge(a, b) for a, b in zip(host.split(sel, per_block), host.locate(chosen))]
    return out, threshold + reference._SIGN
