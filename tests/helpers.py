"""Shared test helpers: small models with given weights and gradients, readable ids, and the
SparseAdamW numerical contract (assert_adamw_step)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gallop_kernels as gk
from gallop_kernels import _ext, reference

needs_ext = pytest.mark.skipif(_ext._C is None, reason=f"gallop_kernels._C not importable: {_ext._IMPORT_ERROR}")
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


SELECTION_BACKENDS = ["reference", "host", "triton"]


def usable_backend(backend: str) -> str:
    """``backend`` if it runs here, else skip the test with the reason."""
    why = gk.why_unavailable().get(backend)
    if why:
        pytest.skip(f"backend {backend!r}: {why}")
    return backend


def on_backend_device(model: nn.Module, backend: str) -> nn.Module:
    """``model`` (with its .grad) where ``backend`` runs: Triton on CUDA when there is a GPU
    (on the CPU only through the interpreter), the others on the CPU."""
    return model.to("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


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


def contract_score(criterion: str, theta: torch.Tensor, grad: torch.Tensor | None, eps: float, seed: int = 0,
                   offset: int = 0) -> torch.Tensor:
    """The score README defines, written out here apart from the library's code: float32
    (a correctly rounded division on the CPU), flattened."""
    t = theta.detach().reshape(-1).cpu().float()
    g = None if grad is None else grad.detach().reshape(-1).cpu().float()
    if criterion == "gallop":
        return g.abs() / (t.abs() + eps)
    if criterion == "saft":
        return g.abs()
    if criterion == "magnitude":
        return t.abs()
    if criterion == "pafi":
        return -t.abs()  # -0.0 and +0.0 compare equal in the sort below: they tie
    if criterion == "random":  # the criterion IS this hash of (seed, global position)
        return reference.random_score(torch.arange(t.numel(), dtype=torch.int64) + offset, seed)
    raise ValueError(f"unknown criterion {criterion!r}")


def sort_oracle(scores: list[torch.Tensor], k: int, allowed: list[torch.Tensor] | None = None):
    """The float64 full-sort oracle, independent of reference.py and radix.py: the
    float32 ``scores`` of each tensor widened to float64, one stable descending sort
    over all weights in tensor order then flat-index order (so ties go to the
    earlier tensor, then the lower index), the first k. ``allowed``: per tensor, a
    bool mask of the weights that compete (default all). Returns per tensor its
    sorted int64 indices, and the k-th score (None when k == 0)."""
    allowed = allowed or [torch.ones(s.numel(), dtype=torch.bool) for s in scores]
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)] + [torch.empty(0, dtype=torch.int64)])
    index = torch.cat([torch.arange(s.numel()) for s in scores] + [torch.empty(0, dtype=torch.int64)])
    flat = torch.cat([s.double() for s in scores] + [torch.empty(0, dtype=torch.float64)])
    keep = torch.cat([a.reshape(-1) for a in allowed] + [torch.empty(0, dtype=torch.bool)])
    assert bool(torch.isfinite(flat[keep]).all()), "the oracle takes finite scores only"
    owner, index, flat = owner[keep], index[keep], flat[keep]
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    assert order.numel() == k, f"k={k} but only {flat.numel()} weights compete"
    out = [torch.sort(index[order][owner[order] == i]).values for i in range(len(scores))]
    return out, (float(flat[order[-1]]) if k else None)


def oracle_topk(sources: list[reference.Source], k: int, criterion: str = "gallop", eps: float = 1e-8, seed: int = 0):
    """:func:`sort_oracle` over reference Sources: per source its sorted indices, and the k-th score."""
    return sort_oracle([contract_score(criterion, s.param, s.grad, eps, seed, s.offset) for s in sources], k)


def oracle_selection(model, rho=None, criterion="gallop", scope="global", eps=1e-8, seed=0, grads=None, k=None,
                     allowed=None):
    """select_mask's expected result by :func:`sort_oracle`: name -> sorted indices, and
    the threshold (a name -> float dict for scope="per_tensor"). ``k`` instead of rho;
    ``allowed``: name -> bool mask of the competing weights (default all)."""
    srcs = sources_of(model, grads)
    scores = [contract_score(criterion, s.param, s.grad, eps, seed, s.offset) for s in srcs]
    masks = [torch.ones(s.numel, dtype=torch.bool) if allowed is None else allowed[s.name].reshape(-1).cpu()
             for s in srcs]

    def count(ms):
        return k if k is not None else reference.num_to_select(rho, sum(int(m.sum()) for m in ms))

    if scope == "global":
        idx, thr = sort_oracle(scores, count(masks), masks)
        return {s.name: i for s, i in zip(srcs, idx)}, thr
    out, thr = {}, {}
    for s, sc, m in zip(srcs, scores, masks):
        (out[s.name],), thr[s.name] = sort_oracle([sc], count([m]), [m])
    return out, thr


def bag_of(thetas: list[torch.Tensor], grads: list[torch.Tensor]) -> Bag:
    """A Bag of copies of ``thetas`` with copies of ``grads`` in .grad."""
    bag = Bag([t.clone() for t in thetas])
    for p, g in zip(bag.parameters(), grads):
        p.grad = g.clone()
    return bag


ADVERSARIAL = ["zero_grads", "ties", "all_equal", "zeros_30pct", "signed_zeros", "denormals", "huge", "near_max",
               "flt_max"]
FLT_MAX = torch.finfo(torch.float32).max
# (g, theta) whose gallop score |g| / (|theta| + 1e-8) rounds to FLT_MAX exactly in float32; one ulp
# more g, or one ulp less theta, overflows to +Inf (OVERFLOW_PAIRS). No fp32 pair has a quotient in
# (FLT_MAX, FLT_MAX + ulp/2): the quotient of two 24-bit significands cannot fall there. fp16 scores
# stay far below (65504 / 1e-8).
FLT_MAX_PAIRS = {
    torch.float32: [(FLT_MAX, 1.0), (2.5521175490829424e38, 0.75)],  # exact; rounded down to FLT_MAX
    torch.bfloat16: [(2.8412248409902577e37, 0.08349609375)],  # rounded up to FLT_MAX
}
OVERFLOW_PAIRS = {
    torch.float32: [(FLT_MAX, 1.0 - 2**-24), (3.4028230607370965e38, 0.5)],
    torch.bfloat16: [(2.8412248409902577e37, 0.0830078125), (2.857840190937569e37, 0.08349609375)],
}


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
    elif kind == "flt_max":  # scores of exactly the largest finite float32 (or dtype value), tied across tensors
        top = torch.finfo(dtype).max
        pairs = FLT_MAX_PAIRS.get(dtype, [(top, 1.0)])
        for t, g in ((t, g) for t, g in zip(thetas, grads) if t.numel() > 2 * len(pairs)):
            for i, (gv, tv) in enumerate(pairs):  # gallop: FLT_MAX; saft: |g|
                g[i], t[i], g[-1 - i], t[-1 - i] = gv, tv, -gv, -tv
            t[len(t) // 2] = top  # magnitude: the dtype's largest; pafi: its negative
    else:
        raise ValueError(f"unknown adversarial kind {kind!r}")
    return bag_of([t.to(dtype) for t in thetas], [g.to(dtype) for g in grads])


# README, SparseAdamW: against torch.optim.AdamW(foreach=False), exp_avg, exp_avg_sq and max_exp_avg_sq
# are bit-equal and the weights within ulp(theta) + 4 ulp(update) per step. Why 4: the one op that
# differs is sqrt (ATen's vectorized sqrt is up to 1 ulp off correct rounding; the kernel's is
# correctly rounded), and each of the three separately rounded ops after it (/ bias_correction2_sqrt,
# + eps, the addcdiv's division) can round the two apart by one more ulp; the final add rounds in
# ulp(theta). Measured (host build, the 4 configs of test_host_build_equals_reference x 12 seeds x
# 100 steps, 5M entry-steps): 1 entry needed 4, 17 needed 3, the rest at most 2.
UPDATE_ULPS = 4
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def ulp(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Spacing of ``dtype`` at |t| (the gap to the next larger magnitude), in float64."""
    a = t.detach().abs().to(dtype)
    return ((a.view(_BITS[dtype]) + 1).view(dtype).double() - a.double())


