"""End to end on a small transformers model: select_mask + SparseAdamW in real training loops."""

import pytest
import torch

import gallop_kernels as gk
from gallop_kernels.finetune import demo
from gallop_kernels.estimate import estimate_gradients

transformers = pytest.importorskip("transformers")


def test_demo_loss_falls_and_only_selected_weights_move():
    lines = []
    losses = demo.run(rho=0.05, steps=30, log=lines.append)
    assert losses[-1] < 0.5 * losses[0], losses
    assert lines[-1].endswith("unselected weights changed: 0"), lines[-1]


def test_transformers_trainer_accepts_sparse_adamw(tmp_path):
    gen = torch.Generator().manual_seed(0)
    model = demo.make_model(0)
    grads = estimate_gradients(model, [demo.lm_inputs(demo.toy_batch(gen, batch=4))], progress=False)
    sel = gk.select_mask(model, grads, rho=0.02)
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, lr=1e-2)
    data = [{"input_ids": t, "labels": t} for t in demo.toy_batch(gen, batch=16, seq=16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt  # accelerate may wrap it
    masks = sel.masks()
    moved = 0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), n
        moved += int((p.detach() != before[n]).sum())
    assert 0 < moved <= sel.num_selected
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6


def test_estimate_gradients_uses_the_given_loss_and_is_the_same_with_gradient_checkpointing():
    from gallop_kernels.finetune.train import checkpointing

    gen = torch.Generator().manual_seed(0)
    batches = [demo.lm_inputs(demo.toy_batch(gen, batch=4, seq=16)) for _ in range(3)]
    model = demo.make_model(0)
    plain = estimate_gradients(model, batches)
    doubled = estimate_gradients(model, batches, loss=lambda b: 2 * model(**b).loss)
    for name, g in plain.items():
        assert torch.equal(doubled[name], 2 * g), name  # doubling is exact in float32
    model.train()  # Hugging Face models recompute checkpointed layers in train mode only
    checkpointing(model, True)
    recomputed = estimate_gradients(model, batches)
    checkpointing(model, False)
    for name, g in plain.items():
        # The recomputed forward runs the same float32 ops on the same inputs: the same gradient, bit for bit.
        assert torch.equal(recomputed[name], g), name
        assert model.get_parameter(name).grad is None  # returned, not left in .grad


def test_estimate_gradients_under_autocast_around_the_call_or_inside_the_loss_agree():
    gen = torch.Generator().manual_seed(0)
    batches = [demo.lm_inputs(demo.toy_batch(gen, batch=4, seq=16)) for _ in range(2)]
    model = demo.make_model(0)

    def loss(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch).loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        around = estimate_gradients(model, batches)
    inside = estimate_gradients(model, batches, loss=loss)
    plain = estimate_gradients(model, batches)
    for name, g in inside.items():
        assert g.dtype == torch.float32 and torch.equal(around[name], g), name  # the same bf16 forward, bit for bit
    assert any(not torch.equal(plain[n], g) for n, g in inside.items())  # autocast really ran in bf16


def _trainer_run(tmp_path, compact: bool, rho: float, max_grad_norm: float):
    """Trainer (gradient accumulation 2, accelerate's clipping, model.zero_grad after each step) on
    SparseAdamW; returns the model, the optimizer and the grad norms Trainer logged."""
    gen = torch.Generator().manual_seed(0)
    model = demo.make_model(0)
    grads = estimate_gradients(model, [demo.lm_inputs(demo.toy_batch(gen, batch=4))], progress=False)
    sel = gk.select_mask(model, grads, rho=rho)
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, lr=1e-2, compact_grads=compact)
    data = [{"input_ids": t, "labels": t} for t in demo.toy_batch(gen, batch=16, seq=16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"compact={compact}"), max_steps=4, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_grad_norm=max_grad_norm, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    return model, opt, [float(h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]


def test_transformers_trainer_with_compact_grads_equals_dense(tmp_path):
    """With every weight selected, dense clipping (torch's, over the whole .grad) and compact clipping
    (torch's over the compact gradients) see the same entries: Trainer's loop with gradient
    accumulation, clipping and model.zero_grad() must then train the same weights either way.
    Before compact gradients were cleared by model.zero_grad() and seen by torch's clipping, they
    accumulated across steps and were never clipped. float32, same entries, per-tensor norms over
    a different shape: rtol 1e-5."""
    runs = {}
    for compact in (False, True):
        runs[compact] = _trainer_run(tmp_path, compact, rho=1.0, max_grad_norm=0.05)
    (dense, _, dense_norms), (comp, opt, comp_norms) = runs[False], runs[True]
    assert len(comp_norms) == 4 and min(dense_norms) > 0.05, "clipping never engaged: the test would not see it"
    torch.testing.assert_close(comp_norms, dense_norms, rtol=1e-5, atol=0)
    for (n, p), q in zip(dense.named_parameters(), comp.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=n)
    assert all(float(st["step"]) == 4 for st in opt.state.values())
