"""Shared test helpers: small models with given weights and gradients, readable ids."""

from __future__ import annotations

import torch
from torch import nn

from gallop_kernels import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# 0, 1, primes, around a power of two, and above one reference chunk in tests that shrink it
SIZES = [0, 1, 7, 97, 1024, 1025, 4099]


class Bag(nn.Module):
    """A module whose parameters are exactly the given tensors, in order."""

    def __init__(self, tensors: list[torch.Tensor], names: list[str] | None = None):
        super().__init__()
        names = names or [f"w{i}" for i in range(len(tensors))]
        self.names = names
        for n, t in zip(names, tensors):
            self.register_parameter(n, nn.Parameter(t))


def make_bag(sizes, dtype=torch.float32, gen=None, shapes=None) -> Bag:
    """Random weights and gradients (stored in .grad) for parameters of the given sizes."""
    gen = gen or torch.Generator().manual_seed(1234)
    tensors = []
    for i, n in enumerate(sizes):
        shape = shapes[i] if shapes else (n,)
        tensors.append(torch.randn(shape, generator=gen).to(dtype))
    bag = Bag(tensors)
    for p in bag.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    return bag


def sources_of(model: nn.Module, grads=None) -> list[reference.Source]:
    """The reference Sources select_mask builds for ``model`` (trainable params)."""
    out, off = [], 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad if grads is None else grads.get(n)
            out.append(reference.Source(n, p.detach(), None if g is None else g.detach(), off))
            off += p.numel()
    return out


def oracle_selection(model, rho, criterion="gallop", scope="global", eps=1e-8, seed=0, grads=None):
    """Selection by a float64 full sort: name -> sorted indices, and thresholds."""
    srcs = sources_of(model, grads)
    if scope == "global":
        k = reference.num_to_select(rho, sum(s.numel for s in srcs))
        idx, thr = reference.topk_by_sort(srcs, k, criterion, eps, seed)
        return {s.name: i for s, i in zip(srcs, idx)}, thr
    out, thr = {}, {}
    for s in srcs:
        (out[s.name],), thr[s.name] = reference.topk_by_sort(
            [s], reference.num_to_select(rho, s.numel), criterion, eps, seed
        )
    return out, thr
