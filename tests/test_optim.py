"""SparseAdamW against torch.optim.AdamW run on a gathered copy of the selected weights."""

import types

import pytest
import torch
from helpers import DTYPES, Bag, assert_adamw_step, make_bag, needs_ext

import gallop_kernels as gk

SIZES = [97, 1025, 7, 0]
GROUPS = [({"w0", "w1"}, dict(lr=1e-2, weight_decay=0.1)), ({"w2", "w3"}, dict(lr=5e-3, weight_decay=0.0))]


def _groups(named):
    named = list(named)
    return [{"params": [(n, p) for n, p in named if n in names], **hp} for names, hp in GROUPS]


def _schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))


def _grads(bag, gen):
    return {n: torch.randn(p.shape, generator=gen).to(p.dtype) for n, p in bag.named_parameters()}


def _setup(dtype=torch.float32, rho=0.1, **opt_kw):
    bag = make_bag(SIZES, dtype)
    sel = gk.select_mask(bag, rho=rho)
    opt = gk.SparseAdamW(_groups(bag.named_parameters()), selection=sel, betas=(0.8, 0.99), eps=1e-6, **opt_kw)
    return bag, sel, opt


def _run(bag, opt, sched, steps, gen):
    for _ in range(steps):
        opt.zero_grad()
        for n, g in _grads(bag, gen).items():
            getattr(bag, n).grad = g
        opt.step()
        sched.step()


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("host", marks=needs_ext)])
def test_equals_torch_adamw_on_gathered_copy(backend, amsgrad, maximize):
    """Two param groups under an LR schedule, every step from equal states, against
    torch.optim.AdamW(foreach=False) on the gathered weights: helpers.assert_adamw_step
    (moments bit-equal, weights within ulp(theta) + 4 ulp(update), NaN fails)."""
    bag, sel, opt = _setup(amsgrad=amsgrad, maximize=maximize, backend=backend)
    init = {n: p.detach().clone() for n, p in bag.named_parameters()}
    compact = {n: torch.nn.Parameter(p.detach()[sel[n]].clone()) for n, p in bag.named_parameters()}
    ref = torch.optim.AdamW(
        [{"params": [compact[n] for n in sorted(names)], **hp} for names, hp in GROUPS],
        betas=(0.8, 0.99),
        eps=1e-6,
        amsgrad=amsgrad,
        maximize=maximize,
        foreach=False,
    )
    group_of = {n: gi for gi, (names, _) in enumerate(GROUPS) for n in names}
    sched, ref_sched = _schedule(opt), _schedule(ref)
    gen = torch.Generator().manual_seed(7)
    for step in range(50):
        grads = _grads(bag, gen)
        opt.zero_grad()
        ref.zero_grad()
        before = {n: c.detach().clone() for n, c in compact.items()}
        for n, g in grads.items():
            getattr(bag, n).grad = g
            compact[n].grad = g[sel[n]]
        opt.step()
        ref.step()
        for n, p in bag.named_parameters():
            if not sel[n].numel():
                continue
            group = ref.param_groups[group_of[n]]
            got = p.detach()[sel[n]]
            assert_adamw_step(opt.state[p], ref.state[compact[n]], got, compact[n], before[n], lr=group["lr"],
                              weight_decay=group["weight_decay"], what=f"{n} step {step}")
            with torch.no_grad():  # the next step starts from equal states again
                compact[n].copy_(got)
        sched.step()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] < GROUPS[0][1]["lr"], "the schedule never changed the lr"
    masks = sel.masks()
    for n, p in bag.named_parameters():
        assert torch.equal(p.detach()[~masks[n]], init[n][~masks[n]]), f"{n}: unselected weights changed"
        if sel[n].numel():
            assert not torch.equal(p.detach()[masks[n]], init[n][masks[n]]), f"{n}: selected weights never moved"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={d}")
def test_unselected_weights_bit_for_bit(dtype):
    bag, sel, opt = _setup(DTYPES[dtype], rho=0.05)
    init = {n: p.detach().clone() for n, p in bag.named_parameters()}
    _run(bag, opt, _schedule(opt), 10, torch.Generator().manual_seed(3))
    masks = sel.masks()
    for n, p in bag.named_parameters():
        assert torch.equal(p.detach()[~masks[n]], init[n][~masks[n]]), n


