"""GallopTrainer and gallop_trainer(AnyTrainer): GaLLoP inside 🤗 Trainer and TRL, on tiny Llamas from a config."""

import subprocess
import sys

import pytest
import torch

from gallop_kernels import delta, select_mask
from gallop_kernels.estimate import estimate_gradients
from gallop_kernels.finetune import cli, demo

transformers = pytest.importorskip("transformers")
from gallop_kernels.integrations.transformers import (  # noqa: E402
    DELTA_FILE,
    SELECTION_FILE,
    GallopConfig,
    GallopTrainer,
    gallop_trainer,
)

BATCH = 4


def _data(n: int = 24, seq: int = 16) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": t, "labels": t} for t in demo.toy_batch(gen, batch=n, seq=seq)]


def _args(out, **overrides):
    """TrainingArguments of a few CPU steps; sequential data, so the test knows the batches."""
    kw = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=BATCH, learning_rate=1e-2, logging_steps=1,
              save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential",
              seed=0)
    return transformers.TrainingArguments(**{**kw, **overrides})


def _trained(out, config: GallopConfig, data=None, **overrides) -> GallopTrainer:
    trainer = GallopTrainer(model=demo.make_model(0), args=_args(out, **overrides), train_dataset=data or _data(),
                            gallop_config=config)
    trainer.train()
    return trainer


def _collated(data: list[dict], n: int, size: int = BATCH) -> list[dict]:
    """The trainer's first n batches of ``size`` examples in sequential order (its default collator stacks them)."""
    return [transformers.default_data_collator(data[i * size:(i + 1) * size]) for i in range(n)]


def _assert_same_selection(sel, expected):
    assert set(sel) == set(expected)
    for name in expected:
        assert torch.equal(sel[name].cpu(), expected[name].cpu()), name


def _assert_only_selected_moved(model, base_model, sel) -> int:
    """Unselected weights bit-identical to the base; returns how many weights moved."""
    masks, moved = sel.masks(), 0
    for (name, p), (_, b) in zip(model.named_parameters(), base_model.named_parameters()):
        assert torch.equal(p.detach()[~masks[name]], b.detach()[~masks[name]]), name
        moved += int((p.detach() != b.detach()).sum())
    return moved


@pytest.mark.parametrize("accum", [1, 2], ids=lambda a: f"grad_accum={a}")
def test_selection_is_select_mask_of_the_mean_gradient_of_the_same_batches(tmp_path, accum):
    data = _data()
    trainer = _trained(tmp_path, GallopConfig(rho=0.02, grad_batches=3), data, gradient_accumulation_steps=accum)
    base = demo.make_model(0)
    grads = estimate_gradients(base, _collated(data, 3))
    _assert_same_selection(trainer.gallop_selection, select_mask(base, grads, rho=0.02))
    moved = _assert_only_selected_moved(trainer.model, base, trainer.gallop_selection)
    assert 0 < moved <= trainer.gallop_selection.num_selected
    stats = trainer.gallop_stats
    assert stats["gallop/selected"] == round(0.02 * stats["gallop/total"]) and stats["gallop/grad_batches"] == 3
    # exp_avg and exp_avg_sq, float32, per selected weight (+ a step counter per parameter)
    assert stats["gallop/optimizer_state_bytes"] >= 8 * stats["gallop/selected"]
    assert trainer.state.log_history[0]["gallop/selected"] == stats["gallop/selected"]


def test_the_estimate_recomputes_checkpointed_layers_as_training_does(tmp_path):
    fields = transformers.TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    model, data = demo.make_model(0), _data()
    calls, mlp = [], model.model.layers[0].mlp
    forward = mlp.forward  # wrapped, not hooked: the recomputation ran no forward hooks (torch 2.13)
    mlp.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    trainer = GallopTrainer(model=model, args=_args(tmp_path, max_steps=1, **{name: True}), train_dataset=data,
                            gallop_config=GallopConfig(rho=0.02, grad_batches=2))
    trainer.train()
    assert len(calls) == 2 * (2 + 1)  # forward and recomputation, for 2 estimate batches and 1 training step
    base = demo.make_model(0)  # recomputation gives the same gradients, bit for bit (test_training.py)
    _assert_same_selection(trainer.gallop_selection, select_mask(base, estimate_gradients(base, _collated(data, 2)),
                                                                 rho=0.02))


