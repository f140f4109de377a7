"""Shared test helpers: small models with given weights and gradients, readable ids."""

from __future__ import annotations

import torch
from torch import nn

from gallop_kernels import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# 0, 1, primes, around a power of two, and above one reference chunk in tests that shrink it
SIZES = [0, 1, 7, 97, 1024, 1025, 4099]


# Measured on the host build (100 steps, every case of test_ulp_budget_against_torch_adamw): the
# states are bit-equal and the weights within ulp(theta) + 2 ulp(update) of torch's, the
# difference coming from ATen's AVX2 sqrt (up to 1 ulp off correct rounding).
UPDATE_ULPS = 2


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of float32 at |t|, in float64."""
    t = t.abs().float()
    return (torch.nextafter(t, torch.tensor(float("inf"))) - t).double()


def ulp_excess(got: torch.Tensor, want: torch.Tensor, before: torch.Tensor, lr_wd: float) -> float:
    """How far the weights ``got`` are from torch's ``want`` after one AdamW step from ``before``,
    beyond ulp(want), in ulps of the update; inf where either holds a NaN or Inf."""
    got, want = got.double(), want.double()
    update = (want - before.double() * (1 - lr_wd)).float()
    excess = ((got - want).abs() - _ulp(want.float())).clamp(min=0) / _ulp(update)
    bad = ~(torch.isfinite(got) & torch.isfinite(want))
    return float(excess.masked_fill(bad, float("inf")).max()) if excess.numel() else 0.0


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


def bag_of(thetas: list[torch.Tensor], grads: list[torch.Tensor]) -> Bag:
    """A Bag of copies of ``thetas`` with copies of ``grads`` in .grad."""
    bag = Bag([t.clone() for t in thetas])
    for p, g in zip(bag.parameters(), grads):
        p.grad = g.clone()
    return bag


ADVERSARIAL = ["zero_grads", "ties", "all_equal", "zeros_30pct", "signed_zeros", "denormals", "huge", "near_max"]


def adversarial_bag(kind: str, dtype: torch.dtype, sizes: list[int]) -> Bag:
    """Weights and gradients of the given sizes that stress a selection (one of ADVERSARIAL)."""
    gen = torch.Generator().manual_seed(7)
    thetas = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    if kind == "zero_grads":
        grads = [torch.zeros(n) for n in sizes]
    elif kind == "ties":  # values from a tiny set: the boundary holds thousands of equal keys
        thetas = [torch.randint(-2, 3, (n,), generator=gen).float() for n in sizes]
        grads = [torch.randint(0, 3, (n,), generator=gen).float() for n in sizes]
    elif kind == "all_equal":
        thetas = [torch.full((n,), 0.5) for n in sizes]
        grads = [torch.full((n,), -0.25) for n in sizes]
    elif kind == "zeros_30pct":  # 30% exact zeros in both, at random places
        thetas = [t * (torch.rand(n, generator=gen) >= 0.3) for t, n in zip(thetas, sizes)]
        grads = [g * (torch.rand(n, generator=gen) >= 0.3) for g, n in zip(grads, sizes)]
    elif kind == "signed_zeros":  # +0.0 and -0.0 must give one key
        thetas = [torch.where(torch.rand(n, generator=gen) < 0.5, 0.0, -0.0) for n in sizes]
        grads = [torch.where(torch.rand(n, generator=gen) < 0.5, 0.0, -0.0) for n in sizes]
    elif kind == "denormals":
        tiny = torch.finfo(dtype).tiny
        thetas = [t * tiny * 0.25 for t in thetas]
        grads = [g * tiny * 0.125 for g in grads]
    elif kind == "huge":  # a few values near the dtype's largest, the gallop score still finite
        top = 3e38 if dtype != torch.float16 else 6e4
        grads[1][5], thetas[1][5], thetas[-1][7] = top, 2.0, top
    elif kind == "near_max":  # every value within 2**-1 of the dtype's largest finite value / 2
        big = torch.finfo(dtype).max / 8
        thetas = [t.clamp(-4, 4) * big for t in thetas]
        grads = [g.clamp(-4, 4) * big for g in grads]
    else:
        raise ValueError(f"unknown adversarial kind {kind!r}")
    return bag_of([t.to(dtype) for t in thetas], [g.to(dtype) for g in grads])

