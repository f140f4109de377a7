"""SparseAdamW.reselect against a hand-built reference: torch.optim.AdamW on the new selection's
entries, with the state of the entries that stay carried over through dense copies and the
state of the entries that join zero."""

import copy

import pytest
import torch
from helpers import assert_adamw_step, make_bag

import gallop_kernels as gk
from gallop_kernels import _ext
from gallop_kernels.ops import sparse_adamw as kernel

needs_ext = pytest.mark.skipif(_ext._C is None, reason=f"gallop_kernels._C not importable: {_ext._IMPORT_ERROR}")
SIZES = [97, 1025, 7, 0, 33]
HYPER = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
BACKENDS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("host", "cpu", id="host", marks=needs_ext),
    pytest.param("cuda", "cuda", id="cuda", marks=[needs_ext, pytest.mark.gpu]),
]


def _selection(sizes_k: dict[str, int], bag, gen, keep_from=None, keep=0.5) -> gk.Selection:
    """A selection of k[name] entries per parameter; with ``keep_from``, about ``keep`` of each
    parameter's entries come from that selection (so some stay, some join, some leave)."""
    indices = {}
    for name, p in bag.named_parameters():
        k = sizes_k.get(name, 0)
        pool = torch.randperm(p.numel(), generator=gen)
        if keep_from is not None and keep_from[name].numel():
            old = keep_from[name].cpu()
            stay = old[torch.randperm(old.numel(), generator=gen)[: min(int(k * keep), old.numel())]]
            fresh = pool[~torch.isin(pool, stay)][: k - stay.numel()]
            pool = torch.cat([stay, fresh])
        indices[name] = pool[:k].sort().values.to(p.device)
    shapes = {n: p.shape for n, p in bag.named_parameters()}
    return gk.Selection(indices, shapes, rho=0.1, criterion="random", scope="global", threshold=None)


# Per phase: entries per parameter. In phase 2 w0 and w4 join (w0 ahead of the parameters
# whose step counts go on) and w2 leaves; it comes back in phase 3, its count going on. w3 has
# no weights.
PHASES = [dict(w1=100, w2=3), dict(w0=25, w1=80, w4=5), dict(w0=10, w1=120, w2=2, w4=9)]


class _Reference:
    """torch.optim.AdamW(foreach=False) on float32 copies of the selected entries, rebuilt at
    each reselect from dense (full-size) copies of the state: kept entries carried, new zero."""

    def __init__(self, bag, amsgrad):
        self.bag, self.amsgrad = bag, amsgrad
        self.dense = {}  # name -> {key: full-size float32 tensor}, step: float

    def start(self, sel, opt):
        """Lay out the reference for ``sel`` from the dense state (kept entries) and zeros."""
        self.comp, self.sel = {}, sel
        params, state = [], {}
        for name, p in self.bag.named_parameters():
            idx = sel[name].cpu()
            if not idx.numel():
                continue
            c = torch.nn.Parameter(p.detach().reshape(-1).cpu()[idx].float().clone())
            d = self.dense.get(name)
            if d is not None:
                state[c] = {k: (v[idx].clone() if k != "step" else v.clone()) for k, v in d.items()}
            self.comp[name] = c
            params.append(c)
        self.opt = torch.optim.AdamW(params, foreach=False, amsgrad=self.amsgrad, **HYPER)
        for c, st in state.items():
            self.opt.state[c] = st

    def step(self, grads, opt) -> dict:
        """One step from ``opt``'s current weights (each step's error alone is measured);
        returns those weights."""
        start = {}
        for name, c in self.comp.items():
            p = getattr(self.bag, name)
            st = opt.state[p]
            with torch.no_grad():
                now = st["master_param"] if "master_param" in st else p.detach().reshape(-1)[self.sel[name]]
                c.copy_(now.cpu().float())
            c.grad = grads[name].reshape(-1)[self.sel[name].cpu()].float()
            start[name] = c.detach().clone()
        self.opt.step()
        return start

    def save_dense(self):
        """Scatter the compact state into full-size tensors (zeros elsewhere) before a reselect."""
        for name, c in self.comp.items():
            numel = getattr(self.bag, name).numel()
            st, idx = self.opt.state[c], self.sel[name].cpu()
            d = self.dense.setdefault(name, {})
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ()):
                d[key] = torch.zeros(numel).index_copy_(0, idx.long(), st[key])
            d["step"] = st["step"].clone()
        for name in list(self.dense):
            if name not in self.comp:  # nothing selected this phase: moments were dropped, step kept
                d = self.dense[name]
                for key in d:
                    if key != "step":
                        d[key].zero_()


