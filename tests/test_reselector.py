"""Reselector (GaLLoP re-selection): against the float64 sort oracle on hand-summed gradients,
and a re-selection whose scores did not change against a run without one, bit for bit."""

import copy

import pytest
import torch
from helpers import make_bag, oracle_selection

import gallop_kernels as gk
from gallop_kernels.delta import make_delta

SIZES = [97, 1025, 7, 0, 33]


def _grads(bag, gen):
    return {n: torch.randn(p.shape, generator=gen).to(p.dtype) for n, p in bag.named_parameters()}


def _step(bag, opt, grads):
    opt.zero_grad()
    sum((p * grads[n]).sum() for n, p in bag.named_parameters()).backward()
    opt.step()


def _setup(rho, lr, seed=0):
    bag = make_bag(SIZES)
    sel = gk.select_mask(bag, rho=rho)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sel, lr=lr, weight_decay=0.1)
    return bag, opt


@pytest.mark.parametrize("rho,lr", [(1.0, 1e-2), (0.1, 0.0)], ids=["every-weight", "lr=0"])
def test_unchanged_scores_keep_the_set_and_the_run(rho, lr):
    """rho=1 (the set cannot change) or lr=0 with one fixed gradient (the scores cannot change):
    every re-selection keeps the set, and weights and state equal a run without one, bit for bit."""
    bag, opt = _setup(rho, lr)
    bag2, opt2 = _setup(rho, lr)
    resel = gk.Reselector(opt, bag, every=2, accumulate=2)
    fixed = dict(bag.named_parameters())
    grads = {n: p.grad.clone() for n, p in fixed.items()}  # the gradient the selection was made on
    for _ in range(6):
        _step(bag, opt, grads)
        resel.step()
        _step(bag2, opt2, grads)
    assert [h["step"] for h in resel.history] == [2, 4, 6]
    assert all(h["changed"] == 0.0 and h["added"] == h["dropped"] == 0 for h in resel.history)
    for (n, p), p2 in zip(bag.named_parameters(), bag2.parameters()):
        assert torch.equal(p, p2), n
        assert opt.state[p].keys() == opt2.state[p2].keys()
        for key, t in opt.state[p].items():
            assert torch.equal(t, opt2.state[p2][key]), f"{n} {key}"


def test_reselection_equals_the_oracle_on_summed_gradients():
    """every=3, accumulate=2: at steps 3 and 6 the set is the float64 oracle's top-k of
    |g2 + g3| / (|theta| + eps) (then of steps 5 and 6); weights never trained are untouched;
    ``trained`` is the union of the sets, ``base_values`` their values before training."""
    bag, opt = _setup(0.1, 1e-2)
    init = {n: p.detach().clone() for n, p in bag.named_parameters()}
    resel = gk.Reselector(opt, bag, every=3, accumulate=2)
    gen = torch.Generator().manual_seed(4)
    union = {n: set(opt.selection[n].tolist()) for n in opt.selection}
    summed = None
    for step in range(1, 8):
        grads = _grads(bag, gen)
        _step(bag, opt, grads)
        if step % 3 in (0, 2):
            summed = grads if summed is None else {n: summed[n].float() + grads[n] for n in grads}
        if step % 3 == 0:
            want, _ = oracle_selection(bag, 0.1, grads={n: g.float() for n, g in summed.items()})
            summed = None
        moved = resel.step()
        assert (moved is None) == (step % 3 != 0)
        if moved is not None:
            for n in want:
                assert torch.equal(opt.selection[n], want[n]), f"step {step} {n}"
                union[n] |= set(want[n].tolist())
            assert moved.added > 0
    for n, p in bag.named_parameters():
        assert resel.trained[n].tolist() == sorted(union[n]), n
        assert torch.equal(resel.base_values.get(n, init[n][:0]), init[n][resel.trained[n]]), n
        out = torch.ones(p.numel(), dtype=torch.bool)
        out[resel.trained[n]] = False
        assert torch.equal(p.detach()[out], init[n][out]), f"{n}: a weight never trained changed"
    delta = make_delta(bag, resel.trained, resel.base_values)
    assert delta.num_weights == sum(len(u) for u in union.values())
    assert [h["step"] for h in resel.history] == [3, 6]


