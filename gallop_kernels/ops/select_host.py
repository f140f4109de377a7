"""Host (CPU) selection backend: the window plan's count and emission passes in C++.

Same contract and output as :func:`gallop_kernels.reference.topk_keys` (one process,
CPU tensors). The plan is gallop_kernels.radix.select_window; this module gives it
:class:`HostPrimitives`, two fused passes of csrc/select_host.cpp over theta and grad
(load in the tensor's dtype, float32 score exactly as ``keys.score`` computes
it, signed order key, compare, count or write; no score tensor), threaded over
blocks of ``block`` consecutive weights of one source:

- ``count``: per block, how many keys are > hi, in (lo, hi], == lo and non-finite;
- ``emit``: per block, at the offsets the plan computed from the counts, the
  positions above the window (and, in ties mode, the first quota[b] keys == lo) in
  ascending order, and the window's candidates (key, position).

Each block writes only its own row or ranges, so the result does not depend on the
number of threads. A window miss falls back to the reference's histogram plan.
"""

from __future__ import annotations

import contextlib

import torch

from .. import keys, radix, reference
from .._ext import require_ext

# Weights per block: 32-96 KiB of theta and grad, so the per-block bookkeeping
# (a counts row, two offsets) is noise, and a few thousand blocks balance threads.
BLOCK = 1 << 14
_DTYPE_CODE = {torch.float32: "DTYPE_FLOAT32", torch.bfloat16: "DTYPE_BFLOAT16", torch.float16: "DTYPE_FLOAT16"}
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