def _dense_masters(bag, opt) -> dict:
    """Per parameter with a master copy: the float32 weights with the master entries written in."""
    out = {}
    for n, p in bag.named_parameters():
        st = opt.state[p]
        if "master_param" in st:
            idx = st["indices"].cpu().long()
            out[n] = p.detach().reshape(-1).float().cpu().index_copy_(0, idx, st["master_param"].cpu())
    return out


def _grads(bag, gen):
    return {n: torch.randn(p.shape, generator=gen).to(p.dtype) for n, p in bag.named_parameters()}


def _backward(bag, grads):
    """A backward whose gradients are exactly ``grads`` (so compact-gradient hooks fire)."""
    loss = sum((p * grads[n].to(p.device)).sum() for n, p in bag.named_parameters())
    loss.backward()


@pytest.mark.parametrize("compact", [False, True], ids=["dense-grads", "compact-grads"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_reselect_equals_adamw_with_carried_state(backend, device, dtype, amsgrad, compact):
    """Every step helpers.assert_adamw_step against the reference (moments bit-equal, weights,
    master copy for bf16, within ulp(theta) + 4 ulp(update)), weights outside the selection bit-identical, and no
    weight changed by a reselect."""
    bag = make_bag(SIZES, dtype).to(device)
    gen = torch.Generator().manual_seed(5)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=_selection(PHASES[0], bag, gen), amsgrad=amsgrad,
                         backend=backend, compact_grads=compact, **HYPER)
    ref = _Reference(bag, amsgrad)
    sel = opt.selection
    kept_total = 0
    for phase, ks in enumerate(PHASES):
        if phase:
            ref.save_dense()
            sel = _selection(ks, bag, gen, keep_from=opt.selection)
            before = [p.detach().clone() for p in bag.parameters()]
            masters = _dense_masters(bag, opt)
            moved = opt.reselect(sel)
            for n, p in bag.named_parameters():  # kept entries keep their master copy, new ones copy the weight
                if n in masters and sel[n].numel():
                    want = masters[n][sel[n].cpu()]
                    assert torch.equal(opt.state[p]["master_param"].cpu(), want), f"phase {phase} {n}: master copy"
            kept_total += moved.kept
            assert moved.kept + moved.added == sel.num_selected
            for p, b in zip(bag.parameters(), before):
                assert torch.equal(p.detach(), b), "reselect changed a weight"
        ref.start(sel, opt)
        masks = sel.masks()
        for step in range(4):
            grads = _grads(bag, gen)
            before = {n: p.detach().clone() for n, p in bag.named_parameters()}
            opt.zero_grad()  # make_bag leaves a .grad
            _backward(bag, grads)
            if compact:  # the hooks follow the new selection: every .grad is a CompactGrad of its entries
                assert all(opt._compact.holds(p) and p.grad.buffer.numel() == sel[n].numel()
                           for n, p in bag.named_parameters())
            start = ref.step(grads, opt)  # from opt's weights before its step
            opt.step()
            opt.zero_grad()
            for n, p in bag.named_parameters():
                out = ~masks[n]
                assert torch.equal(p.detach()[out], before[n][out]), f"{n}: an unselected weight changed"
                if n not in ref.comp:
                    continue
                st, rs = opt.state[p], ref.opt.state[ref.comp[n]]
                assert float(st["step"]) == float(rs["step"]), f"phase {phase} step {step} {n}: step count"
                got = st["master_param"] if "master_param" in st else p.detach().reshape(-1)[sel[n]]
                got = got.cpu()
                assert_adamw_step(st, rs, got, ref.comp[n], start[n], lr=HYPER["lr"],
                                  weight_decay=HYPER["weight_decay"], what=f"phase {phase} step {step} {n}")
                if dtype != torch.float32:  # the weight is its master copy rounded
                    assert torch.equal(p.detach().reshape(-1)[sel[n]].cpu(), got.to(dtype)), f"{n}: weight != master"
    assert kept_total > 0


def _phases(bag, seed=5) -> list[gk.Selection]:
    """The selections of PHASES, each overlapping the one before."""
    gen = torch.Generator().manual_seed(seed)
    sels = [_selection(PHASES[0], bag, gen)]
    for ks in PHASES[1:]:
        sels.append(_selection(ks, bag, gen, keep_from=sels[-1]))
    return sels


def _train(bag, opt, gen, steps):
    for _ in range(steps):
        opt.zero_grad()
        _backward(bag, _grads(bag, gen))
        opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("backend", ["reference", pytest.param("host", marks=needs_ext)])
def test_checkpoint_after_reselect_resumes_exactly(tmp_path, backend):
    """Checkpoint in phase 2 (w2 has a step count but nothing selected), resume, reselect to
    phase 3: weights and every state tensor equal the uninterrupted run bit for bit."""
    def fresh():
        bag = make_bag(SIZES, torch.bfloat16)
        sels = _phases(bag)
        opt = gk.SparseAdamW(bag.named_parameters(), selection=sels[0], amsgrad=True, backend=backend, **HYPER)
        return bag, sels, opt

    bag, sels, opt = fresh()
    gen = torch.Generator().manual_seed(9)
    _train(bag, opt, gen, 3)
    opt.reselect(sels[1])
    _train(bag, opt, gen, 5)
    opt.reselect(sels[2])
    _train(bag, opt, gen, 3)

    bag2, sels2, opt2 = fresh()
    gen2 = torch.Generator().manual_seed(9)
    _train(bag2, opt2, gen2, 3)
    opt2.reselect(sels2[1])
    _train(bag2, opt2, gen2, 2)
    ckpt = {"model": bag2.state_dict(), "opt": opt2.state_dict(), "sel": opt2.selection.state_dict()}
    torch.save(ckpt, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt")
    bag3 = make_bag(SIZES, torch.bfloat16)
    bag3.load_state_dict(ckpt["model"])
    opt3 = gk.SparseAdamW(bag3.named_parameters(), selection=gk.Selection.from_state_dict(ckpt["sel"]), amsgrad=True,
                          backend=backend, **HYPER)
    opt3.load_state_dict(ckpt["opt"])
    _train(bag3, opt3, gen2, 3)
    opt3.reselect(sels2[2])
    _train(bag3, opt3, gen2, 3)
    for (n, p), p3 in zip(bag.named_parameters(), bag3.parameters()):
        assert torch.equal(p, p3), n
        assert opt.state[p].keys() == opt3.state[p3].keys(), n
        for key, t in opt.state[p].items():
            assert torch.equal(t, opt3.state[p3][key]), f"{n} {key}"
    assert float(opt.state[bag.w2]["step"]) == 3 + 3  # w2 left for phase 2: its count went on after


def test_selection_of_another_model_is_refused_and_nothing_changes():
    bag = make_bag(SIZES)
    sels = _phases(bag)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sels[0], **HYPER)
    _train(bag, opt, torch.Generator().manual_seed(1), 2)
    before = copy.deepcopy(opt.state_dict())
    other = make_bag([97, 1024, 7, 0, 33])
    cases = [
        (gk.select_mask(other, rho=0.1),
         r"reselect: parameter 'w1' has shape \(1025,\) but was selected with shape \(1024,\).*"
         r"must be of this optimizer's parameters"),
        (gk.select_mask(make_bag(SIZES[:3]), rho=0.1), r"reselect: parameter 'w3' is not in the selection"),
        ({"w0": sels[1]["w0"]}, r"reselect: selection must be a gallop_kernels.Selection, got dict"),
    ]
    bad = dict(sels[1])
    bad["w1"] = torch.tensor([5, 3])
    cases.append((gk.Selection(bad, sels[1].shapes, rho=0.1, criterion="random", scope="global", threshold=None),
                  r"reselect: parameter 'w1': selection indices must be sorted and unique"))
    far = dict(sels[1])
    far["w0"] = torch.tensor([0, 97])
    cases.append((gk.Selection(far, sels[1].shapes, rho=0.1, criterion="random", scope="global", threshold=None),
                  r"reselect: parameter 'w0': selection index out of range \[0, 97\)"))
    for sel, match in cases:
        with pytest.raises((ValueError, TypeError), match=match) as info:
            opt.reselect(sel)
        assert "\n" not in str(info.value)
        assert opt.selection is sels[0]
        after = opt.state_dict()
        for pid, st in before["state"].items():
            for key, t in st.items():
                assert torch.equal(t, after["state"][pid][key]), key


def test_pending_compact_gradients_are_refused():
    """A .grad that is still the optimizer's CompactGrad (pending, or zeroed in place) is refused; once
    cleared (model.zero_grad clears it too) the reselect goes on and backward fills the new buffers."""
    bag = make_bag(SIZES)
    sels = _phases(bag)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sels[0], compact_grads=True, **HYPER)
    opt.zero_grad()
    _backward(bag, _grads(bag, torch.Generator().manual_seed(1)))
    with pytest.raises(RuntimeError, match="reselect: compact gradients of the current selection are pending"):
        opt.reselect(sels[1])
    opt.step()
    opt.zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match="pending"):
        opt.reselect(sels[1])
    bag.zero_grad()
    old = opt._compact
    opt.reselect(sels[1])
    assert opt.selection is sels[1] and opt._compact is not old
    _backward(bag, _grads(bag, torch.Generator().manual_seed(2)))
    assert all(opt._compact.holds(p) and p.grad.buffer.numel() == sels[1][n].numel()
               for n, p in bag.named_parameters())


