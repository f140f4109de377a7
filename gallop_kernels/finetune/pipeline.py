"""The paper's protocol as jobs: fine-tune on task r, evaluate on r (ID) and every other task (OOD) against the vanilla model.

Stages hand each other dataclasses (JobData, JobResult, Run); every stage logs one line with its
time, the time so far and an estimate of what is left.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from . import models, parallel, tasks
from .metrics import collapse_rate, forget_ratio

if TYPE_CHECKING:  # train imports torch: the command line imports this module before it needs torch
    from .train import TrainConfig, TrainResult

Evaluation = dict[str, dict[str, dict]]
"""{mode: {task: result}} as evaluate.evaluate_tasks returns it."""


@dataclass
class JobConfig:
    """What to load and how much of it: the defaults fit the README's ~10 minutes on 2 CPU cores."""

    model: str = models.BUILTIN
    n_train: int = 64
    n_eval: int = 12
    eval_tasks: list[str] = field(default_factory=lambda: list(tasks.TASKS))
    modes: tuple[str, ...] = ("generate",)
    eval_batch_size: int = 16
    max_new_tokens: int = 32
    decode: str = "beam"
    """Generative mode: "beam" (4 beams, the LLM-Adapters protocol) or "greedy"."""
    extract: str = "protocol"
    """Generative mode: "protocol" (LLM-Adapters' answer extraction) or "lenient"."""
    device: str = "auto"
    """"auto", "cpu" or "cuda": where the model trains and is evaluated (models.resolve_device)."""
    dtype: str = "auto"
    """"auto", "float32" or "bfloat16": the weights' dtype."""
    progress: bool = True


@dataclass
class JobData:
    """The ID task's name and training examples, and the test questions of every evaluated task (ID first)."""

    name: str
    train: list
    tests: dict[str, list]


@dataclass
class JobResult:
    """What :func:`finetune_job` returns: the JSON report, the tuned model and what made it."""

    report: dict
    model: object
    tokenizer: object
    train: TrainResult
    """Losses, selection, the base values of the selected weights."""
    vanilla: Evaluation
    """The untuned model's results; pass them back in to skip that evaluation on the same tests."""


@dataclass
class Run:
    """One run of a sweep: a method on a task, with its hyper-parameters (``rho`` is None for dense methods)."""

    task: str
    method: str
    train_cfg: TrainConfig
    rho: float | None


class Clock:
    """Logs one line per finished stage: how long it took, the time so far, and what is left."""

    def __init__(self, log=print):
        self.log = log
        self.start = self.last = time.perf_counter()

    def stage(self, what: str, left: str = "") -> float:
        """Log ``what`` with its duration; ``left`` says what remains. Returns the duration in seconds."""
        now = time.perf_counter()
        took, self.last = now - self.last, now
        self.log(f"{what} in {took:.0f} s ({now - self.start:.0f} s so far{'; ' + left if left else ''})")
        return took


def load_job_data(id_task: str, data: str | None, cfg: JobConfig) -> JobData:
    """The ID task's training examples and the test questions of it and every evaluated task."""
    if data is not None:
        own = tasks.load_jsonl(data, cfg.n_train, cfg.n_eval)
    else:
        own = tasks.load_task(id_task, cfg.n_train, cfg.n_eval)
    tests = {own.name: own.test}
    for name in cfg.eval_tasks:
        if name != own.name:
            tests[name] = tasks.load_task(name, 0, cfg.n_eval).test
    return JobData(own.name, own.train, tests)


def run_eval(model, tokenizer, tests: dict[str, list], cfg: JobConfig, target: str = "label") -> Evaluation:
    """{mode: {task: result}} for the configured modes; ``target`` is what log-likelihood mode scores."""
    from . import evaluate

    return evaluate.evaluate_tasks(model, tokenizer, tests, modes=cfg.modes, progress=cfg.progress,
                                   batch_size=cfg.eval_batch_size, decode=cfg.decode, extract=cfg.extract,
                                   max_new_tokens=cfg.max_new_tokens, target=target)


