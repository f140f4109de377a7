"""SparseAdamW(compact_grads=True): gradients gathered in backward, dense .grad freed at once."""

import copy

import pytest
import torch
from torch import nn

import gallop_kernels as gk
from gallop_kernels.optim.compact_grads import CompactGrad

BACKENDS = ["auto", "reference"]


def _mlp(layers=4, width=48, seed=0):
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods)


def _selection(model, rho, width=48):
    x = torch.randn(16, width, dtype=next(model.parameters()).dtype)
    model(x).float().pow(2).mean().backward()
    sel = gk.select_mask(model, rho=rho)
    model.zero_grad(set_to_none=True)
    return sel


def _train(model, opt, steps, micro_batches, clip, clear=lambda model, opt: opt.zero_grad(), width=48, seed=1):
    """transformers.Trainer's order: backward per micro-batch, clip (returns the norm), step,
    then clear the gradients; returns the norms."""
    gen = torch.Generator().manual_seed(seed)
    norms = []
    for _ in range(steps):
        for _ in range(micro_batches):
            x = torch.randn(8, width, generator=gen)
            y = torch.randn(8, width, generator=gen)
            (nn.functional.mse_loss(model(x), y) / micro_batches).backward()
        norms.append(float(clip()))
        opt.step()
        clear(model, opt)
    return norms


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_equals_dense_with_accumulation_and_clipping(backend):
    model = _mlp()
    sel = _selection(model, rho=0.05)
    dense, compact = model, copy.deepcopy(model)
    init = {n: p.detach().clone() for n, p in dense.named_parameters()}
    kw = dict(selection=sel, lr=1e-2, weight_decay=0.01, backend=backend)
    o_dense = gk.SparseAdamW(dense.named_parameters(), **kw)
    o_compact = gk.SparseAdamW(compact.named_parameters(), compact_grads=True, **kw)
    n_dense = _train(dense, o_dense, 20, 3, clip=lambda: o_dense.clip_grad_norm_(0.05))
    n_compact = _train(compact, o_compact, 20, 3, clip=lambda: o_compact.clip_grad_norm_(0.05))
    assert n_dense == n_compact
    assert max(n_dense) > 0.05, "clipping never engaged: the test would not see it"
    for (n, p), q in zip(dense.named_parameters(), compact.parameters()):
        # float32: accumulating gathered entries adds the same numbers in the same order
        assert torch.equal(p, q), n
        assert not torch.equal(p, init[n]) or sel[n].numel() == 0, n


def test_backward_leaves_no_dense_grad_and_micro_batches_accumulate():
    model = _mlp(layers=2)
    sel = _selection(model, rho=0.1)
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, compact_grads=True)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 48)
    for _ in range(2):
        model(x).sum().backward()
        ref(x).sum().backward()
    assert all(type(p.grad) is CompactGrad and p.grad.shape == p.shape for p in model.parameters())
    got = {n: opt._compact.grad(p) for n, p in model.named_parameters()}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p.grad.reshape(-1)[sel[n]], rtol=0, atol=0)
    assert opt.grad_bytes() == 4 * sel.num_selected
    opt.zero_grad(set_to_none=False)
    assert all(not opt._compact.grad(p).any() for p in model.parameters()) and opt.grad_bytes() == 4 * sel.num_selected
    opt.zero_grad()
    assert opt.grad_bytes() == 0


def test_clip_grad_norm_is_torch_clipping_of_the_selected_entries():
    model = _mlp(layers=2)
    sel = _selection(model, rho=0.1)
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel)
    model(torch.randn(4, 48)).sum().backward()
    masks = sel.masks()
    masked = [(p.grad * masks[n]).clone() for n, p in model.named_parameters()]
    holders = [nn.Parameter(torch.zeros_like(g)) for g in masked]
    for h, g in zip(holders, masked):
        h.grad = g
    want = torch.nn.utils.clip_grad_norm_(holders, 0.1)
    got = opt.clip_grad_norm_(0.1)
    assert float(want) > 0.1, "no clipping: the comparison below would be trivial"
    torch.testing.assert_close(got, want)
    for (n, p), h in zip(model.named_parameters(), holders):
        torch.testing.assert_close(p.grad * masks[n], h.grad)


