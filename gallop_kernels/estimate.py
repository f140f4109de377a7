"""estimate_gradients: the mean task-loss gradient over a few batches, the g that GaLLoP scores.

Step 1 of GaLLoP (arXiv 2510.19778): g is the mean gradient of the loss over a small share
of the training data; ``select_mask`` then scores |g| / (|theta| + eps).
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from .distributed import local

GRAD_FRACTION = 0.25
"""The default d_s: the share of the training data the mean gradient is estimated on (the ``gallop``
command's share of examples, GallopTrainer's share of the first batches)."""


def _bar(batches: Iterable, progress: bool, desc: str) -> Iterable:
    """``batches`` under a tqdm progress bar when ``progress`` is set (tqdm must be installed)."""
    if not progress:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, leave=False)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where its batches go)."""
    return next(model.parameters()).device


def estimate_gradients(model: torch.nn.Module, batches: Iterable, *,
                       loss: Callable[[object], torch.Tensor] | None = None, accum_dtype: torch.dtype | None = None,
                       offload: bool = False, progress: bool = False,
                       desc: str = "gradient") -> dict[str, torch.Tensor]:
    """The mean loss gradient over ``batches``: name -> tensor, for every parameter that requires grad.

    ``loss(batch)`` returns the scalar loss of one batch; by default each batch is a dict of
    model inputs with labels, moved to the model's device, and the loss is ``model(**batch).loss``.
    Pass your own to reuse a trainer's loss (its ``compute_loss``, device placement, autocast).

    Micro-batch gradients accumulate where backward puts them, in each
    parameter's ``.grad`` (the weight's dtype): no copy of the model's size
    besides them. ``accum_dtype=torch.float32`` sums into float32 buffers
    instead, so bf16 weights lose no precision over many batches, at 4 bytes
    a weight. Every batch counts equally. The returned tensors are the
    accumulated gradients themselves: nothing is left in ``.grad`` (None
    afterwards), so ``select_mask(model, grads)`` takes them from the dict.

    ``offload=True`` keeps no dense gradient on the device: each parameter's
    gradient is moved into a host buffer (pinned on CUDA, copied on a side
    stream and added on a worker thread) as soon as backward produces it, so
    backward holds one parameter's gradient (on CUDA also the previous one
    while its copy finishes). The returned tensors are then on the CPU, with the
    same values as without offload (the same sums in the same dtype and order);
    :func:`gallop_kernels.select_mask` takes them for parameters on any device.
    Under FSDP2 the hooks run after each group's reduce-scatter (FSDP2 calls
    them on the sharded parameters), so a rank holds one group's unsharded
    gradient at a time, not its whole gradient shard; the returned tensors are
    then this rank's shards (plain CPU tensors of the local shapes).

    Autocast: enter it inside ``loss`` around the forward (backward then runs
    outside it, as torch recommends), or call this function inside an autocast
    block. Gradient checkpointing works as the model is set up: Hugging Face
    models recompute activations only in train mode (``model.train()``).
    """
    if not isinstance(offload, bool):
        raise TypeError(f"offload must be True or False, got {offload!r}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    if offload:
        sums = HostSums(params, accum_dtype)
        try:
            count = _run_backward(model, batches, loss, progress, desc, after=sums.flush)
        finally:
            sums.close()
        return sums.mean(count)
    wide = {n: torch.zeros_like(p, dtype=accum_dtype) for n, p in params.items()
            if accum_dtype is not None and p.dtype != accum_dtype}

    def widen():
        for n, buf in wide.items():
            if params[n].grad is not None:
                buf += params[n].grad
                params[n].grad = None

    count = _run_backward(model, batches, loss, progress, desc, after=widen)
    grads = {}
    for n, p in params.items():
        g = wide[n] if n in wide else p.grad
        p.grad = None
        grads[n] = torch.zeros_like(p, dtype=accum_dtype or p.dtype) if g is None else g.div_(count)
    return grads


def _run_backward(model: torch.nn.Module, batches: Iterable, loss: Callable[[object], torch.Tensor] | None,
                  progress: bool, desc: str, after: Callable[[], None]) -> int:
    """One forward and backward per batch (``loss(batch)``, by default the model's loss on the batch moved
    to the model's device), ``after()`` after each; returns the number of batches (at least 1)."""
    device = model_device(model)
    compute = loss or (lambda batch: model(**to_device(batch, device)).loss)
    count = 0
    for batch in _bar(batches, progress, desc):
        compute(batch).backward()
        after()
        count += 1
    if count == 0:
        raise ValueError("estimate_gradients needs at least one batch")
    return count


class HostSums:
    """Sums of each parameter's micro-batch gradients in host memory, fed by post-accumulate-grad hooks
    (an FSDP2 parameter's: its local shard, the hooks called by FSDP2 after each reduce-scatter).

    Each hook takes the gradient out of ``.grad`` (so the device frees it) and
    adds it to its parameter's host buffer, in ``accum_dtype`` or the weight's
    dtype. The sums follow what backward does in ``.grad``: the first gradient
    is copied (a float32 sum starts from zeros, as estimate_gradients' float32
    buffers do), later ones are added in order, so the values match bit for bit.
    """

    def __init__(self, params: dict[str, torch.Tensor], accum_dtype: torch.dtype | None):
        shards = {n: local(p) for n, p in params.items()}  # an FSDP2 rank sums its own shard
        cuda = [p for p in shards.values() if p.is_cuda]
        self._copier = _CudaToHost(cuda) if cuda else None
        pin = self._copier is not None
        self.sums = {n: torch.zeros(p.shape, dtype=accum_dtype or p.dtype, pin_memory=pin) for n, p in shards.items()}
        self._started = {n for n, s in self.sums.items() if s.dtype != params[n].dtype}  # float32 sums add to zeros
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in params.items()]

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            g, p.grad = local(p.grad), None
            if self._copier is None or not g.is_cuda:
                self._add(name, g)
            else:
                self._copier.submit(g, lambda staged: self._add(name, staged))
        return hook

    def _add(self, name: str, g: torch.Tensor) -> None:
        if name in self._started:
            self.sums[name] += g
        else:
            self.sums[name].copy_(g)
            self._started.add(name)

    def flush(self) -> None:
        """Wait until every gradient produced so far is in its sum."""
        if self._copier is not None:
            self._copier.flush()

    def close(self) -> None:
        """Remove the hooks and stop the copier (after a flush)."""
        for h in self._handles:
            h.remove()
        if self._copier is not None:
            self._copier.close()

    def mean(self, count: int) -> dict[str, torch.Tensor]:
        """The sums divided by ``count`` (in place); zeros for a parameter that never got a gradient."""
        return {n: s.div_(count) for n, s in self.sums.items()}