def test_moved_counts_match_set_arithmetic():
    bag = make_bag(SIZES)
    sels = _phases(bag)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sels[0], **HYPER)
    moved = opt.reselect(sels[1])
    kept = sum(int(torch.isin(sels[1][n], sels[0][n]).sum()) for n in sels[0])
    assert moved == (kept, sels[1].num_selected - kept, sels[0].num_selected - kept)
    assert moved.changed == pytest.approx((sels[1].num_selected - kept) / sels[1].num_selected)
    assert 0 < kept < sels[1].num_selected


@needs_ext
def test_plan_rebuilt_once_and_the_old_plan_retired():
    """One new plan per reselect (built at the next step, not again after); the op refuses the
    retired plan, as a step compiled or captured before the reselect would run it."""
    bag = make_bag(SIZES)
    sels = _phases(bag)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sels[0], backend="host", **HYPER)
    gen = torch.Generator().manual_seed(1)
    _train(bag, opt, gen, 1)
    old = opt._plan.launches[0]
    grads, _ = opt._grads()
    before = kernel.STATS["plans"]
    opt.reselect(sels[1])
    _train(bag, opt, gen, 3)
    assert kernel.STATS["plans"] == before + 1
    args = (old.params, [torch.zeros_like(p) for p in old.params], old.indices, old.states, opt._steps[old.plan.device],
            opt._lrs[old.plan.device], None, None, old.plan.id, True)
    with pytest.raises(RuntimeError, match=f"StepPlan {old.plan.id} belongs to a selection that SparseAdamW.reselect"):
        torch.ops.gallop.sparse_adamw_step(*args)
    with pytest.raises(RuntimeError, match="recompile or recapture"):
        old.plan.run(*args[:-2], refresh=True)


