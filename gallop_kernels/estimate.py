"""estimate_gradients: the mean task-loss gradient over a few batches, the g that GaLLoP scores.

Step 1 of GaLLoP (arXiv 2510.19778): g is the mean gradient of the loss over a small share
of the training data; ``select_mask`` then scores |g| / (|theta| + eps).
"""

from __future__ import annotations

from collections.abc import Iterable

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


def estimate_gradients(model: torch.nn.Module, batches: Iterable[dict], *, accum_dtype: torch.dtype | None = None,
                       progress: bool = False, desc: str = "gradient") -> dict[str, torch.Tensor]:
    """The mean loss gradient over ``batches`` (each a dict of model inputs with labels): name -> tensor.

    Micro-batch gradients accumulate where backward puts them, in each
    parameter's ``.grad`` (the weight's dtype): no copy of the model's size
    besides them. ``accum_dtype=torch.float32`` sums into float32 buffers
    instead, so bf16 weights lose no precision over many batches, at 4 bytes
    a weight. Every batch counts equally. The returned tensors are the
    accumulated gradients themselves; ``.grad`` is None afterwards.
    """
    device = model_device(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wide = {n: torch.zeros_like(p, dtype=accum_dtype) for n, p in params.items()
            if accum_dtype is not None and p.dtype != accum_dtype}
    model.zero_grad(set_to_none=True)
    count = 0
    for batch in _bar(batches, progress, desc):
        model(**to_device(batch, device)).loss.backward()
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
