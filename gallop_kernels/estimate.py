"""estimate_gradients: the mean task-loss gradient over a few batches, the g that GaLLoP scores.

Step 1 of GaLLoP (arXiv 2510.19778): g is the mean gradient of the loss over a small share
of the training data; ``select_mask`` then scores |g| / (|theta| + eps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


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
                       progress: bool = False, desc: str = "gradient") -> dict[str, torch.Tensor]:
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

    Autocast: enter it inside ``loss`` around the forward (backward then runs
    outside it, as torch recommends), or call this function inside an autocast
    block. Gradient checkpointing works as the model is set up: Hugging Face
    models recompute activations only in train mode (``model.train()``).
    """
    device = model_device(model)
    compute = loss or (lambda batch: model(**to_device(batch, device)).loss)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wide = {n: torch.zeros_like(p, dtype=accum_dtype) for n, p in params.items()
            if accum_dtype is not None and p.dtype != accum_dtype}
    model.zero_grad(set_to_none=True)
    count = 0
    for batch in _bar(batches, progress, desc):
        compute(batch).backward()
        for n, buf in wide.items():
            if params[n].grad is not None:
                buf += params[n].grad
                params[n].grad = None
        count += 1
    if count == 0:
        raise ValueError("estimate_gradients needs at least one batch")
    grads = {}
    for n, p in params.items():
        g = wide[n] if n in wide else p.grad
        p.grad = None
        grads[n] = torch.zeros_like(p, dtype=accum_dtype or p.dtype) if g is None else g.div_(count)
    return grads