def test_state_is_compact():
    bag, sel, opt = _setup(rho=0.01)
    _run(bag, opt, _schedule(opt), 3, torch.Generator().manual_seed(0))
    total = 0
    for n, p in bag.named_parameters():
        st = opt.state[p]
        if sel[n].numel() == 0:
            assert not st, f"{n}: state created for a parameter with nothing selected"
            continue
        assert float(st["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].shape == sel[n].shape and st[key].dtype == torch.float32
        total += sum(t.numel() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    assert total == 2 * sel.num_selected < 0.05 * sum(SIZES)


def test_resume_matches_uninterrupted(tmp_path):
    def fresh():
        bag, sel, opt = _setup(amsgrad=True)
        return bag, sel, opt, _schedule(opt)

    bag, sel, opt, sched = fresh()
    _run(bag, opt, sched, 50, torch.Generator().manual_seed(11))

    bag2, sel2, opt2, sched2 = fresh()
    gen = torch.Generator().manual_seed(11)
    _run(bag2, opt2, sched2, 20, gen)
    torch.save(
        {"model": bag2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict(), "sel": sel2.state_dict()},
        tmp_path / "ckpt.pt",
    )
    ckpt = torch.load(tmp_path / "ckpt.pt")
    bag3 = make_bag(SIZES)  # same init; the loaded weights overwrite it anyway
    bag3.load_state_dict(ckpt["model"])
    sel3 = gk.Selection.from_state_dict(ckpt["sel"])
    opt3 = gk.SparseAdamW(_groups(bag3.named_parameters()), selection=sel3, betas=(0.8, 0.99), eps=1e-6, amsgrad=True)
    sched3 = _schedule(opt3)  # before loading: building a scheduler resets the lr
    opt3.load_state_dict(ckpt["opt"])
    sched3.load_state_dict(ckpt["sched"])
    _run(bag3, opt3, sched3, 30, gen)
    for (n, p), p3 in zip(bag.named_parameters(), bag3.parameters()):
        assert torch.equal(p, p3), n
    for p, p3 in zip(bag.parameters(), bag3.parameters()):
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], opt3.state[p3][key]), key


def test_bf16_state_stays_float32_after_load():
    bag, sel, opt = _setup(torch.bfloat16)
    _run(bag, opt, _schedule(opt), 2, torch.Generator().manual_seed(0))
    saved = opt.state_dict()
    bag2 = make_bag(SIZES, torch.bfloat16)
    opt2 = gk.SparseAdamW(_groups(bag2.named_parameters()), selection=sel, betas=(0.8, 0.99), eps=1e-6)
    opt2.load_state_dict(saved)
    for n, p in bag2.named_parameters():
        st = opt2.state.get(p, {})
        if not sel[n].numel():
            assert not st, n
            continue
        for key in ("exp_avg", "exp_avg_sq", "master_param"):  # bf16 weights keep float32 master weights
            assert st[key].dtype == torch.float32 and st[key].shape == sel[n].shape, (n, key)


def test_load_state_from_another_selection_is_refused():
    bag, sel, opt = _setup()
    _run(bag, opt, _schedule(opt), 1, torch.Generator().manual_seed(0))
    other = gk.select_mask(bag, rho=0.2)
    opt2 = gk.SparseAdamW(bag.named_parameters(), selection=other)
    with pytest.raises(ValueError, match="different selection"):
        opt2.load_state_dict(opt.state_dict())


def test_params_without_grad_are_skipped():
    bag, sel, opt = _setup()
    init = bag.w1.detach().clone()
    for n, p in bag.named_parameters():
        p.grad = None if n == "w1" else torch.randn(p.shape)
    opt.step()
    assert torch.equal(bag.w1.detach(), init) and not opt.state[bag.w1]


def test_clip_grad_norm_zero_grad_and_closure():
    """SparseAdamW.clip_grad_norm_ inside a closure clips the selected entries to max_norm."""
    bag, sel, opt = _setup()
    x = torch.randn(1025)
    norms = []

    def closure():
        opt.zero_grad()
        loss = (bag.w1 * x).sum() ** 2
        loss.backward()
        norms.append(opt.clip_grad_norm_(1.0))
        return loss

    before = bag.w1.detach().clone()
    loss = opt.step(closure)
    assert loss is not None and bag.w1.grad is not None
    assert float(norms[0]) > 1.0, "no clipping: the check below would be trivial"
    assert float(bag.w1.grad.reshape(-1)[sel["w1"]].norm()) <= 1.0 + 1e-5
    assert not torch.equal(bag.w1.detach(), before)
    opt.zero_grad()
    assert all(p.grad is None for p in bag.parameters())


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch ops run, and host syncs (reads of a tensor's value)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_host_work_per_step_does_not_grow_with_parameters():
    """1 and 64 parameters: the same torch ops, table writes and plan builds per step
    (none of either after the first step), and no host sync."""
    from gallop_kernels.ops import sparse_adamw as kernel

    seen = {}
    for n in (1, 64):
        bag = make_bag([33] * n)
        sel = gk.select_mask(bag, rho=0.3)
        opt = gk.SparseAdamW(bag.named_parameters(), selection=sel, lr=1e-2, weight_decay=0.1, backend="host")
        sched = _schedule(opt)
        for p in bag.parameters():
            p.grad = torch.randn(p.shape)  # the same gradient tensors every step: their addresses do not change
        opt.step()
        sched.step()
        kernel.STATS.clear()
        with _CountOps() as count:
            for _ in range(5):
                opt.step()
                sched.step()  # a new lr every step: written into the device buffer, no re-plan
        seen[n] = (count.ops, count.syncs, dict(kernel.STATS))
        assert all(float(opt.state[p]["step"]) == 6 for p in bag.parameters())
    assert seen[1] == seen[64], seen
    ops, syncs, stats = seen[64]
    assert syncs == 0 and stats == {"launches": 5}, seen


def test_replan_when_a_gradient_goes_missing_or_changes_layout():
    """A parameter without gradient leaves the plan; a non-contiguous gradient moves its
    parameter to the reference path; both equal a fresh optimizer's steps."""
    from gallop_kernels.ops import sparse_adamw as kernel

    runs = []
    for fresh_each_step in (False, True):
        bag, sel, opt = _setup(weight_decay=0.1)
        gen = torch.Generator().manual_seed(5)
        kernel.STATS.clear()
        for step in range(4):
            if fresh_each_step:  # a new optimizer with the old one's state: plans from scratch
                state = opt.state_dict()
                opt = gk.SparseAdamW(_groups(bag.named_parameters()), selection=sel, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
                opt.load_state_dict(state)
            for n, g in _grads(bag, gen).items():
                getattr(bag, n).grad = g
            if step == 1:
                bag.w1.grad = None
            if step >= 2:
                bag.w1.grad = torch.randn(2 * 1025, generator=gen)[::2]
            opt.step()
        if not fresh_each_step:
            assert kernel.STATS["plans"] == 3, kernel.STATS  # first, without w1, with w1 on the reference path
        assert float(opt.state[bag.w0]["step"]) == 4 and float(opt.state[bag.w1]["step"]) == 3
        runs.append([p.detach().clone() for p in bag.parameters()])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def test_tensor_lr_and_step_counter_on_the_device():
    """A tensor lr (changed in place, as schedulers do) equals the same float lr; state["step"]
    is a float32 view of the device counter and state_dict() holds a copy."""
    out = []
    for tensor_lr in (False, True):
        bag, sel, opt = _setup()
        if tensor_lr:
            for group in opt.param_groups:
                group["lr"] = torch.tensor(group["lr"], dtype=torch.float64)
        gen = torch.Generator().manual_seed(2)
        for step in range(5):
            for n, g in _grads(bag, gen).items():
                getattr(bag, n).grad = g
            opt.step()
            for group in opt.param_groups:
                lr = group["lr"] * 0.5
                group["lr"] = group["lr"].fill_(lr) if tensor_lr else lr
        out.append([p.detach().clone() for p in bag.parameters()])
        st = opt.state[bag.w1]
        assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and float(st["step"]) == 5
        saved = opt.state_dict()["state"][1]["step"]
        assert torch.equal(saved, st["step"]) and saved.data_ptr() != st["step"].data_ptr()
    for p, q in zip(*out):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------


def test_unnamed_parameters_are_refused():
    bag = make_bag([10])
    sel = gk.select_mask(bag, rho=0.5)
    with pytest.raises(TypeError, match="named_parameters"):
        gk.SparseAdamW(bag.parameters(), selection=sel)


def test_selection_must_match_the_model():
    bag = make_bag([10, 20])
    sel = gk.select_mask(bag, rho=0.5)
    other = Bag([torch.randn(10), torch.randn(21)])
    with pytest.raises(ValueError, match=r"'w1' has shape \(21,\).*changed after selection"):
        gk.SparseAdamW(other.named_parameters(), selection=sel)
    extra = Bag([torch.randn(10), torch.randn(20), torch.randn(3)])
    with pytest.raises(ValueError, match=r"'w2' is not in the selection"):
        gk.SparseAdamW(extra.named_parameters(), selection=sel)
    with pytest.raises(TypeError, match="Selection"):
        gk.SparseAdamW(bag.named_parameters(), selection={"w0": torch.tensor([0])})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
        (dict(eps=-1e-8), "epsilon"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_bad_hyperparameters(kw, match):
    bag = make_bag([10])
    sel = gk.select_mask(bag, rho=0.5)
    with pytest.raises(ValueError, match=match):
        gk.SparseAdamW(bag.named_parameters(), selection=sel, **kw)


def test_error_leaves_step_unapplied():
    """A parameter changed after selection fails the step before any weight moves."""
    bag, sel, opt = _setup()
    for p in bag.parameters():
        p.grad = torch.randn(p.shape)
    before = [p.detach().clone() for p in bag.parameters()]
    bag.w2.data = torch.randn(8)
    bag.w2.grad = torch.randn(8)
    with pytest.raises(ValueError, match=r"'w2'.*changed after selection"):
        opt.step()
    assert torch.equal(bag.w0.detach(), before[0]) and torch.equal(bag.w1.detach(), before[1])
    assert not opt.state[bag.w0]


def test_unsupported_dtype():
    bag = Bag([torch.zeros(4, dtype=torch.complex64)])
    sel = gk.Selection({"w0": torch.tensor([1])}, {"w0": (4,)}, rho=0.25, criterion="gallop", scope="global", threshold=0.0)
    with pytest.raises(TypeError, match=r"'w0'.*dtype torch.complex64"):
        gk.SparseAdamW(bag.named_parameters(), selection=sel)


def test_master_weights_switched_off_mid_run():
    """Turning master_weights off re-plans: the master copy is dropped and the bf16 weights
    are updated from themselves, on the kernel as on the reference path."""
    runs = []
    for backend in ("host", "reference"):
        bag, sel, opt = _setup(torch.bfloat16, backend=backend)
        gen = torch.Generator().manual_seed(8)
        for step in range(4):
            if step == 2:
                assert all("master_param" in st for st in opt.state.values() if st)
                opt.master_weights = False
            for n, g in _grads(bag, gen).items():
                getattr(bag, n).grad = g
            opt.step()
        assert all("master_param" not in st for st in opt.state.values())
        runs.append([p.detach().clone() for p in bag.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_add_param_group_joins_the_step(backend):
    """A group added after two steps trains from then on exactly as the same group given to the
    constructor whose parameters had no gradient for those two steps; the first group's step
    counts survive the re-layout."""
    (first, second), hp = GROUPS, dict(betas=(0.8, 0.99), eps=1e-6, backend=backend)
    bags, opts = [], []
    for late in (True, False):
        bag = make_bag(SIZES, torch.float32)
        sel = gk.select_mask(bag, rho=0.1)
        groups = _groups(bag.named_parameters())
        opts.append(gk.SparseAdamW(groups[:1] if late else groups, selection=sel, **hp))
        bags.append(bag)
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        if step == 2:
            opts[0].add_param_group(_groups(bags[0].named_parameters())[1])
        grads = _grads(bags[0], gen)
        for bag, opt in zip(bags, opts):
            opt.zero_grad()
            for n, g in grads.items():
                getattr(bag, n).grad = g if step >= 2 or n in first[0] else None
            opt.step()
    late, early = opts
    for (n, p), q in zip(bags[0].named_parameters(), bags[1].parameters()):
        assert torch.equal(p, q), n
        st_late, st_early = late.state.get(p, {}), early.state.get(q, {})
        assert st_late.keys() == st_early.keys(), n
        for key in st_early:
            assert torch.equal(st_late[key], st_early[key]), (n, key)
    assert {float(st["step"]) for p, st in late.state.items() if late._names[p] in first[0]} == {5.0}
    assert {float(st["step"]) for p, st in late.state.items() if late._names[p] in second[0]} == {3.0}
    assert late.param_groups[1]["lr"] == second[1]["lr"]


def test_add_param_group_refusals_change_nothing():
    bag, sel, opt = _setup()
    other = make_bag([5], torch.float32)
    compact_bag = make_bag(SIZES, torch.float32)
    compact = gk.SparseAdamW(_groups(compact_bag.named_parameters())[:1], selection=sel, compact_grads=True)
    cases = [
        (opt, {"params": [bag.w0]}, TypeError, "needs parameter names"),
        (opt, {"params": [("w0", other.w0)]}, ValueError, "has shape"),
        (opt, {"params": [("x", other.w0)]}, ValueError, "'x' is not in the selection"),
        (opt, {"params": [("w0", compact_bag.w0)], "lr": -1.0}, ValueError, "Invalid learning rate"),
        (compact, _groups(compact_bag.named_parameters())[1], NotImplementedError, "compact gradient buffers"),
    ]
    for o, group, exc, match in cases:
        before = [dict(g) for g in o.param_groups]
        with pytest.raises(exc, match=match):
            o.add_param_group(group)
        assert o.param_groups == before and len(o._names) == sum(len(g["params"]) for g in before)


def test_checkpoint_with_int64_indices_loads_as_int32(monkeypatch):
    """Selections and optimizer states saved when index lists were int64 load into today's int32
    lists and train on exactly as a run with int32 lists throughout."""
    from gallop_kernels import distributed

    keep_lr = types.SimpleNamespace(step=lambda: None)
    monkeypatch.setattr(distributed, "INT32_LIMIT", 0)  # every list int64, as checkpoints before int32 lists
    bag, sel, opt = _setup(amsgrad=True)
    _run(bag, opt, _schedule(opt), 3, torch.Generator().manual_seed(2))
    saved = {"sel": sel.state_dict(), "opt": opt.state_dict(), "bag": bag.state_dict()}
    assert all(i.dtype == torch.int64 for i in saved["sel"]["indices"].values())
    monkeypatch.undo()
    bag2 = make_bag(SIZES)
    bag2.load_state_dict(saved["bag"])
    sel2 = gk.Selection.from_state_dict(saved["sel"])
    opt2 = gk.SparseAdamW(_groups(bag2.named_parameters()), selection=sel2, betas=(0.8, 0.99), eps=1e-6, amsgrad=True)
    opt2.load_state_dict(saved["opt"])
    assert all(st["indices"].dtype == torch.int32 for st in opt2.state.values() if st)
    _run(bag2, opt2, keep_lr, 2, torch.Generator().manual_seed(3))
    ref_bag, _, ref_opt = _setup(amsgrad=True)  # int32 lists throughout
    _run(ref_bag, ref_opt, _schedule(ref_opt), 3, torch.Generator().manual_seed(2))
    _run(ref_bag, ref_opt, keep_lr, 2, torch.Generator().manual_seed(3))
    for (n, p), q in zip(bag2.named_parameters(), ref_bag.parameters()):
        assert torch.equal(p, q), n
