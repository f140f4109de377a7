"""``gallop plan``: what a run holds in memory before it starts, and the memory preflight of finetune and compare.

- :func:`model_config`: the config of "builtin", a folder, a hub id or a preset (no weights read).
- :func:`preflight`: refuses, before any weight is loaded, a run whose memory plan exceeds the device's free memory.
- :func:`measure`: a few training steps of each method on a randomly initialised model of a shape.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..markdown import table
from ..memory import MemoryRow, markdown, memory_plan, preset_config
from . import models
from .choices import BASELINES, ESTIMATING, RESELECTING
from ..errors import GallopError
from .presets import PRESETS
from .train import TrainConfig, accum_dtype

BUDGET_ENV = "GALLOP_MEMORY_BUDGET"
"""Bytes (or "<x>GiB" / "<x>MiB") the preflight takes as the device's free memory, instead of measuring it."""
GIB = 2**30


def model_config(model: str, log=print):
    """The config of ``model``: a preset name, "builtin", a Hugging Face folder or a hub id (its config only)."""
    if model in PRESETS:
        return preset_config(PRESETS[model].shape)
    return models.load_config(models.resolve(model, log))


def plan_rows(config, cfg: TrainConfig, dtype: torch.dtype, world_size: int = 1,
              reselect: str | None = None) -> list[MemoryRow]:
    """memory_plan's rows for the options of ``cfg`` (batch, length, checkpointing, gradient options),
    per GPU of ``world_size``, with a Reselector of kind ``reselect`` (memory_plan's)."""
    return memory_plan(config, rho=cfg.rho, lora_rank=cfg.lora_rank, dtype=dtype,
                       grad_accum_dtype=accum_dtype(cfg.grad_accum_dtype), batch_size=cfg.batch_size,
                       seq_len=cfg.max_len, gradient_checkpointing=cfg.gradient_checkpointing,
                       offload_grads=cfg.offload_grads, world_size=world_size, reselect=reselect)


def reselection(method: str, cfg: TrainConfig) -> str | None:
    """The Reselector ``method`` runs under ``cfg`` (memory_plan's ``reselect``): "spiel", "gallop"
    (--reselect-every) or None."""
    if method in RESELECTING:
        return method
    return "gallop" if cfg.reselect_every else None