def test_bad_arguments():
    bag, opt = _setup(0.1, 1e-2)
    for kw, match in [
        (dict(every=0), r"every must be an integer >= 1, got 0"),
        (dict(every=2, accumulate=3), r"accumulate must be an integer in \[1, 2\], got 3"),
        (dict(every=2.0), r"every must be an integer >= 1, got 2.0"),
    ]:
        with pytest.raises(ValueError, match=match):
            gk.Reselector(opt, bag, **kw)
    with pytest.raises(TypeError, match="opt must be a gallop_kernels.SparseAdamW, got AdamW"):
        gk.Reselector(torch.optim.AdamW(bag.parameters()), bag, every=2)
    compact = gk.SparseAdamW(bag.named_parameters(), selection=opt.selection, compact_grads=True)
    with pytest.raises(ValueError, match="compact_grads=True, which frees the dense gradients"):
        gk.Reselector(compact, bag, every=2)
    compact.remove_hooks()
    other = copy.deepcopy(bag)
    other.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"trainable parameters \['extra'\] of the model are not in"):
        gk.Reselector(opt, other, every=2)


def _mask(sel, bag):
    return {n: torch.zeros(p.numel(), dtype=torch.bool).index_fill_(0, sel[n].cpu().long(), True)
            for n, p in bag.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_spiel_drops_the_least_moved_and_regrows_by_summed_gradient(dtype):
    """every=2, accumulate=2, initial_rate=0.5 over 10 steps: at step s, r = floor(0.5 (1 - s/10) k)
    leave and join; the set keeps exactly k; the kept weights are the float64 oracle's k - r
    largest |theta - theta0| of the set, the joining ones its r largest |g_{s-1} + g_s| outside
    it; dropped weights are back at theta0 bit for bit; the delta holds exactly the final set and
    applied to the base gives the tuned model bit for bit."""
    bag = make_bag(SIZES, dtype)
    sel = gk.select_mask(bag, rho=0.1, criterion="saft")
    k = sel.num_selected
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sel, lr=1e-2)
    init = copy.deepcopy(bag)
    resel = gk.Reselector(opt, bag, every=2, accumulate=2, method="spiel", total_steps=10, initial_rate=0.5)
    gen = torch.Generator().manual_seed(8)
    summed, counts = None, []
    for step in range(1, 11):
        grads = _grads(bag, gen)
        _step(bag, opt, grads)
        summed = {n: g.float() for n, g in grads.items()} if step % 2 else {n: summed[n] + grads[n] for n in grads}
        if step % 2:
            assert resel.step() is None
            continue
        old = opt.selection
        r = int(0.5 * (1 - step / 10) * k)
        moved = {n: p.detach().float() - q.detach().float()
                 for (n, p), q in zip(bag.named_parameters(), init.parameters())}
        keep, _ = oracle_selection(bag, criterion="saft", k=k - r, grads=moved, allowed=_mask(old, bag))
        outside = {n: ~m for n, m in _mask(old, bag).items()}
        grow, _ = oracle_selection(bag, criterion="saft", k=r, grads=summed, allowed=outside)
        result = resel.step()
        counts.append((result.added, result.dropped))
        assert opt.selection.num_selected == k
        for (n, p), q in zip(bag.named_parameters(), init.parameters()):
            want = torch.cat([keep[n], grow[n]]).sort().values
            assert torch.equal(opt.selection[n], want), f"step {step} {n}"
            dropped = old[n][~torch.isin(old[n], keep[n])]
            assert torch.equal(p.detach()[dropped], q.detach()[dropped]), f"step {step} {n}: not back at theta0"
    assert counts == [(int(0.5 * (1 - s / 10) * k),) * 2 for s in (2, 4, 6, 8, 10)]
    assert [h["rate"] for h in resel.history] == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    assert all(torch.equal(resel.trained[n], opt.selection[n]) for n in opt.selection)
    delta = make_delta(bag, resel.trained, resel.base_values)
    final = {n: i.tolist() for n, i in opt.selection.items() if i.numel()}
    assert {n: t.indices.tolist() for n, t in delta.tensors.items()} == final
    from gallop_kernels.delta import apply_delta

    apply_delta(init, delta)
    for (n, p), q in zip(bag.named_parameters(), init.parameters()):
        assert torch.equal(p, q), n


