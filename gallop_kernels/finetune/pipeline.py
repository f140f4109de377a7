"""The paper's protocol as jobs: fine-tune on task r, evaluate on r (ID) and every other task (OOD) against the vanilla model."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from . import evaluate, models, tasks
from .metrics import collapse_rate, forget_ratio
from .train import TrainConfig, finetune


@dataclass
class JobConfig:
    """What to load and how much of it: the defaults fit the README's ~10 minutes on 2 CPU cores."""

    model: str = models.BUILTIN
    n_train: int = 64
    n_eval: int = 12
    eval_tasks: list[str] = field(default_factory=lambda: list(tasks.TASKS))
    modes: tuple[str, ...] = ("generate",)
    eval_batch_size: int = 16
    max_new_tokens: int = 8
    progress: bool = True


def load_train_and_tests(id_task: str, data: str | None, cfg: JobConfig) -> tuple[str, list, dict[str, list]]:
    """(ID task name, its training examples, {task: test examples}) with the ID task first."""
    if data is not None:
        own = tasks.load_jsonl(data, cfg.n_train, cfg.n_eval)
    else:
        own = tasks.load_task(id_task, cfg.n_train, cfg.n_eval)
    tests = {own.name: own.test}
    for name in cfg.eval_tasks:
        if name != own.name:
            tests[name] = tasks.load_task(name, 0, cfg.n_eval).test
    return own.name, own.train, tests


def run_eval(model, tokenizer, tests: dict[str, list], cfg: JobConfig) -> dict[str, dict[str, dict]]:
    """{mode: {task: result}} for the configured modes."""
    kw = {"batch_size": cfg.eval_batch_size}
    out = {}
    for mode in cfg.modes:
        extra = {"max_new_tokens": cfg.max_new_tokens} if mode == "generate" else {}
        out.update(evaluate.evaluate_tasks(model, tokenizer, tests, modes=(mode,), progress=cfg.progress, **kw, **extra))
    return out


def summarize(vanilla: dict[str, dict], tuned: dict[str, dict], id_task: str, mode: str) -> dict:
    """ID accuracy, OOD accuracies, their mean, Forget Ratio and (generative mode) Collapse Rate."""
    ood = [t for t in tuned if t != id_task]
    acc = {t: r["acc"] for t, r in tuned.items()}
    van = {t: r["acc"] for t, r in vanilla.items()}
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    out = {
        "mode": mode,
        "id_task": id_task,
        "id_acc": acc[id_task],
        "vanilla_id_acc": van[id_task],
        "ood_acc": {t: acc[t] for t in ood},
        "vanilla_ood_acc": {t: van[t] for t in ood},
        "mean_ood": mean([acc[t] for t in ood]),
        "vanilla_mean_ood": mean([van[t] for t in ood]),
    }
    out["forget_ratio"] = forget_ratio(out["vanilla_mean_ood"], out["mean_ood"]) if ood else None
    out["collapse_rate"] = collapse_rate([acc[t] for t in ood]) if ood and mode == "generate" else None
    return out


def strip_replies(results: dict[str, dict[str, dict]], keep: int = 3) -> dict:
    """Results for a report: only the first ``keep`` generated replies per task, as samples."""
    return {m: {t: {k: (v[:keep] if k == "replies" else v) for k, v in r.items()} for t, r in per.items()}
            for m, per in results.items()}


def finetune_job(id_task: str, data: str | None, method: str, train_cfg: TrainConfig, cfg: JobConfig, log=print,
                 vanilla: dict | None = None):
    """Fine-tune one model on one task and evaluate it.

    Returns (report dict, tuned model, tokenizer, TrainResult, vanilla results);
    pass ``vanilla`` back in to reuse the untuned model's results on the same tests.
    """
    t0 = time.perf_counter()
    path = models.resolve(cfg.model, log)
    name, train, tests = load_train_and_tests(id_task, data, cfg)
    model, tokenizer = models.load(path)
    log(f"model {path} ({sum(p.numel() for p in model.parameters()):,} weights); task {name}: "
        f"{len(train)} training examples; {len(tests)} tasks x {cfg.n_eval} test questions")
    if vanilla is None:
        t1 = time.perf_counter()
        vanilla = run_eval(model, tokenizer, tests, cfg)
        log(f"evaluated the vanilla model ({time.perf_counter() - t1:.0f} s)")
    log(f"fine-tuning with {method}: {train_cfg.steps} steps of {train_cfg.batch_size}")
    t1 = time.perf_counter()
    model, result = finetune(model, tokenizer, train, method, train_cfg, log, cfg.progress)
    result.seconds = time.perf_counter() - t1
    log(f"fine-tuned ({result.seconds:.0f} s)")
    t1 = time.perf_counter()
    tuned = run_eval(model, tokenizer, tests, cfg)
    log(f"evaluated the tuned model ({time.perf_counter() - t1:.0f} s)")
    report = {
        "model": str(path),
        "task": name,
        "method": method,
        "train_config": asdict(train_cfg),
        "job_config": asdict(cfg),
        "trainable": result.trainable,
        "selected_zero_in_base": result.selected_zero,
        "losses": result.losses,
        "train_seconds": result.seconds,
        "summary": {m: summarize(vanilla[m], tuned[m], name, m) for m in cfg.modes},
        "vanilla": strip_replies(vanilla),
        "tuned": strip_replies(tuned),
        "seconds": time.perf_counter() - t0,
    }
    return report, model, tokenizer, result, vanilla