def describe_evaluation(cfg: JobConfig, target: str = "label") -> dict[str, str]:
    """{mode: how it was run}, for every report: decoding and extraction, or what log-likelihood scored."""
    beams = "4 beams" if cfg.decode == "beam" else "greedy"
    scored = "the protocol's reply per label" if target == "label" else "each choice's text"
    return {
        "generate": f"{beams}, {cfg.max_new_tokens} new tokens, {cfg.extract} extraction",
        "loglik": f"log-likelihood of {scored}",
    }


def summarize(vanilla: dict[str, dict], tuned: dict[str, dict], id_task: str, mode: str,
              questions: dict[str, int]) -> dict:
    """ID accuracy, OOD accuracies, their mean, Forget Ratio, (generative mode) Collapse Rate, questions per task."""
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
        "questions": dict(questions),
    }
    out["forget_ratio"] = forget_ratio(out["vanilla_mean_ood"], out["mean_ood"]) if ood else None
    out["collapse_rate"] = collapse_rate([acc[t] for t in ood]) if ood and mode == "generate" else None
    return out


def strip_replies(results: Evaluation, keep: int = 3) -> dict:
    """Results for a report: only the first ``keep`` generated replies per task, as samples."""
    return {m: {t: {k: (v[:keep] if k == "replies" else v) for k, v in r.items()} for t, r in per.items()}
            for m, per in results.items()}


def finetune_job(id_task: str, data: str | None, method: str, train_cfg: TrainConfig, cfg: JobConfig, log=print,
                 vanilla: Evaluation | None = None) -> JobResult:
    """Fine-tune one model on one task with ``method`` and evaluate it.

    Pass ``vanilla`` (JobResult.vanilla of an earlier job on the same tests) to reuse the untuned model's results.
    """
    from . import checkpoint
    from .choices import BASELINES
    from .train import check_split, finetune, with_epochs

    clock = Clock(log)
    device, dtype = models.resolve_device(cfg.device, cfg.dtype)
    if not cfg.progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "no progress bars" includes transformers' weight loading
    parallel.on_main(lambda: models.resolve(cfg.model, log))  # under torchrun rank 0 converts the built-in model
    path = models.resolve(cfg.model, log)  # first; the other ranks find it converted
    job_data = load_job_data(id_task, data, cfg)
    train_cfg = with_epochs(train_cfg, len(job_data.train))  # a recipe's epochs, now that the examples are known
    check_split(train_cfg, method, len(job_data.train))  # before the model loads and the vanilla evaluation
    if sharded_run(method, train_cfg):  # each rank reads its shards: the model is never whole on one device
        model, tokenizer = parallel.load_sharded(path, dtype, device), models.load_tokenizer(path)
    else:
        model, tokenizer = models.load(path, dtype, device)
    weights = f"{sum(p.numel() for p in model.parameters()):,} weights, {str(dtype).removeprefix('torch.')} on {device}"
    weights += f", read into the shards of {parallel.world()} ranks" if parallel.is_sharded(model) else ""
    clock.stage(f"loaded {path} ({weights}) "
                f"and task {job_data.name} "
                f"({len(job_data.train)} training examples; {len(job_data.tests)} tasks x {cfg.n_eval} test questions)",
                f"next: evaluate the vanilla model, fine-tune ({train_cfg.steps} steps), evaluate the tuned model"
                if vanilla is None else f"next: fine-tune ({train_cfg.steps} steps), evaluate")
    if train_cfg.parallel == "fsdp" and not sharded_run(method, train_cfg):
        parallel.decoder_layers(model)  # LoRA's whole model: one FSDP2 cannot shard by layers stops here
    eval_seconds = None
    saving = checkpoint.current()  # gallop finetune --save-every / --resume: a resumed run's results are saved
    if vanilla is None and saving is not None:
        vanilla = saving.vanilla
    if vanilla is None:
        vanilla = run_eval(model, tokenizer, job_data.tests, cfg, train_cfg.target)
        eval_seconds = clock.stage("evaluated the vanilla model",
                                   f"next: fine-tune ({train_cfg.steps} steps), then about the same time to evaluate")
    if saving is not None:
        saving.vanilla = vanilla
    log(f"fine-tuning with {method}: {train_cfg.steps} steps of {train_cfg.batch_size}")
    # LoRA under FSDP2: the adapters are gathered into a fresh plain copy, evaluated whole on every rank
    model, result = finetune(model, tokenizer, job_data.train, method, train_cfg, log, cfg.progress,
                             plain=lambda: models.load(path, dtype, device)[0])
    result.seconds = clock.stage(f"fine-tuned with {method}",
                                 f"about {eval_seconds:.0f} s of evaluation left" if eval_seconds is not None else
                                 "next: evaluate the tuned model")
    tuned = run_eval(model, tokenizer, job_data.tests, cfg, train_cfg.target)
    clock.stage("evaluated the tuned model")
    questions = {t: len(exs) for t, exs in job_data.tests.items()}
    report = {
        "model": str(path),
        "task": job_data.name,
        "method": method,
        "rho": None if method in BASELINES else train_cfg.rho,
        "seed": train_cfg.seed,
        "train_config": asdict(train_cfg),
        "job_config": asdict(cfg),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "evaluation": {m: describe_evaluation(cfg, train_cfg.target)[m] for m in cfg.modes},
        "trainable": result.trainable,
        "selected_zero_in_base": result.selected_zero,
        "losses": result.losses,
        "reselections": result.extra.get("reselections"),
        "train_seconds": result.seconds,
        "summary": {m: summarize(vanilla[m], tuned[m], job_data.name, m, questions) for m in cfg.modes},
        "vanilla": strip_replies(vanilla),
        "tuned": strip_replies(tuned),
        "seconds": time.perf_counter() - clock.start,
    }
    return JobResult(report, model, tokenizer, result, vanilla)