def test_sparse_adamw_takes_the_trainers_optimizer_arguments_and_no_decay_rule(tmp_path):
    trainer = _trained(tmp_path, GallopConfig(rho=0.02, grad_batches=1, master_weights=True), max_steps=1,
                       learning_rate=3e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert type(opt).__name__ == "SparseAdamW" and opt.selection is trainer.gallop_selection
    assert opt.master_weights is True and all("master_param" in st for st in opt.state.values())
    decay = {}
    for group in opt.param_groups:
        assert (group["initial_lr"], group["betas"], group["eps"]) == (3e-3, (0.8, 0.95), 1e-6)
        decay.update(dict.fromkeys(group["param_names"], group["weight_decay"]))
    no_decay = set(trainer.get_decay_parameter_names(trainer.model)) ^ set(decay)
    assert decay == {n: 0.0 if n in no_decay else 0.1 for n in decay}
    assert no_decay and all("norm" in n for n in no_decay)  # the Llama's RMSNorm weights


def test_grad_fraction_takes_that_share_of_the_first_batches(tmp_path):
    data = _data()  # 6 batches of 4: a fraction 0.4 is 2.4, rounded up to 3
    trainer = _trained(tmp_path, GallopConfig(rho=0.02, grad_fraction=0.4), data, max_steps=1)
    base = demo.make_model(0)
    _assert_same_selection(trainer.gallop_selection, select_mask(base, estimate_gradients(base, _collated(data, 3)),
                                                                 rho=0.02))


class _Recording(GallopTrainer):
    """Records the input ids of every batch its loss is computed on (the estimate's, then the training's), and the
    torch RNG state once the optimizer is built."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen.append(inputs["input_ids"].clone())
        return super().compute_loss(model, inputs, *args, **kwargs)

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        self.rng_after = torch.get_rng_state()
        return opt


def _recorded(out, config: GallopConfig) -> _Recording:
    trainer = _Recording(model=demo.make_model(0), args=_args(out, train_sampling_strategy="random"),
                         train_dataset=_data(), gallop_config=config)
    trainer.seen = []
    trainer.train()
    return trainer


def test_the_estimate_sees_the_first_training_batches_and_leaves_the_rng_alone(tmp_path):
    trainer = _recorded(tmp_path / "gallop", GallopConfig(rho=0.02, grad_batches=2))
    assert len(trainer.seen) == 2 + 3
    for estimated, trained in zip(trainer.seen[:2], trainer.seen[2:4]):
        assert torch.equal(estimated, trained)
    assert not torch.equal(trainer.seen[0], _collated(_data(), 1)[0]["input_ids"])  # the order is random indeed
    # dropout and the rest of training draw from the same RNG state as in a run without an estimate
    free = _recorded(tmp_path / "magnitude", GallopConfig(rho=0.02, criterion="magnitude"))
    assert len(free.seen) == 3 and torch.equal(trainer.rng_after, free.rng_after)


def test_gradient_accumulation_2x2_equals_one_batch_of_4(tmp_path):
    # A data-free criterion gives both runs the same selection, so only the training steps are compared.
    config = GallopConfig(rho=0.05, criterion="magnitude")
    one = _trained(tmp_path / "one", config, per_device_train_batch_size=4)
    two = _trained(tmp_path / "two", config, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    _assert_same_selection(two.gallop_selection, one.gallop_selection)
    # Tolerance: the same per-token losses summed in another order (float32, ~1e-7 relative); AdamW's step
    # lr * m / sqrt(v) turns a relative gradient error d into about lr * d = 1e-9 per step, far below 1e-6.
    for (name, p), (_, q) in zip(one.model.named_parameters(), two.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    base = demo.make_model(0)
    assert _assert_only_selected_moved(two.model, base, two.gallop_selection) > 0


def test_bf16_autocast_on_the_cpu_estimates_and_trains_under_autocast(tmp_path):
    data = _data()
    trainer = _trained(tmp_path, GallopConfig(rho=0.02, grad_batches=2), data, bf16=True, max_steps=2)
    base = demo.make_model(0)

    def loss(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return base(**batch).loss

    expected = select_mask(base, estimate_gradients(base, _collated(data, 2), loss=loss), rho=0.02)
    _assert_same_selection(trainer.gallop_selection, expected)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert _assert_only_selected_moved(trainer.model, base, trainer.gallop_selection) > 0


def test_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path):
    config = GallopConfig(rho=0.05, grad_batches=2)
    # a random data order: resuming must also give the same batches
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, train_sampling_strategy="random")
    full = _trained(tmp_path / "full", config, **settings)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / SELECTION_FILE).is_file()
    resumed = GallopTrainer(model=demo.make_model(0), args=_args(tmp_path / "resumed", **settings),
                            train_dataset=_data(), gallop_config=config)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    _assert_same_selection(resumed.gallop_selection, full.gallop_selection)
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name  # float32 on the CPU: bit for bit
    # the resumed run's delta is from the original base, not from the checkpoint's weights
    resumed.save_model(str(tmp_path / "delta"))
    base = demo.make_model(0)
    delta.apply_delta(base, delta.load_delta(tmp_path / "delta" / DELTA_FILE))
    for (name, p), (_, q) in zip(full.model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), name


def test_resume_from_a_checkpoint_without_a_selection_fails_in_one_line(tmp_path):
    trainer = GallopTrainer(model=demo.make_model(0), args=_args(tmp_path), train_dataset=_data(),
                            gallop_config=GallopConfig())
    with pytest.raises(FileNotFoundError, match=SELECTION_FILE) as e:
        trainer.train(resume_from_checkpoint=str(tmp_path))
    assert "\n" not in str(e.value)


def test_compact_grads_in_the_trainer_equals_dense_gradients(tmp_path):
    # The trainer calls model.zero_grad() after each step and clips through accelerate (max_grad_norm 1e3: the
    # clipping runs but never engages, since dense mode clips by every weight's gradient norm and compact
    # mode can only see the selected ones).
    runs = {compact: _trained(tmp_path / str(compact), GallopConfig(rho=0.05, grad_batches=2, compact_grads=compact),
                              max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                              max_grad_norm=1e3)
            for compact in (False, True)}
    _assert_same_selection(runs[True].gallop_selection, runs[False].gallop_selection)
    # Tolerance: the same gradients, gathered into float32 buffers instead of .grad (float32 too): equal up to the
    # order of the micro-batch sums, ~1e-7 relative, which AdamW turns into ~lr * 1e-7 per step.
    for (name, p), (_, q) in zip(runs[False].model.named_parameters(), runs[True].model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def _tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained on ``texts`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def test_trl_sft_trainer_wrapped_writes_a_delta_that_gallop_apply_turns_into_the_trained_model(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    texts = [f"Question {i}: what is {i} plus {i}? Answer: {2 * i}." for i in range(12)]
    tokenizer = _tokenizer(texts)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=None)
    model = transformers.LlamaForCausalLM(config)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    GallopSFTTrainer = gallop_trainer(trl.SFTTrainer)
    assert GallopSFTTrainer.__name__ == "GallopSFTTrainer" and gallop_trainer(GallopSFTTrainer) is GallopSFTTrainer
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         disable_tqdm=True, max_length=64)
    trainer = GallopSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                               processing_class=tokenizer, gallop_config=GallopConfig(rho=0.05, grad_batches=2))
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    merged = tmp_path / "merged"
    assert cli.main(["apply", "--base", str(base_dir), "--delta", str(tmp_path / "out" / DELTA_FILE),
                     "--out", str(merged)]) == 0
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), merged_model.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    assert _assert_only_selected_moved(merged_model, base, trainer.gallop_selection) > 0


def test_save_merged_also_writes_the_merged_model(tmp_path):
    trainer = _trained(tmp_path, GallopConfig(rho=0.02, grad_batches=1, save_merged=True), max_steps=1)
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / DELTA_FILE).is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), merged.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), name


@pytest.mark.parametrize("fields, message", [
    (dict(rho=0.0), "rho must be a number in (0, 1]"),
    (dict(rho=1.5), "rho must be a number in (0, 1]"),
    (dict(rho=float("nan")), "rho must be a number in (0, 1]"),
    (dict(criterion="fisher"), "unknown criterion 'fisher'"),
    (dict(scope="layer"), "unknown scope 'layer'"),
    (dict(eps=-1.0), "eps must be a finite number >= 0"),
    (dict(grad_batches=0), "grad_batches must be an integer >= 1"),
    (dict(grad_batches=2.5), "grad_batches must be an integer >= 1"),
    (dict(grad_fraction=0.0), "grad_fraction must be a number in (0, 1]"),
    (dict(grad_batches=2, grad_fraction=0.5), "set grad_batches or grad_fraction, not both"),
    (dict(accum_dtype=torch.int32), "accum_dtype must be None or a floating torch dtype"),
    (dict(compact_grads=1), "compact_grads must be True or False"),
    (dict(master_weights="yes"), "master_weights must be None, True or False"),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else "")
def test_bad_gallop_config_fails_in_one_line_naming_the_field(fields, message):
    with pytest.raises(ValueError) as e:
        GallopConfig(**fields)
    text = str(e.value)
    assert text.startswith("GallopConfig: ") and message in text and "\n" not in text


def _refused_before_the_trainer_is_built(monkeypatch, tmp_path, message, args=None, **kwargs):
    def built(*_, **__):
        raise AssertionError("Trainer.__init__ ran before the bad input was refused")

    args = args or _args(tmp_path)
    monkeypatch.setattr(transformers.Trainer, "__init__", built)
    with pytest.raises(ValueError) as e:
        GallopTrainer(model=demo.make_model(0), args=args, train_dataset=_data(), **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_passed_optimizer_is_refused(monkeypatch, tmp_path):
    model = demo.make_model(0)
    opt = torch.optim.AdamW(model.parameters())
    _refused_before_the_trainer_is_built(monkeypatch, tmp_path, "do not pass optimizers=", optimizers=(opt, None))
    _refused_before_the_trainer_is_built(monkeypatch, tmp_path, "do not pass optimizer_cls_and_kwargs=",
                                         optimizer_cls_and_kwargs=(torch.optim.AdamW, {}))


def test_deepspeed_fsdp_several_processes_and_other_optimizers_are_refused(monkeypatch, tmp_path):
    args = _args(tmp_path)
    args.deepspeed = {"zero_optimization": {"stage": 2}}  # TrainingArguments itself needs deepspeed installed
    _refused_before_the_trainer_is_built(monkeypatch, tmp_path, "does not support DeepSpeed yet", args=args)
    _refused_before_the_trainer_is_built(monkeypatch, tmp_path, "does not support FSDP yet",
                                         args=_args(tmp_path, fsdp=True))
    _refused_before_the_trainer_is_built(monkeypatch, tmp_path, "TrainingArguments.optim='sgd'",
                                         args=_args(tmp_path, optim="sgd"))
    monkeypatch.setattr(transformers.TrainingArguments, "world_size", property(lambda self: 2))
    _refused_before_the_trainer_is_built(monkeypatch, tmp_path, "several processes or GPUs yet (world_size 2")


def test_gallop_config_of_another_type_and_other_classes_are_refused(tmp_path):
    with pytest.raises(TypeError, match="gallop_config must be a GallopConfig, got dict"):
        GallopTrainer(model=demo.make_model(0), args=_args(tmp_path), train_dataset=_data(), gallop_config={"rho": 1})
    with pytest.raises(TypeError, match="needs a transformers.Trainer subclass"):
        gallop_trainer(torch.optim.AdamW)


def test_save_model_before_training_says_to_train_first(tmp_path):
    trainer = GallopTrainer(model=demo.make_model(0), args=_args(tmp_path), train_dataset=_data())
    with pytest.raises(RuntimeError, match=r"call train\(\) first"):
        trainer.save_model(str(tmp_path / "out"))


def test_library_imports_without_transformers_and_the_integration_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # import transformers now raises ImportError\n"
        "import gallop_kernels as gk\n"
        "from gallop_kernels import delta, estimate, select, optim, memory\n"
        "assert gk.select_mask and gk.SparseAdamW and gk.estimate_gradients and delta.make_delta\n"
        "try:\n"
        "    import gallop_kernels.integrations.transformers\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["gallop_kernels.integrations.transformers needs transformers and accelerate: "
                                "pip install 'transformers>=4.46' 'accelerate>=1.0'"]