def assert_adamw_step(got_state: dict, want_state: dict, got: torch.Tensor, want: torch.Tensor,
                      before: torch.Tensor, lr: float, weight_decay: float, what: str = "") -> None:
    """One AdamW step checked against its oracle, as the README states the contract.

    got_state / want_state: the optimizer states of one parameter (every moment the oracle
    has must be bit-equal, NaN never equals); got / want: the selected weights after the
    step (ours, the oracle's); before: the oracle's weights before it. ``got`` must be within
    ulp(want) (in got's dtype: a bf16 weight may round the other way) + UPDATE_ULPS ulp(update)
    (float32) of ``want``, where update = want - before * (1 - lr * weight_decay); a NaN fails.
    """
    keys = [k for k in MOMENTS if k in want_state]
    assert keys, f"{what}: the oracle has no moments to compare"
    for key in keys:
        a, b = got_state[key], want_state[key].to(got_state[key].device)
        diff = (a != b) | a.isnan()
        assert torch.equal(a, b), (f"{what} {key}: {int(diff.sum())} of {a.numel()} entries differ, first at "
                                   f"{diff.nonzero()[:3].flatten().tolist()}: "
                                   f"{a[diff][:3].tolist()} != {b[diff][:3].tolist()}")
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    decayed = before.detach().float().cpu() * (1 - lr * weight_decay)  # rounded as torch's param.mul_ rounds it
    update = (want64 - decayed.double()).float()
    excess = ((got64 - want64).abs() - ulp(want64, got.dtype)) / ulp(update)
    ok = excess <= UPDATE_ULPS  # False for NaN
    assert bool(ok.all()), (f"{what} weights: {int((~ok).sum())} of {ok.numel()} entries beyond ulp(theta) + "
                            f"{UPDATE_ULPS} ulp(update) (worst {float(excess.max()):.3g}, "
                            f"{int(got64.isnan().sum())} NaN)")
