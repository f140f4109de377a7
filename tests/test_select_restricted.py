"""Restricted selections: select_mask(..., among=, exclude=, k=) against the float64 full-sort
oracle on the competing weights alone, on every backend, ties included; the drop/regrow
recipe (SpIEL); Selection | and -; bad input."""

import pytest
import torch
from helpers import SELECTION_BACKENDS, adversarial_bag, make_bag, on_backend_device, oracle_selection, usable_backend

import gallop_kernels as gk

SIZES = [1500, 97, 0, 1024]
KINDS = ["random", "ties", "all_equal", "zero_grads", "flt_max"]
RESTRICTIONS = ["among", "exclude", "among+exclude"]


def _bag(kind: str):
    return make_bag(SIZES) if kind == "random" else adversarial_bag(kind, torch.float32, SIZES)


def _subset(bag, share: float, seed: int, skip: str | None = None) -> dict[str, torch.Tensor]:
    """name -> sorted flat indices of about ``share`` of each parameter (none of ``skip``)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(p.numel(), generator=gen) < share).nonzero().reshape(-1)
            for n, p in bag.named_parameters() if n != skip}


def _mask(bag, idx: dict[str, torch.Tensor], default: bool) -> dict[str, torch.Tensor]:
    """name -> bool mask, True at idx[name]; a parameter idx lacks is all ``default``."""
    out = {}
    for n, p in bag.named_parameters():
        m = torch.full((p.numel(),), default and n not in idx)
        m[idx.get(n, torch.empty(0, dtype=torch.int64)).cpu()] = True
        out[n] = m
    return out


def _restriction(bag, which: str):
    """select_mask keywords for ``which``, and the oracle's mask of the competing weights.
    among leaves out w2 (and empty w2) entirely; exclude takes a third of each tensor."""
    among, exclude = _subset(bag, 0.5, 1, skip="w1"), _subset(bag, 0.3, 2)
    if which == "among":
        return {"among": among}, _mask(bag, among, False)
    if which == "exclude":
        return {"exclude": exclude}, {n: ~m for n, m in _mask(bag, exclude, False).items()}
    ex = _mask(bag, exclude, False)
    return {"among": among, "exclude": exclude}, {n: m & ~ex[n] for n, m in _mask(bag, among, False).items()}


def assert_same(sel, expected, thr):
    assert set(sel) == set(expected)
    for name, idx in expected.items():
        assert sel[name].dtype == torch.int32  # every test tensor has fewer than 2^31 weights
        assert torch.equal(sel[name].cpu().long(), idx), f"{name}: {sel[name].tolist()[:10]} != {idx.tolist()[:10]}"
    assert sel.threshold == thr


@pytest.mark.parametrize("backend", SELECTION_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", RESTRICTIONS)
@pytest.mark.parametrize("criterion", ["gallop", "saft", "pafi"])
def test_matches_full_sort_on_the_competing_weights(backend, kind, which, criterion):
    backend = usable_backend(backend)
    bag = on_backend_device(_bag(kind), backend)
    kw, allowed = _restriction(bag, which)
    n = sum(int(m.sum()) for m in allowed.values())
    for k in (0, 1, 37, n // 2, n):
        sel = gk.select_mask(bag, k=k, criterion=criterion, backend=backend, **kw)
        assert_same(sel, *oracle_selection(bag, criterion=criterion, k=k, allowed=allowed))
        assert sel.num_selected == k and sel.rho == k / n
    for scope in ("global", "per_tensor"):
        sel = gk.select_mask(bag, rho=0.3, criterion=criterion, scope=scope, backend=backend, **kw)
        assert_same(sel, *oracle_selection(bag, 0.3, criterion, scope, allowed=allowed))


@pytest.mark.parametrize("backend", SELECTION_BACKENDS)
def test_restricted_to_everything_is_unrestricted(backend):
    backend = usable_backend(backend)
    bag = on_backend_device(adversarial_bag("ties", torch.float32, SIZES), backend)
    everything = {n: torch.arange(p.numel()) for n, p in bag.named_parameters()}
    nothing = {n: torch.empty(0, dtype=torch.int64) for n, _ in bag.named_parameters()}
    plain = gk.select_mask(bag, rho=0.2, backend=backend)
    assert gk.select_mask(bag, rho=0.2, among=everything, backend=backend) == plain
    assert gk.select_mask(bag, rho=0.2, exclude=nothing, backend=backend) == plain


@pytest.mark.parametrize("backend", SELECTION_BACKENDS)
def test_compact_gradients_equal_dense_ones(backend):
    """With among, a gradient may hold one value per index of among[name]; a parameter
    among does not name needs no gradient at all."""
    backend = usable_backend(backend)
    bag = on_backend_device(adversarial_bag("ties", torch.float32, SIZES), backend)
    among = _subset(bag, 0.4, 3, skip="w1")
    dense = gk.select_mask(bag, k=200, among=among, backend=backend)
    compact = {n: bag.get_parameter(n).grad.reshape(-1)[i] for n, i in among.items()}
    bag.w1.grad = None
    assert gk.select_mask(bag, compact, k=200, among=among, backend=backend) == dense
    with pytest.raises(ValueError, match=r"'w1' has no gradient"):
        gk.select_mask(bag, k=200, backend=backend)  # without among, w1 competes


@pytest.mark.parametrize("backend", SELECTION_BACKENDS)
def test_drop_and_regrow(backend):
    """SpIEL's step as README writes it: keep the trained weights whose change |theta - theta0|
    is largest (drop the n smallest), regrow n untrained weights by |g|; ties in both."""
    backend = usable_backend(backend)
    bag = on_backend_device(make_bag(SIZES), backend)
    theta0 = {n: p.detach().clone() for n, p in bag.named_parameters()}
    sel = gk.select_mask(bag, rho=0.05, backend=backend)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # training moved the selected weights by one of 3 step sizes: many ties
        for n, p in bag.named_parameters():
            p.view(-1)[sel[n]] += torch.randint(1, 4, (sel[n].numel(),), generator=gen).float().to(p.device) * 0.125
            p.grad = torch.randint(0, 5, p.shape, generator=gen).float().to(p.device)
    n_swap = 20
    delta = {n: p.detach().reshape(-1)[sel[n]] - theta0[n].reshape(-1)[sel[n]] for n, p in bag.named_parameters()}
    keep = gk.select_mask(bag, delta, k=sel.num_selected - n_swap, criterion="saft", among=sel, backend=backend)
    grow = gk.select_mask(bag, k=n_swap, criterion="saft", exclude=sel, backend=backend)
    new = keep | grow
    trained = _mask(bag, dict(sel), False)
    dense_delta = {n: p.detach() - theta0[n] for n, p in bag.named_parameters()}
    want_keep, _ = oracle_selection(bag, criterion="saft", k=sel.num_selected - n_swap, grads=dense_delta,
                                    allowed=trained)
    want_grow, _ = oracle_selection(bag, criterion="saft", k=n_swap, allowed={n: ~m for n, m in trained.items()})
    for name in sel:
        assert torch.equal(keep[name].cpu(), want_keep[name]) and torch.equal(grow[name].cpu(), want_grow[name]), name
        assert torch.equal(new[name].cpu(), torch.sort(torch.cat([want_keep[name], want_grow[name]])).values)
    assert new.num_selected == sel.num_selected and (sel - keep).num_selected == n_swap
    assert (new - sel) == grow - sel and (new - sel).num_selected == n_swap


def test_selection_union_and_difference():
    bag = make_bag([10, 6])
    a = gk.Selection({"w0": torch.tensor([1, 4, 7]), "w1": torch.tensor([0])}, {"w0": (10,), "w1": (6,)},
                     rho=0.25, criterion="saft", scope="global", threshold=2.0)
    b = gk.Selection({"w0": torch.tensor([0, 4, 9]), "w1": torch.tensor([], dtype=torch.int64)},
                     {"w0": (10,), "w1": (6,)}, rho=0.2, criterion="gallop", scope="global", threshold=1.0)
    union, diff = a | b, a - b
    assert union["w0"].tolist() == [0, 1, 4, 7, 9] and union["w1"].tolist() == [0]
    assert diff["w0"].tolist() == [1, 7] and diff["w1"].tolist() == [0] and (b - a)["w0"].tolist() == [0, 9]
    assert (union.criterion, union.scope, union.threshold, union.rho) == ("saft", "global", None, 6 / 16)
    assert diff.rho == 3 / 16 and (a - a).num_selected == 0 and (a | a) == gk.Selection(
        dict(a), a.shapes, rho=4 / 16, criterion="saft", scope="global", threshold=None)
    other = gk.select_mask(make_bag([10, 7]), rho=0.2)
    with pytest.raises(ValueError, match="different parameters or shapes"):
        a | other
    with pytest.raises(TypeError, match="unsupported operand"):
        a - {"w0": torch.tensor([1])}
    assert bag is not None


def test_k_is_exact_and_rho_counts_the_competing_weights():
    bag = make_bag([100, 50])
    among = {"w0": torch.arange(0, 100, 2)}  # 50 weights compete
    assert gk.select_mask(bag, rho=0.1, among=among).num_selected == 5
    assert gk.select_mask(bag, k=7).num_selected == 7 and gk.select_mask(bag, k=7).rho == 7 / 150
    assert gk.select_mask(bag, k=0, among=among).threshold is None
    assert gk.select_mask(bag).num_selected == 2  # rho defaults to 0.01 of 150


def test_bad_restrictions_name_themselves():
    bag = make_bag([10, 12])
    cases = [
        (dict(among="w0"), TypeError, r"^among must be a Selection or a mapping of parameter name -> flat indices"),
        (dict(exclude={"nope": torch.tensor([1])}), ValueError, r"^exclude names parameters that are not trainable "
                                                                r"parameters of the model: \['nope'\]"),
        (dict(among={"w0": [1, 2]}), TypeError, r"^among\['w0'\] must be a tensor of flat indices, got list"),
        (dict(among={"w0": torch.tensor([3, 1])}), ValueError, r"^parameter 'w0': among indices must be sorted"),
        (dict(exclude={"w1": torch.tensor([12])}), ValueError,
         r"^parameter 'w1': exclude index out of range \[0, 12\)"),
        (dict(among={"w0": torch.tensor([1.0])}), ValueError, r"^parameter 'w0': among indices must be a 1-D int32 or int64"),
        (dict(among={"w0": torch.tensor([1])}, criterion="random"), ValueError,
         r"^criterion='random' does not take among="),
        (dict(among={"w0": torch.tensor([1, 2])}, k=3), ValueError,
         r"^k=3 but only 2 weights compete \(after among/exclude\)"),
        (dict(k=23), ValueError, r"^k=23 but only 22 weights compete$"),
        (dict(k=3, rho=0.1), ValueError, r"^give rho or k, not both"),
        (dict(k=3, scope="per_tensor"), ValueError, r"^k counts weights over all parameters: use scope='global'"),
        (dict(k=-1), ValueError, r"^k must be an integer >= 0, got -1"),
        (dict(k=1.5), ValueError, r"^k must be an integer >= 0, got 1.5"),
        (dict(k=True), ValueError, r"^k must be an integer >= 0, got True"),
    ]
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            gk.select_mask(bag, **kw)
    with pytest.raises(ValueError, match=r"'w0': gradient shape \(3,\) != parameter shape \(10,\)"):
        gk.select_mask(bag, {"w0": torch.ones(3), "w1": bag.w1.grad}, k=1, among={"w0": torch.tensor([1, 2])})