def test_amp_overflow_in_compact_grads_skips_the_step():
    """GradScaler cannot see compact gradients; the optimizer checks them itself under AMP."""
    model = _mlp(layers=2)
    sel = _selection(model, rho=0.1)
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, compact_grads=True)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(4, 48)).sum() * float("inf")).backward()
    opt.step(grad_scale=torch.tensor([1024.0]), found_inf=torch.tensor([0.0]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(float(st["step"]) == 0 for st in opt.state.values())
    opt.zero_grad()
    (model(torch.randn(4, 48)).sum() * 1024.0).backward()
    opt.step(grad_scale=torch.tensor([1024.0]), found_inf=torch.tensor([0.0]))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peak_gradient_memory(dtype):
    """Peak bytes held by gradients during backward over 2 micro-batches of an 8-layer MLP.

    Dense: every gradient of the model at once. Compact: one dense gradient (the
    largest tensor) plus 4 bytes per selected weight.
    """
    width, layers, rho = 128, 8, 0.01
    peaks = {}
    for compact in (False, True):
        model = _mlp(layers=layers, width=width).to(dtype)
        sel = _selection(model, rho=rho, width=width) if not compact else peaks["sel"]
        holder = {}
        peak = [0]

        def measure(p):  # registered before the optimizer's hook: sees p.grad before it is freed
            peak[0] = max(peak[0], holder["opt"].grad_bytes())

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(measure)
        holder["opt"] = gk.SparseAdamW(model.named_parameters(), selection=sel, compact_grads=compact)
        for _ in range(2):
            model(torch.randn(4, width, dtype=dtype)).float().pow(2).mean().backward()
        holder["opt"].step()
        peaks[compact] = peak[0]
        peaks["sel"] = sel
        params = list(model.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    largest = max(p.numel() * p.element_size() for p in params)
    compact_bound = largest + 4 * peaks["sel"].num_selected
    assert peaks[False] == total
    assert peaks[True] <= compact_bound
    # the expected factor: all gradients vs one tensor's plus the compact buffers
    assert peaks[False] / peaks[True] >= total / compact_bound > 3


def _amp_run(compact: bool):
    """A 2-layer MLP, SparseAdamW on 10% of it, a GradScaler growing every 2 steps, a data generator."""
    model = _mlp(layers=2, width=32)
    sel = _selection(model, rho=0.1, width=32)
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, compact_grads=compact, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2)
    return model, opt, scaler, torch.Generator().manual_seed(4)


def _amp_steps(compact: bool, step) -> tuple[list, list[torch.Tensor]]:
    """Six steps of :func:`_amp_run` (step 2's loss overflows): after each scaled backward,
    ``step(model, opt, scaler)`` steps and returns what to record. Checks that the overflow step was
    skipped; returns (the records, the final weights)."""
    model, opt, scaler, gen = _amp_run(compact)
    records = []
    for i in range(6):
        loss = model(torch.randn(4, 32, generator=gen)).pow(2).mean() * (1e38 if i == 2 else 1.0)
        scaler.scale(loss).backward()
        records.append(step(model, opt, scaler))
    assert all(float(st["step"]) == 5 for st in opt.state.values()), "the overflow step was not skipped"
    return records, [p.detach().clone() for p in model.parameters()]


def test_grad_scaler_dense_and_compact_agree():
    """torch.amp.GradScaler drives SparseAdamW through grad_scale/found_inf; with compact
    gradients through opt.amp_step(scaler). An overflow step is skipped in both."""

    def step(model, opt, scaler):
        if opt._compact is not None:
            opt.amp_step(scaler)  # steps and updates the scale
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        return scaler.get_scale()

    out = {compact: _amp_steps(compact, step) for compact in (False, True)}
    assert out[False][0] == out[True][0] and out[False][0][2] < out[False][0][1]
    for p, q in zip(out[False][1], out[True][1]):
        assert torch.equal(p, q)


def test_hook_costs_at_most_two_ops_per_parameter():
    """Backward with compact_grads runs at most 2 more torch ops per parameter than
    without (a gather, and an add or cast into the buffer): no per-hook overhead beyond."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for compact in (False, True):
        model = _mlp(layers=4).to(torch.bfloat16)
        sel = _selection(model, rho=0.1)
        opt = gk.SparseAdamW(model.named_parameters(), selection=sel, compact_grads=compact)
        x = torch.randn(8, 48, dtype=torch.bfloat16)
        model(x).float().sum().backward()  # first micro-batch: fills the buffers
        opt.zero_grad(set_to_none=False)
        with Count() as c:
            model(x).float().sum().backward()  # an accumulating micro-batch
        counts[compact] = c.ops
    params = len(list(model.parameters()))
    assert counts[True] - counts[False] <= 2 * params, counts


CLEARS = {
    "model.zero_grad()": lambda model, opt: model.zero_grad(),
    "model.zero_grad(set_to_none=False)": lambda model, opt: model.zero_grad(set_to_none=False),
    "opt.zero_grad()": lambda model, opt: opt.zero_grad(),
    "opt.zero_grad(set_to_none=False)": lambda model, opt: opt.zero_grad(set_to_none=False),
    "p.grad = None": lambda model, opt: [setattr(p, "grad", None) for p in model.parameters()],
}


@pytest.mark.parametrize("clear", list(CLEARS), ids=list(CLEARS))
def test_every_way_of_clearing_clears_compact_grads(clear):
    """Trainer's loop with compact gradients (torch's clip_grad_norm_ on model.parameters(), any way of
    clearing) equals the dense loop clipped by the selected entries: float32, same entries in the same
    order, so equal up to the norm's rounding (per-tensor vector_norm vs foreach norm): rtol 1e-6."""
    model = _mlp()
    sel = _selection(model, rho=0.05)
    dense, compact = model, copy.deepcopy(model)
    kw = dict(selection=sel, lr=1e-2, weight_decay=0.01)
    o_dense = gk.SparseAdamW(dense.named_parameters(), **kw)
    o_compact = gk.SparseAdamW(compact.named_parameters(), compact_grads=True, **kw)
    n_dense = _train(dense, o_dense, 4, 2, clip=lambda: o_dense.clip_grad_norm_(0.05), clear=CLEARS[clear])
    n_compact = _train(compact, o_compact, 4, 2, clip=lambda: torch.nn.utils.clip_grad_norm_(compact.parameters(), 0.05),
                       clear=CLEARS[clear])
    assert min(n_dense) > 0.05, "clipping never engaged: the test would not see it"
    torch.testing.assert_close(n_compact, n_dense, rtol=1e-6, atol=0)
    for (n, p), q in zip(dense.named_parameters(), compact.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("foreach", [None, True, False], ids=lambda f: f"foreach={f}")
def test_torch_clip_grad_norm_clips_the_compact_grads(foreach):
    """torch.nn.utils.clip_grad_norm_ on the model (what accelerate calls) returns the norm of the selected
    entries and scales them, as dense clipping of the selected entries does; clip_grad_value_ clamps them."""
    model = _mlp(layers=2)
    sel = _selection(model, rho=0.1)
    ref = copy.deepcopy(model)
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, compact_grads=True)
    x = torch.randn(4, 48)
    model(x).sum().backward()
    ref(x).sum().backward()
    masks = sel.masks()
    holders = [nn.Parameter(torch.zeros_like(p)) for p in ref.parameters()]
    for h, (n, p) in zip(holders, ref.named_parameters()):
        h.grad = (p.grad * masks[n]).clone()
    want = torch.nn.utils.clip_grad_norm_(holders, 0.1, foreach=foreach)
    got = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1, foreach=foreach)
    assert float(want) > 0.1, "no clipping: the comparison below would be trivial"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for (n, p), h in zip(model.named_parameters(), holders):
        torch.testing.assert_close(opt._compact.grad(p), h.grad.reshape(-1)[sel[n]], rtol=1e-6, atol=0, msg=n)
    torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3, foreach=foreach)
    torch.nn.utils.clip_grad_value_(holders, 1e-3, foreach=foreach)
    for (n, p), h in zip(model.named_parameters(), holders):
        assert torch.equal(opt._compact.grad(p), h.grad.reshape(-1)[sel[n]]), n