def plan_row(config, method: str, cfg: TrainConfig, dtype: torch.dtype, world_size: int = 1,
             ranks: int = 1) -> MemoryRow:
    """The memory_plan row of ``method`` as ``cfg`` trains it, per GPU of ``world_size``; ``ranks``: the
    ranks each batch's rows are dealt to (--parallel fsdp and ddp), so a GPU holds ceil(batch / ranks) rows."""
    per_gpu = replace(cfg, batch_size=-(-cfg.batch_size // ranks))
    full, lora, dense, compact = plan_rows(config, per_gpu, dtype, world_size, reselection(method, cfg))
    if method == "fft":
        return full
    if method == "lora":
        return lora
    if method == "dora":  # LoRA's row: DoRA's magnitude vector per adapted projection is left out
        return replace(lora, method=lora.method.replace("LoRA", "DoRA"))
    row = compact if cfg.compact_grads else dense
    if method not in ESTIMATING:  # data-free criteria estimate no gradient
        row = replace(row, estimation=0, host_estimation=0)
    return replace(row, method=f"{method} rho={cfg.rho:g}" + (", compact grads" if cfg.compact_grads else ""))


def needed(row: MemoryRow, device: torch.device) -> int:
    """Bytes ``row`` needs of ``device``: its peak, plus the host part of offloaded estimation on the CPU."""
    return row.peak + (row.host_estimation if device.type == "cpu" else 0)


def offload_default(config, method: str, cfg: TrainConfig, dtype: torch.dtype, device: torch.device,
                    world_size: int = 1, ranks: int = 1) -> bool:
    """``--offload-grads auto``: estimate in host memory when ``method`` estimates a gradient, runs on
    CUDA, and its plan (per GPU of ``world_size``) with the gradient on the device exceeds the device's
    free memory."""
    if method not in ESTIMATING or device.type != "cuda":
        return False
    budget, _ = device_budget(device)
    on_device = plan_row(config, method, replace(cfg, offload_grads=False), dtype, world_size, ranks)
    return budget is not None and on_device.peak > budget


def _parse_bytes(text: str) -> int:
    units = {"gib": GIB, "mib": 2**20, "kib": 2**10, "b": 1, "": 1}
    t = text.strip().lower()
    number = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(number):]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise GallopError(f"{BUDGET_ENV}={text!r}: expected bytes, or a number with GiB / MiB / KiB") from None


def device_budget(device: torch.device) -> tuple[int | None, str]:
    """(free bytes, where that number comes from) for ``device``; None when it cannot be known."""
    if os.environ.get(BUDGET_ENV):
        return _parse_bytes(os.environ[BUDGET_ENV]), f"${BUDGET_ENV}"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return None, "no /proc/meminfo MemAvailable on this system"


def _fixes(config, method: str, cfg: TrainConfig, dtype: torch.dtype, device: torch.device,
           budget: int, world_size: int, ranks: int) -> tuple[list[str], list[str]]:
    """(the options that would make ``method`` fit in ``budget`` bytes, alone or together; the options tried)."""
    fits = lambda c: needed(plan_row(config, method, c, dtype, world_size, ranks), device) <= budget  # noqa: E731
    options = []
    if method not in (*BASELINES, *RESELECTING) and not cfg.reselect_every and not cfg.compact_grads:
        options.append(("--compact-grads", {"compact_grads": True}))  # re-selection scores the dense gradients
    if method in ESTIMATING and device.type == "cuda" and not cfg.offload_grads:
        options.append(("--offload-grads on", {"offload_grads": True}))
    if not cfg.gradient_checkpointing:
        options.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    found = [flag for flag, change in options if fits(replace(cfg, **change))]
    for batch in range(cfg.batch_size - 1, ranks - 1, -1):  # every rank needs a row
        if fits(replace(cfg, batch_size=batch)):
            found.append(f"--batch-size {batch}")
            break
    if not found and len(options) > 1 and fits(replace(cfg, **{k: v for _, c in options for k, v in c.items()})):
        found.append(" ".join(flag for flag, _ in options))
    return found, [flag for flag, _ in options] + (["a smaller --batch-size"] if cfg.batch_size > ranks else [])


def preflight(config, method: str, cfg: TrainConfig, dtype: torch.dtype, device: torch.device,
              budget: int | None = None, world_size: int = 1, ranks: int = 1) -> str:
    """Raise GallopError when ``method``'s planned peak memory (per GPU of ``world_size`` under FSDP2)
    exceeds the device's free memory.

    ``budget`` (bytes) replaces the measured free memory (``$GALLOP_MEMORY_BUDGET`` too).
    ``world_size`` > 1: the plan per rank under FSDP2 (each rank checks its own device); ``ranks``:
    the ranks each batch's rows are dealt to (see :func:`plan_row`).
    Returns a line for the log: the plan against the budget, or why no check was made.
    """
    row = plan_row(config, method, cfg, dtype, world_size, ranks)
    source = "argument"
    if budget is None:
        budget, source = device_budget(device)
    gib = lambda x: f"{x / GIB:.2f} GiB"  # noqa: E731
    host = f", estimation in host memory {gib(row.host_estimation)}" if row.host_estimation else ""
    gathering = f", gathering the adapters {gib(row.gathering)}" if row.gathering else ""
    parts = f"weights {gib(row.weights)}, estimation {gib(row.estimation)}, training state {gib(row.training)}, " \
            f"activations ~{gib(row.activations)}{host}, evaluation {gib(row.evaluation)}{gathering}; " \
            f"peak in {row.peak_phase}"
    need = needed(row, device)
    if budget is None:
        return f"memory check skipped ({source}); {row.method} plans {gib(need)} ({parts})"
    if need <= budget:
        return f"memory plan: {row.method} needs ~{gib(need)} (peak in {row.peak_phase}) of {gib(budget)} " \
               f"({source}) on {device.type}{host}"
    fixes, tried = _fixes(config, method, cfg, dtype, device, budget, world_size, ranks)
    if fixes:
        hint = "it would fit with " + " or ".join(fixes)
    else:
        hint = (f"none of {', '.join(tried)} makes it fit; " if tried else "") + "use a smaller model or a larger device"
    raise GallopError(f"{row.method} does not fit on {device.type}: it needs ~{gib(need)} ({parts}) but "
                      f"{gib(budget)} is free ({source}), {gib(need - budget)} short; {hint}")


MEASURED = ("fft", "lora", "gallop", "gallop compact")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure_method(config, method: str, device: torch.device, dtype: torch.dtype, cfg: TrainConfig,
                   steps: int = 3) -> dict:
    """Step time, optimizer-step time and peak memory (CUDA only) of ``method`` (one of MEASURED) on a
    randomly initialised model of ``config``: the median over ``steps`` steps after one warm-up step."""
    from transformers import AutoModelForCausalLM

    from .. import SparseAdamW, select_mask
    from ..estimate import estimate_gradients
    from .train import adamw, checkpointing, lora_model

    _reset_peak(device)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if cfg.gradient_checkpointing:
        checkpointing(model, True)
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, config.vocab_size, (cfg.batch_size, cfg.max_len), generator=gen).to(device)
    batch = {"input_ids": tokens, "labels": tokens}
    if method in ("fft", "lora"):
        if method == "lora":
            model = lora_model(model, cfg.lora_rank)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = adamw(params, cfg)
        clip = lambda: torch.nn.utils.clip_grad_norm_(params, cfg.clip)  # noqa: E731
        trainable = sum(p.numel() for p in params)
    else:
        grads = estimate_gradients(model, [batch], accum_dtype=accum_dtype(cfg.grad_accum_dtype),
                                   offload=cfg.offload_grads, progress=False)
        sel = select_mask(model, grads, rho=cfg.rho, eps=cfg.eps, seed=cfg.seed)
        del grads
        opt = SparseAdamW(model.named_parameters(), selection=sel, lr=cfg.lr, compact_grads=method.endswith("compact"))
        clip = lambda: opt.clip_grad_norm_(cfg.clip)  # noqa: E731
        trainable = sel.num_selected
    setup_peak = _peak(device)
    _reset_peak(device)
    step_s, opt_s = [], []
    for _ in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad()
        model(**batch).loss.backward()
        clip()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
    out = {"method": method, "trainable": trainable, "step_ms": 1e3 * sorted(step_s[1:])[steps // 2],
           "opt_step_ms": 1e3 * sorted(opt_s[1:])[steps // 2], "setup_peak": setup_peak, "train_peak": _peak(device)}
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    del model, opt, batch, tokens
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure(config, device: torch.device, dtype: torch.dtype, cfg: TrainConfig, steps: int = 3,
            methods=MEASURED) -> list[dict]:
    """:func:`measure_method` for each of ``methods``, one after the other on the same device."""
    return [measure_method(config, m, device, dtype, cfg, steps) for m in methods]


def measure_markdown(results: list[dict], title: str) -> str:
    """The measurements as a Markdown table; peak memory is "-" off CUDA."""
    gib = lambda x: "-" if x is None else f"{x / GIB:.2f}"  # noqa: E731
    head = [title, "trainable", "step (ms)", "opt.step (ms)", "peak before training (GiB)", "peak in training (GiB)"]
    return table(head, [[r["method"], f"{r['trainable']:,}", f"{r['step_ms']:.1f}", f"{r['opt_step_ms']:.1f}",
                         gib(r["setup_peak"]), gib(r["train_peak"])] for r in results])


def report(model: str, cfg: TrainConfig, device: torch.device, dtype: torch.dtype, measure_steps: int = 0,
           log=print, world_size: int = 1) -> str:
    """The text ``gallop plan`` prints: the memory plan of ``model`` (per GPU with ``world_size`` > 1) and,
    with ``measure_steps``, measurements."""
    config = model_config(model, log)
    dname = str(dtype).removeprefix("torch.")
    shape = f"batch {cfg.batch_size} x {cfg.max_len}" + (", gradient checkpointing" if cfg.gradient_checkpointing else "")
    shape += ", gradient estimated in host memory" if cfg.offload_grads else ""
    shape += f", per GPU of {world_size} (FSDP2 per decoder layer)" if world_size > 1 else ""
    rows = plan_rows(config, cfg, dtype, world_size)
    budget, source = device_budget(device)
    free = f"{budget / GIB:.2f} GiB ({source})" if budget is not None else f"unknown ({source})"
    evaluated = "the sharded model (LoRA: whole)" if world_size > 1 else "the whole model"
    gathering = "; gathering: LoRA's adapters gathered into a reloaded whole copy" if world_size > 1 else ""
    parts = [f"### memory plan: {model}, {dname}, {shape}\n", markdown(rows, title="method"),
             f"\nactivations are an estimate (memory.activation_bytes); evaluation: {evaluated} loaded and "
             f"evaluated{gathering}; peak in: the phase that holds the peak; free on {device.type}: {free}"]
    if measure_steps:
        results = measure(config, device, dtype, cfg, measure_steps)
        parts += [f"\n### measured: {measure_steps} steps after a warm-up, random init, {device.type}, {dname}, {shape}\n",
                  measure_markdown(results, "method")]
    return "\n".join(parts)