def test_spiel_arguments():
    bag, opt = _setup(0.1, 1e-2)
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1, got None"):
        gk.Reselector(opt, bag, every=2, method="spiel")
    with pytest.raises(ValueError, match=r"initial_rate must be a number in \[0, 1\], got 1.5"):
        gk.Reselector(opt, bag, every=2, method="spiel", total_steps=10, initial_rate=1.5)
    with pytest.raises(ValueError, match="unknown method 'rigl'"):
        gk.Reselector(opt, bag, every=2, method="rigl")


def _saved(state):
    """``state`` through torch.save and torch.load, as a checkpoint stores it."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


@pytest.mark.parametrize("method", ["gallop", "spiel"])
def test_state_dict_resumes_bit_for_bit(method):
    """every=3, accumulate=2, 8 steps: stopped after step 5 (after the step-3 re-selection, with step 5's
    gradient summed for the step-6 one) and resumed from saved states (the optimizer's, its selection, the
    Reselector's and the values of ``trained``) on a fresh model, the run ends as an uninterrupted one: weights,
    optimizer state, ``trained``, ``base_values`` and the history's counts, bit for bit."""
    kw = dict(every=3, accumulate=2, method=method, **({"total_steps": 8, "initial_rate": 0.5} if method == "spiel"
                                                        else {}))

    def start():
        bag, opt = _setup(0.1, 1e-2)
        return bag, opt, gk.Reselector(opt, bag, **kw)

    def train(bag, opt, resel, steps):
        gen = torch.Generator().manual_seed(6)
        for step in range(1, 9):
            grads = _grads(bag, gen)  # drawn every step: a resumed run sees the same ones
            if step in steps:
                _step(bag, opt, grads)
                resel.step()

    bag, opt, resel = start()
    train(bag, opt, resel, range(1, 9))
    bag1, opt1, resel1 = start()
    train(bag1, opt1, resel1, range(1, 6))
    assert resel1.history and resel1._sum is not None  # what the saved state must carry
    values = {n: p.detach()[resel1.trained[n]].clone() for n, p in bag1.named_parameters()}
    saved = _saved({"opt": opt1.state_dict(), "sel": opt1.selection.state_dict(), "resel": resel1.state_dict(),
                    "values": values})
    bag2 = make_bag(SIZES)
    opt2 = gk.SparseAdamW(bag2.named_parameters(), selection=gk.Selection.from_state_dict(saved["sel"]), lr=1e-2,
                          weight_decay=0.1)
    opt2.load_state_dict(saved["opt"])
    resel2 = gk.Reselector(opt2, bag2, **kw)
    resel2.load_state_dict(saved["resel"])
    with torch.no_grad():
        for n, p in bag2.named_parameters():
            p[resel2.trained[n]] = saved["values"][n]
    train(bag2, opt2, resel2, range(6, 9))
    counts = lambda r: [{k: v for k, v in h.items() if k != "seconds"} for h in r.history]  # noqa: E731
    assert counts(resel2) == counts(resel) and [h["step"] for h in resel.history] == [3, 6]
    assert resel2.trained == resel.trained and resel2.base_values.keys() == resel.base_values.keys()
    assert all(torch.equal(resel2.base_values[n], v) for n, v in resel.base_values.items())
    for (n, p), p2 in zip(bag.named_parameters(), bag2.parameters()):
        assert torch.equal(p, p2), n
        assert all(torch.equal(t, opt2.state[p2][key]) for key, t in opt.state[p].items()), n