def test_amp_with_compact_gradients_across_a_reselect():
    """GradScaler (power-of-two scale: unscaling is exact) through amp_step, compact gradients,
    reselects in between: bit-equal to the same run without AMP; an overflow after a reselect
    skips the step on the new set (weights, moments and step counts unchanged)."""
    def run(amp):
        bag = make_bag(SIZES, torch.bfloat16)
        sels = _phases(bag)
        opt = gk.SparseAdamW(bag.named_parameters(), selection=sels[0], compact_grads=True, **HYPER)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000) if amp else None
        gen = torch.Generator().manual_seed(2)
        for sel in sels:
            opt.zero_grad()  # the last step's compact gradients: reselect refuses pending ones
            opt.reselect(sel)
            for _ in range(3):
                opt.zero_grad()
                grads = _grads(bag, gen)
                if amp:
                    grads = {n: g * 2.0**10 for n, g in grads.items()}
                _backward(bag, grads)
                opt.amp_step(scaler) if amp else opt.step()
        return bag, opt, scaler

    bag, opt, scaler = run(True)
    bag2, opt2, _ = run(False)
    for (n, p), p2 in zip(bag.named_parameters(), bag2.parameters()):
        assert torch.equal(p, p2), n
        for key, t in opt.state[p].items():
            assert torch.equal(t, opt2.state[p2][key]), f"{n} {key}"
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in bag.parameters()]
    opt.zero_grad()
    _backward(bag, {n: torch.full(p.shape, float("inf")).to(p.dtype) for n, p in bag.named_parameters()})
    opt.amp_step(scaler)
    assert all(torch.equal(p, w) for p, w in zip(bag.parameters(), weights))
    for pid, st in opt.state_dict()["state"].items():
        for key, t in st.items():
            assert torch.equal(t, before["state"][pid][key]), key