def test_grad_scaler_unscale_and_step_see_compact_grads():
    """Trainer's fp16 path: scaler.unscale_(opt), torch clip, scaler.step(opt), scaler.update() with
    compact gradients equals the same calls with dense ones, overflow step skipped in both."""

    def step(model, opt, scaler):
        scaler.unscale_(opt)
        norm = float(opt.clip_grad_norm_(10.0) if opt._compact is None else
                     torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0))
        scaler.step(opt)
        scaler.update()
        model.zero_grad()
        return norm

    out = {compact: _amp_steps(compact, step) for compact in (False, True)}
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=0, equal_nan=True)  # step 2 overflows
    for p, q in zip(out[False][1], out[True][1]):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_other_ops_on_a_compact_grad_raise_naming_what_works():
    model = _mlp(layers=2)
    sel = _selection(model, rho=0.1)
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, compact_grads=True)
    model(torch.randn(4, 48)).sum().backward()
    g = model[0].weight.grad
    assert "selected entries" in repr(g)
    for bad in (lambda: g.sum(), lambda: g * 2, lambda: g.clone(), lambda: g.norm(dim=0)):
        with pytest.raises(RuntimeError, match="clip_grad_norm_.*remove_hooks"):
            bad()
    with pytest.raises(RuntimeError, match="create_graph"):
        model(torch.randn(4, 48)).sum().backward(create_graph=True)
    opt.remove_hooks()
    assert all(p.grad is None for p in model.parameters())
    model(torch.randn(4, 48)).sum().backward()
    assert all(type(p.grad) is torch.Tensor for p in model.parameters())


def test_assigned_grad_replaces_the_compact_one():
    """A .grad set by hand replaces backward's compact gradient (as it would a dense one) and is stepped."""
    model = _mlp(layers=2)
    sel = _selection(model, rho=0.1)
    ref = copy.deepcopy(model)
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, compact_grads=True, lr=1e-2)
    o_ref = gk.SparseAdamW(ref.named_parameters(), selection=sel, lr=1e-2)
    model(torch.randn(4, 48)).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        p.grad = q.grad = torch.randn_like(p)
    opt.step()
    o_ref.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_a_foreign_compact_grad_is_refused():
    model = _mlp(layers=2)
    sel = _selection(model, rho=0.1)
    first = gk.SparseAdamW(model.named_parameters(), selection=sel, compact_grads=True)
    model(torch.randn(4, 48)).sum().backward()
    second = gk.SparseAdamW(model.named_parameters(), selection=sel)
    with pytest.raises(ValueError, match="compact gradient of another SparseAdamW"):
        second.step()
    first.zero_grad()
    model(torch.randn(4, 48)).sum().backward()
    assert type(model[0].weight.grad) is CompactGrad  # first's hooks still gather