class _CudaToHost:
    """Copies CUDA gradients into pinned staging buffers on a side stream; a worker thread waits for each
    copy and hands the staged tensor on. One staging buffer per dtype, the size of the largest tensor: a
    hook waits until the previous copy of that dtype has been consumed, which bounds what is in flight."""

    def __init__(self, params: list[torch.Tensor]):
        self.device = params[0].device
        self.stream = torch.cuda.Stream(self.device)
        self._slots: dict[torch.dtype, queue.Queue] = {}
        for dtype in {p.dtype for p in params}:
            largest = max(p.numel() for p in params if p.dtype == dtype)
            self._slots[dtype] = queue.Queue(maxsize=1)
            self._slots[dtype].put(torch.empty(largest, dtype=dtype, pin_memory=True))
        self._worker = ThreadPoolExecutor(max_workers=1)  # one thread: the sums are added in backward's order
        self._pending = []

    def submit(self, g: torch.Tensor, consume: Callable[[torch.Tensor], None]) -> None:
        """Copy ``g`` to the host behind the work already queued on the current stream, then ``consume`` it."""
        slot = self._slots[g.dtype]
        buf = slot.get()
        staged = buf[: g.numel()].view(g.shape)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            staged.copy_(g, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        g.record_stream(self.stream)  # the allocator reuses g's memory only once the copy is done

        def work():
            done.synchronize()
            consume(staged)
            slot.put(buf)

        self._pending.append(self._worker.submit(work))

    def flush(self) -> None:
        """Wait for every submitted copy and its consumer; re-raise a consumer's error."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        """Finish the queued work and stop the worker thread."""
        try:
            self.flush()
        finally:
            self._worker.shutdown(wait=True)