def test_indices_of_a_wrong_shape_are_refused():
    """(A Selection casts any index dtype to its own, int32 or int64; the shape it keeps.)"""
    bag = make_bag(SIZES)
    sels = _phases(bag)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sels[0], **HYPER)
    bad = dict(sels[1])
    bad["w1"] = bad["w1"].reshape(1, -1)
    with pytest.raises(ValueError, match=r"reselect: parameter 'w1': selection indices must be a 1-D int32 or int64"):
        opt.reselect(gk.Selection(bad, sels[1].shapes, rho=0.1, criterion="random", scope="global", threshold=None))


def test_reselect_after_add_param_group_moves_every_group():
    """A group added with add_param_group is moved like the others (its own lr kept, int32 index lists
    as the selection holds them); a selection without its parameters is refused before anything changes."""
    bag = make_bag(SIZES)
    sels = _phases(bag)
    named = list(bag.named_parameters())
    opt = gk.SparseAdamW(named[:2], selection=sels[0], **HYPER)
    opt.add_param_group({"params": named[2:], "lr": 1e-3})
    for step in range(2):
        if step:
            partial = {n: sels[1][n] for n, _ in named[:2]}
            first_only = gk.Selection(partial, {n: sels[1].shapes[n] for n in partial}, rho=0.1, criterion="random",
                                      scope="global", threshold=None)
            with pytest.raises(ValueError, match=r"^reselect: parameter 'w2' is not in the selection"):
                opt.reselect(first_only)
            assert opt.selection is sels[0]
            moved = opt.reselect(sels[1])
            assert moved.kept + moved.added == sels[1].num_selected and moved.added > 0
        for p in bag.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt.param_groups[1]["lr"] == 1e-3
    for n, p in named:
        if sels[1][n].numel():
            assert opt.state[p]["indices"].dtype == torch.int32 and torch.equal(opt.state[p]["indices"], sels[1][n])
            assert float(opt.state[p]["step"]) == (2.0 if sels[0][n].numel() else 1.0), n