def sharded_run(method: str, train_cfg: TrainConfig) -> bool:
    """Whether ``method`` loads, trains and is evaluated on FSDP2 shards (``parallel="fsdp"``, every method
    but LoRA and DoRA, which peft wraps before the model is sharded)."""
    return train_cfg.parallel == "fsdp" and method not in ("lora", "dora")


def run_key(task: str, method: str, rho: float | None, seed: int) -> tuple:
    """What tells the runs of a sweep apart: (task, method, rho, seed)."""
    return task, method, rho, seed


def report_key(report: dict) -> tuple:
    """The run_key of a finished run's report."""
    return run_key(report["task"], report["method"], report["rho"], report["seed"])


def sweep(runs: list[Run], cfg: JobConfig, log=print, done: list[dict] = (), on_run=None) -> list[dict]:
    """Every run in order, the vanilla model evaluated once; returns their reports, in run order.

    ``done``: the reports of runs an interrupted sweep finished (``compare --resume``); those runs
    are skipped, their reports and vanilla results reused. ``on_run(reports)`` is called after each
    run with the reports so far (in run order), so that they can be saved as they come. Logs,
    after each run, the time so far and an estimate of what is left (the mean time of a run
    made here times the runs to go).
    """
    clock = Clock(log)
    earlier = {report_key(r): r for r in done}
    vanilla = next(iter(earlier.values()))["vanilla"] if earlier else None  # the same tests in every run
    reports = {i: earlier[k] for i, run in enumerate(runs)
               if (k := run_key(run.task, run.method, run.rho, run.train_cfg.seed)) in earlier}
    todo = [i for i in range(len(runs)) if i not in reports]
    if reports:
        log(f"{len(reports)} of {len(runs)} runs were finished before: skipped")
    for n, i in enumerate(todo, 1):
        run = runs[i]
        rho = "" if run.rho is None else f" rho={run.rho:g}"
        log(f"run {i + 1} of {len(runs)}: {run.method}{rho} seed {run.train_cfg.seed} on {run.task}")
        job = finetune_job(run.task, None, run.method, run.train_cfg, cfg, log, vanilla=vanilla)
        vanilla = job.vanilla
        reports[i] = job.report
        if on_run is not None:
            on_run([reports[j] for j in sorted(reports)])
        per_run, left = (time.perf_counter() - clock.start) / n, len(todo) - n
        clock.stage(f"run {i + 1} of {len(runs)} done", f"about {per_run * left:.0f} s left" if left else "")
    return [reports[j] for j in sorted(reports)]