class HostPrimitives:
    """radix.Primitives on the compiled host passes, for CPU ``sources``.

    Builds the source table once (pointers, dtypes, strides, sizes, global bases
    and first blocks; one 1-D view per tensor, copied only when none exists);
    ``count`` and ``emit`` then each make one call into the extension. Runs on
    ``num_threads`` threads (default: torch.get_num_threads()).
    """

    def __init__(self, sources: list[keys.Source], criterion: str, eps: float, *, block: int = BLOCK,
                 num_threads: int | None = None):
        self._C = require_ext("the host selection backend")
        if criterion not in radix.READS:
            raise ValueError(f"criterion {criterion!r} has no host kernel; expected one of {tuple(radix.READS)}")
        if not 1 <= block <= 1 << 30:  # the passes count a block in int32
            raise ValueError(f"block must be in [1, 2**30], got {block}")
        reads_theta, reads_grad = radix.READS[criterion]
        self.device = torch.device("cpu")
        self.block = block
        self.num_threads = num_threads or torch.get_num_threads()
        self._criterion = getattr(self._C, f"CRITERION_{criterion.upper()}")
        self._eps = float(eps)
        self._views = []  # the table holds raw addresses: keep copies alive
        self.table = torch.empty(max(1, len(sources)) * self._C.SELECT_SOURCE_ROW_BYTES, dtype=torch.uint8)
        blocks = 0
        for i, (s, base) in enumerate(zip(sources, radix.bases(sources))):
            _check_source(s, reads_theta, reads_grad)
            t, ts = radix.flat(s.param) if reads_theta else (None, 1)
            g, gs = radix.flat(s.grad) if reads_grad else (None, 1)
            self._views += [t, g]
            self._C.select_fill_source(
                self.table.data_ptr(), i, _address(t), _address(g), ts, gs, s.numel, base, blocks,
                self._dtype_code(t), self._dtype_code(g),
            )  # fmt: skip
            blocks += -(-s.numel // block)
        self.num_sources = len(sources)
        self.num_blocks = blocks

    def _dtype_code(self, t: torch.Tensor | None) -> int:
        return getattr(self._C, _DTYPE_CODE[torch.float32 if t is None else t.dtype])

    def _args(self, lo: int, hi: int) -> tuple:
        if not (_INT32_MIN <= lo <= hi <= _INT32_MAX):
            raise ValueError(f"the window must be int32 signed keys with lo <= hi, got lo={lo}, hi={hi}")
        return (self.table.data_ptr(), self.num_sources, self.num_blocks, self.block, self._criterion, self._eps, lo, hi)

    def count(self, lo: int, hi: int) -> torch.Tensor:
        """See radix.Primitives.count: (num_blocks, 4) int32 counts of keys > hi,
        in (lo, hi], == lo, and of NaN/Inf scores."""
        args = self._args(lo, hi)
        counts = torch.empty(self.num_blocks, self._C.SELECT_COUNT_COLUMNS, dtype=torch.int32)
        self._C.select_count_host(*args, counts.data_ptr(), self.num_threads)
        return counts

    def emit(self, lo, hi, out, out_dst, quota, cand_key, cand_pos, cand_dst) -> None:
        """See radix.Primitives.emit. The caller's offsets must leave each block room
        for what it writes (exclusive prefix sums of count's columns do)."""
        args = self._args(lo, hi)
        self._check_buffer("out", out, torch.int64)
        self._check_buffer("out_dst", out_dst, torch.int64, self.num_blocks)
        if quota is not None:
            self._check_buffer("quota", quota, torch.int32, self.num_blocks)
        if cand_key is not None:
            self._check_buffer("cand_key", cand_key, torch.int32)
            self._check_buffer("cand_pos", cand_pos, torch.int64, cand_key.numel())
            self._check_buffer("cand_dst", cand_dst, torch.int64, self.num_blocks)
        self._C.select_emit_host(
            *args, out_dst.data_ptr(), _address(quota), _address(out),
            _address(cand_key), _address(cand_pos if cand_key is not None else None),
            _address(cand_dst if cand_key is not None else None), self.num_threads,
        )  # fmt: skip

    @staticmethod
    def _check_buffer(name: str, t: torch.Tensor, dtype: torch.dtype, numel: int | None = None) -> None:
        if t is None or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or t.dim() != 1:
            raise ValueError(f"{name} must be a contiguous 1-D {dtype} CPU tensor")
        if numel is not None and t.numel() != numel:
            raise ValueError(f"{name} must have {numel} entries, got {t.numel()}")


def _address(t: torch.Tensor | None) -> int:
    """data_ptr() of ``t``, 0 for None (null in C++)."""
    return 0 if t is None else t.data_ptr()


def _check_source(s: keys.Source, reads_theta: bool, reads_grad: bool) -> None:
    for what, t, needed in (("parameter", s.param, reads_theta), ("gradient", s.grad, reads_grad)):
        if not needed:
            continue
        if t is None:
            raise ValueError(f"parameter {s.name!r} has no gradient")
        if t.device.type != "cpu":
            raise ValueError(f"parameter {s.name!r}: the host selection needs CPU tensors, the {what} is on {t.device}")
        if t.dtype not in radix.STREAM_DTYPES:
            raise ValueError(f"parameter {s.name!r}: {what} dtype {t.dtype} has no host kernel; expected one of {radix.STREAM_DTYPES}")
        if t.numel() != s.numel:
            raise ValueError(f"parameter {s.name!r}: {what} has {t.numel()} elements, the parameter {s.numel}")


def topk_keys_host(
    sources: list[keys.Source],
    k: int,
    criterion: str,
    eps: float = 1e-8,
    seed: int = 0,
    *,
    config: radix.Config = radix.DEFAULT,
    trace: list | None = None,
    block: int = BLOCK,
    num_threads: int | None = None,
) -> tuple[list[torch.Tensor], int | None]:
    """Exactly k weights with the largest keys over ``sources``, ties by position.

    Same contract and output as :func:`gallop_kernels.reference.topk_keys` (one
    process, CPU tensors): sorted int64 flat indices per source and the threshold
    order key (None when k == 0). theta and grad may be fp32, bf16 or fp16, each in
    its own dtype (random and float64 run on the reference). Raises ValueError on a
    NaN or Inf score. Reads theta and grad twice when the sampled window holds the
    k-th key, else falls back to the reference's histogram plan. ``trace``: a list
    that receives the radix.Plan.
    """
    if not radix.streams(sources, criterion):
        return reference.topk_keys(sources, k, criterion, eps, seed, config=config)
    prims = HostPrimitives(sources, criterion, eps, block=block, num_threads=num_threads)
    if k == 0:
        return [torch.empty(0, dtype=torch.int64) for _ in sources], None
    fallback = lambda: reference.topk_keys(sources, k, criterion, eps, seed, config=config)  # noqa: E731
    with _one_torch_thread():  # the passes keep prims.num_threads
        return radix.select_window(sources, k, criterion, eps, prims, fallback, config, trace)


@contextlib.contextmanager
def _one_torch_thread():
    """Run the plan's torch ops (and a fallback) on one thread: they touch the sample,
    the candidates and the k outputs, a small part of the weights, and on a busy
    machine each op's thread fork/join costs more than the op (measured on a busy
    2-core VM: 2 threads made a 2e7-weight call 5-8x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
