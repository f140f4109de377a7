"""Fine-tuning: gradient estimation, GaLLoP (or another criterion) through SparseAdamW, and the baselines.

Every method trains on the same batches for the same number of steps with the
same schedule (linear warm-up, cosine decay) and clipping: ``fft`` is
torch.optim.AdamW on all weights, ``lora`` is peft's LoRA (merged back into the
weights afterwards), and the criteria of ``select_mask`` go through the
sparse path: estimate the mean gradient, select, train with SparseAdamW.

Training runs where the model is, in its dtype: batches are built on the CPU
(a seeded order, the same on every device) and moved per step. On bf16 weights
``fft`` is pure bf16 AdamW (its state bf16 too; fused on CUDA), ``lora``
trains float32 adapters (peft's default), and SparseAdamW keeps a float32
master copy of the selected weights (its default for bf16).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from .. import SparseAdamW, select_mask
from ..delta import selected_values
from ..distributed import gather
from ..errors import GallopError
from ..estimate import GRAD_FRACTION, estimate_gradients, model_device, to_device
from ..memory import LORA_TARGETS
from ..optim.reselect import Moved
from ..reference import GRADIENT_CRITERIA
from ..reselector import Reselector
from . import checkpoint, parallel
from .choices import GRAD_ACCUM_DTYPES, METHODS, SPIEL_ACCUMULATE, SPIEL_EVERY, SPIEL_INITIAL_RATE
from .tasks import TARGETS, Example

IGNORE = -100  # label of positions that carry no loss (the prompt, the padding)
# SpIEL's targets (the public implementation's default for LLaMA-style models): every linear layer of the blocks.
SPIEL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """Hyper-parameters shared by every method."""

    steps: int = 20
    epochs: float | None = None
    """When set (a preset's recipe), the run takes :func:`with_epochs` steps instead of ``steps``."""
    batch_size: int = 8
    lr: float = 1e-4
    warmup: int = 3
    weight_decay: float = 0.0
    clip: float = 1.0
    max_len: int = 256
    seed: int = 0
    grad_fraction: float = GRAD_FRACTION
    """d_s: the share of the training examples the mean gradient is estimated on."""
    rho: float = 0.01
    eps: float = 1e-8
    lora_rank: int = 16
    log_every: int = 5
    target: str = "label"
    """What the model learns to write: "label" (the protocol's reply) or "text" (the answer's text), see tasks.TARGETS."""
    grad_accum_dtype: str = "param"
    """Where the mean gradient is summed: "param" (``.grad``, the weights' dtype) or "float32" (a float32 copy)."""
    compact_grads: bool = False
    """SparseAdamW(compact_grads=True): the sparse methods keep fp32 gradients of the selected weights only."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of keeping them (Hugging Face models)."""
    reselect_every: int = 0
    """GaLLoP re-selection (criterion gallop): every this many steps, select again (0: never; see Reselector)."""
    reselect_batches: int = 1
    """The re-selection's gradient is summed over the last this many training steps (<= reselect_every)."""
    spiel_every: int = SPIEL_EVERY
    """SpIEL (method "spiel"): steps between re-selections (the public implementation's reselection_steps)."""
    spiel_accumulate: int = SPIEL_ACCUMULATE
    """SpIEL: steps whose gradients the regrowth sums (selection_accumulation_steps)."""
    spiel_initial_rate: float = SPIEL_INITIAL_RATE
    """SpIEL: share of the set replaced at step 0, falling linearly to 0 at the last step (initial_reselection_rate)."""
    offload_grads: bool = False
    """Estimate the mean gradient in host memory (estimate_gradients(offload=True)): no dense gradient on the device."""
    parallel: str = "none"
    """Under torchrun: "fsdp" shards the model with FSDP2 (parallel.shard) and splits the rows of each
    batch, the gradient estimation's too, across the ranks; "ddp" splits each batch's rows and the
    gradient estimation's batches (DistributedDataParallel); "none" trains the same model on every rank."""


@dataclass
class TrainResult:
    """What a fine-tuning run reports."""

    method: str
    losses: list[float]
    trainable: int
    seconds: float = 0.0
    selection: object = None
    selected_zero: int | None = None
    """How many selected weights were exactly 0 in the base model (sparse methods)."""
    base_values: dict | None = None
    """The selected weights' values before training (sparse methods): what a delta is the difference from."""
    tuned_values: dict | None = None
    """Under ``parallel="fsdp"`` (sparse methods): the selected weights' values after training, gathered from
    every rank's shards, since the tuned model stays sharded (delta.make_delta's ``tuned_values``)."""
    extra: dict = field(default_factory=dict)


def encode(tokenizer, ex: Example, max_len: int, target: str = "label") -> tuple[list[int], list[int]]:
    """(input ids, labels) of context + reply + EOS for ``target`` (see Example.pair); the loss is on the reply and EOS only."""
    context, answer = ex.pair(target)
    prompt = tokenizer(context, add_special_tokens=False)["input_ids"]
    reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = prompt[-(max_len - len(reply)):]  # keep the end of a long prompt: the choices and the format
    return prompt + reply, [IGNORE] * len(prompt) + reply


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded model inputs from (ids, labels) pairs."""
    width = max(len(ids) for ids, _ in pairs)
    batch = {
        "input_ids": torch.full((len(pairs), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(pairs), width), dtype=torch.long),
        "labels": torch.full((len(pairs), width), IGNORE, dtype=torch.long),
    }
    for i, (ids, labels) in enumerate(pairs):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, :len(ids)] = 1
        batch["labels"][i, :len(ids)] = torch.tensor(labels)
    return batch


def make_batches(tokenizer, examples: list[Example], batch_size: int, n_batches: int, max_len: int,
                 seed: int, target: str = "label") -> list[dict[str, torch.Tensor]]:
    """``n_batches`` CPU batches drawn in epochs over a seeded shuffle of ``examples``.

    The order comes from Python's seeded RNG and the batches are built on the
    CPU, so the same seed and data give the same batches on every device.
    """
    if not examples:
        raise ValueError("no training examples")
    encoded = [encode(tokenizer, ex, max_len, target) for ex in examples]
    rng = random.Random(seed)
    order: list[int] = []
    batches = []
    for _ in range(n_batches):
        while len(order) < batch_size:
            epoch = list(range(len(encoded)))
            rng.shuffle(epoch)
            order += epoch
        take, order = order[:batch_size], order[batch_size:]
        batches.append(collate([encoded[i] for i in take], tokenizer.pad_token_id))
    return batches


def with_epochs(cfg: TrainConfig, n_examples: int) -> TrainConfig:
    """``cfg`` with ``steps`` = ceil(epochs * n_examples / batch_size) when ``epochs`` is set, else ``cfg``."""
    if cfg.epochs is None:
        return cfg
    return replace(cfg, steps=max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size)))


def accum_dtype(name: str) -> torch.dtype | None:
    """The dtype a TrainConfig.grad_accum_dtype name sums gradients in: None ("param": the weights' own)."""
    return None if name == "param" else getattr(torch, name)


def lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    return f


def checkpointing(model, on: bool) -> None:
    """Turn activation (gradient) checkpointing of a Hugging Face model on or off.

    Non-reentrant checkpointing needs no input that requires grad (frozen embeddings under LoRA).
    transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; both are served.
    """
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


def train_loop(model, opt, clip: Callable[[], object], batches: list[dict], cfg: TrainConfig, log=print,
               progress: bool = True, desc: str = "train",
               after_step: Callable[[], object] | None = None) -> list[float]:
    """Train for one step per batch with the shared schedule; returns the loss of every step. The
    gradients are freed at the end.

    ``after_step`` runs after every optimizer step, while the step's gradients are still there."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, len(batches)))
    device = model_device(model)
    if cfg.gradient_checkpointing:
        checkpointing(model, True)
    model.train()
    split = cfg.parallel in ("ddp", "fsdp")
    wrapped = parallel.data_parallel(model) if cfg.parallel == "ddp" else model  # an FSDP2 model is sharded already
    saving = checkpoint.current()  # gallop finetune --save-every / --resume
    start, losses = saving.start(model, opt, sched, log) if saving is not None else (0, [])
    bar = tqdm(batches[start:], desc=desc, disable=not progress, leave=False, initial=start, total=len(batches))
    for step, batch in enumerate(bar, start):  # a resumed run skips the steps made before its checkpoint
        loss = batch_loss(wrapped, batch, device, split)
        opt.zero_grad()
        loss.backward()
        clip()
        opt.step()
        if after_step is not None:
            after_step()
        sched.step()
        losses.append((parallel.average(loss) if split else loss).item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if cfg.log_every and (step % cfg.log_every == 0 or step == len(batches) - 1):
            log(f"  step {step:4d}  loss {losses[-1]:.4f}  lr {sched.get_last_lr()[0]:.2e}")
        if saving is not None:
            saving.after_step(step + 1, model, opt, sched, losses)
    if saving is not None:
        saving.release()
    if cfg.gradient_checkpointing:
        checkpointing(model, False)
    model.zero_grad(set_to_none=True)  # the last step's gradients: not kept through the evaluation
    model.eval()
    return losses


def batch_loss(model, batch: dict, device, split: bool = False) -> torch.Tensor:
    """``model``'s loss on ``batch`` (moved to ``device``). ``split`` (DDP, FSDP2): this rank's rows, the
    loss scaled so that the ranks' averaged gradient is the whole batch's (parallel.my_rows)."""
    if not split:
        return model(**to_device(batch, device)).loss
    rows, divisor = parallel.my_rows(batch, IGNORE)
    return model(**to_device(rows, device), num_items_in_batch=divisor).loss


def count_selected_zeros(model, selection) -> int:
    """How many selected weights are exactly 0 in ``model`` (call before training; an FSDP2 selection:
    in this rank's shards)."""
    params = dict(model.named_parameters())
    return sum(int((gather(params[n].detach(), idx) == 0).sum()) for n, idx in selection.items())


def train_sparse(model, batches: list[dict], grad_batches: list[dict], method: str, cfg: TrainConfig, log=print,
                 progress: bool = True) -> TrainResult:
    """Estimate the mean gradient (criteria that need one), select rho of the weights, train them.

    ``method``: a select_mask criterion, or "spiel": rho of the weights of the linear layers
    SPIEL_TARGETS by |g| (saft), re-selected on SpIEL's schedule (:class:`Reselector`)."""
    frozen = _freeze_all_but(model, SPIEL_TARGETS) if method == "spiel" else []
    try:
        return _train_selected(model, batches, grad_batches, method, cfg, log, progress)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _train_selected(model, batches, grad_batches, method, cfg, log, progress) -> TrainResult:
    """train_sparse on ``model``'s trainable parameters."""
    criterion = "saft" if method == "spiel" else method
    t0 = time.perf_counter()
    saving = checkpoint.current()
    sel = saving.selection() if saving is not None else None  # a resumed run's: no estimation
    made = "the checkpoint's selection" if sel is not None else "select_mask"
    grads_used = sel is None and criterion in GRADIENT_CRITERIA  # the other criteria are data-free
    grads = _mean_gradient(model, grad_batches, cfg, progress) if grads_used else None
    t1 = time.perf_counter()
    group = {"process_group": parallel.group()} if cfg.parallel == "ddp" else {}  # checks that the ranks agree
    if sel is None:
        sel = select_mask(model, grads, rho=cfg.rho, criterion=criterion, eps=cfg.eps, seed=cfg.seed, **group)
    del grads
    zeros = count_selected_zeros(model, sel)
    base = selected_values(model, sel)
    n_selected, n_total = sel.num_selected, sel.num_total
    if cfg.parallel == "fsdp":  # each rank selected in its shards: the log and the report count the whole model's
        zeros, n_selected, n_total = (parallel.total(n) for n in (zeros, n_selected, n_total))
    if saving is not None:  # a resumed run's selection may be a re-selected one: the first one's count is saved
        zeros = saving.first_zeros(zeros)
    where = " in host memory" if cfg.offload_grads else ""
    grad_note = f"gradient over {len(grad_batches)} batches{where} {t1 - t0:.1f} s; " if grads_used else ""
    log(f"  {grad_note}{made} {time.perf_counter() - t1:.1f} s: "
        f"{n_selected:,} of {n_total:,} weights ({100 * n_selected / n_total:.3g}%), "
        f"{zeros:,} of them exactly 0 in the base model")
    opt = SparseAdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], selection=sel, lr=cfg.lr,
                      weight_decay=cfg.weight_decay, compact_grads=cfg.compact_grads)
    resel = _reselector(opt, model, method, cfg, group)
    if saving is not None:
        saving.reselector, saving.base = resel, base  # what the checkpoints save besides the optimizer

    def reselect() -> None:
        if resel.step() is not None:
            _log_reselection(_whole_model(resel.history[-1], cfg), log)

    losses = train_loop(model, opt, lambda: opt.clip_grad_norm_(cfg.clip), batches, cfg, log, progress, method,
                        after_step=None if resel is None else reselect)
    opt.remove_hooks()
    # what the delta covers: the selection, or every weight trained (gallop re-selection), the final set (spiel)
    trained, trained_base = (sel, base) if resel is None else (resel.trained, resel.base_values)
    result = TrainResult(method, losses, n_selected, selection=trained, selected_zero=zeros, base_values=trained_base)
    if resel is not None:
        result.extra["reselections"] = [_whole_model(h, cfg) for h in resel.history]  # a resumed run's too
    if cfg.parallel == "fsdp":  # each rank's shards, gathered into host memory once training is over; the
        # tuned model stays sharded, so the delta's tuned values are gathered with them
        result.selection, result.base_values, result.tuned_values = parallel.full_selection(
            model, trained, trained_base, selected_values(model, trained))
    return result


def _reselector(opt, model, method: str, cfg: TrainConfig, group: dict) -> Reselector | None:
    """SpIEL's schedule for "spiel", GaLLoP re-selection when cfg.reselect_every is set, else None.
    ``group``: select_mask's process_group under ddp (the ranks' re-selections are checked to agree)."""
    if method == "spiel":
        return Reselector(opt, model, every=cfg.spiel_every, accumulate=cfg.spiel_accumulate, method="spiel",
                          total_steps=cfg.steps, initial_rate=cfg.spiel_initial_rate, eps=cfg.eps, **group)
    if cfg.reselect_every:
        return Reselector(opt, model, every=cfg.reselect_every, accumulate=cfg.reselect_batches, eps=cfg.eps,
                          **group)
    return None


def _freeze_all_but(model, targets: tuple[str, ...]) -> list[torch.Tensor]:
    """Stop training every parameter but the weights of the nn.Linear modules named ``targets``
    (the last part of the module name); returns the parameters frozen."""
    keep = {id(m.weight) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets}
    if not keep:
        raise GallopError(f"SpIEL trains the linear layers {', '.join(targets)}; {type(model).__name__} has none")
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _whole_model(entry: dict, cfg: TrainConfig) -> dict:
    """A Reselector history entry over the whole model: under ``parallel="fsdp"`` the counts of every
    rank's shards summed and the share changed recomputed from them; else ``entry``."""
    if cfg.parallel != "fsdp":
        return entry
    moved = Moved(*(parallel.total(entry[k]) for k in Moved._fields))
    return {**entry, **moved._asdict(), "changed": moved.changed}


def _log_reselection(h: dict, log) -> None:
    """One line per re-selection (a history entry): the share of the set it changed and its time."""
    log(f"  step {h['step']:4d}  re-selection: {100 * h['changed']:.2f}% of the set changed "
        f"({h['added']:,} in, {h['dropped']:,} out), {h['seconds']:.2f} s")


def grad_examples(cfg: TrainConfig, n_examples: int) -> int:
    """How many of ``n_examples`` training examples the mean gradient is estimated on (d_s of them, at least 1)."""
    return max(1, round(cfg.grad_fraction * n_examples))


def check_split(cfg: TrainConfig, method: str, n_examples: int | None = None) -> None:
    """GallopError, before any slow work, when ``parallel="fsdp"`` or ``"ddp"`` cannot give every rank its
    share: a row of each batch (training's and the gradient estimation's have ``batch_size`` rows each),
    and under ddp, which deals the gradient estimation's batches whole, one of those batches (checked
    once ``n_examples``, the training examples, is known). The same test on every rank: they all stop."""
    if cfg.parallel == "none":
        return
    if cfg.batch_size < parallel.world():
        raise GallopError(f"--parallel {cfg.parallel} splits each batch across the ranks: --batch-size "
                          f"({cfg.batch_size}) must be at least the number of ranks ({parallel.world()})")
    if n_examples is None or cfg.parallel != "ddp" or method not in GRADIENT_CRITERIA and method != "spiel":
        return
    batches = math.ceil(grad_examples(cfg, n_examples) / cfg.batch_size)
    if batches < parallel.world():
        raise GallopError(f"--parallel ddp needs at least one gradient batch per rank ({parallel.world()} ranks, "
                          f"{batches} batches of --batch-size {cfg.batch_size}): raise --grad-fraction or --n-train")


def _mean_gradient(model, grad_batches: list[dict], cfg: TrainConfig, progress: bool) -> dict[str, torch.Tensor]:
    """estimate_gradients over ``grad_batches``; under ``parallel="ddp"`` each rank takes every world-th
    batch and the ranks' means are averaged, weighted by their batch counts; under ``"fsdp"`` each rank
    takes its rows of every batch (FSDP2 averages the ranks' gradients as in training). Either equals
    one process's mean up to float rounding: the sums are added in another order."""
    if cfg.parallel == "fsdp":  # every rank runs a backward per batch: FSDP2's collectives stay in step
        device = model_device(model)
        return estimate_gradients(model, grad_batches, loss=lambda batch: batch_loss(model, batch, device, True),
                                  accum_dtype=accum_dtype(cfg.grad_accum_dtype), offload=cfg.offload_grads,
                                  progress=progress)
    if cfg.parallel != "ddp":
        return estimate_gradients(model, grad_batches, accum_dtype=accum_dtype(cfg.grad_accum_dtype),
                                  offload=cfg.offload_grads, progress=progress)
    mine = [grad_batches[i] for i in parallel.mine(len(grad_batches))]
    grads = estimate_gradients(model, mine, accum_dtype=accum_dtype(cfg.grad_accum_dtype), offload=cfg.offload_grads,
                               progress=progress)
    share = len(mine) * parallel.world() / len(grad_batches)
    return {n: parallel.average(g * share).to(g.dtype) for n, g in grads.items()}


def adamw(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.AdamW:
    """torch.optim.AdamW as users run it: on the weights in their own dtype (pure bf16 on bf16 weights, state
    included), fused on CUDA."""
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def train_full(model, batches: list[dict], cfg: TrainConfig, log=print, progress: bool = True) -> TrainResult:
    """Full fine-tuning with torch.optim.AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, cfg)
    losses = train_loop(model, opt, lambda: torch.nn.utils.clip_grad_norm_(params, cfg.clip), batches, cfg, log,
                        progress, "fft")
    return TrainResult("fft", losses, sum(p.numel() for p in params))


def lora_model(model, rank: int, use_dora: bool = False):
    """``model`` wrapped by peft's LoRA (or DoRA) at ``rank`` (alpha 2 * rank, no dropout) on memory.LORA_TARGETS.

    The adapters are float32 on a bf16 model (peft's default, ``autocast_adapter_dtype=True``).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM", use_dora=use_dora,
                        target_modules=list(LORA_TARGETS))
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # no module of the model has these names (GPT-2's c_attn, ...)
        raise GallopError(f"LoRA cannot adapt {type(model).__name__}: {str(e).splitlines()[0]} "
                          f"(the baseline adapts {', '.join(LORA_TARGETS)}, as in Llama, Gemma, Mistral, Qwen)") from None


def train_lora(model, batches: list[dict], cfg: TrainConfig, log=print, progress: bool = True, use_dora: bool = False,
               plain: Callable[[], torch.nn.Module] | None = None):
    """LoRA (peft), or DoRA with ``use_dora``, on the DoRA/LLM-Adapters recipe's projections; returns (merged
    model, result). The adapters train in float32 and are merged into the weights in the weights' dtype afterwards.
    Under ``parallel="fsdp"`` the peft model is sharded, and the adapters are gathered into ``plain()``'s (a fresh
    base model) peft model to merge.
    """
    method = "dora" if use_dora else "lora"
    peft_model = _sharded(lora_model(model, cfg.lora_rank, use_dora), cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = adamw(params, cfg)
    losses = train_loop(peft_model, opt, lambda: torch.nn.utils.clip_grad_norm_(params, cfg.clip), batches, cfg,
                        log, progress, method)
    result = TrainResult(method, losses, sum(p.numel() for p in params))
    if cfg.parallel == "fsdp":
        peft_model = parallel.unshard_into(peft_model, lora_model(plain(), cfg.lora_rank, use_dora))
    return peft_model.merge_and_unload(), result


def _sharded(model, cfg: TrainConfig):
    """``model`` sharded with FSDP2 (parallel.shard) under ``parallel="fsdp"`` unless it is already
    (parallel.load_sharded), else ``model``."""
    return parallel.shard(model) if cfg.parallel == "fsdp" and not parallel.is_sharded(model) else model


def finetune(model, tokenizer, train: list[Example], method: str, cfg: TrainConfig, log=print, progress: bool = True,
             plain: Callable[[], torch.nn.Module] | None = None):
    """Fine-tune ``model`` in place on ``train`` with ``method``; returns (tuned model, TrainResult).

    The gradient of the sparse criteria is estimated on the first ``grad_fraction``
    of the training examples, in batches of ``batch_size``. Under ``cfg.parallel="fsdp"``
    ``model`` is sharded for training (unless parallel.load_sharded sharded it already) and the
    tuned model returned is the sharded one; the TrainResult's selection, base and tuned values are
    then the whole model's, as {name: tensor} in host memory (gathered after training). LoRA and
    DoRA there train a whole ``model`` sharded after peft wraps it, and ``plain`` (required for
    them) returns a fresh copy of the base model, not sharded: the tuned model returned is that copy
    with the adapters gathered and merged, whole on every rank.
    """
    if cfg.parallel == "fsdp" and method in ("lora", "dora") and plain is None:
        raise ValueError("parallel='fsdp' with lora or dora needs plain: a function that loads the base model again")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if cfg.target not in TARGETS:
        raise ValueError(f"unknown target {cfg.target!r}; expected one of {', '.join(TARGETS)}")
    if cfg.grad_accum_dtype not in GRAD_ACCUM_DTYPES:
        raise ValueError(f"unknown grad_accum_dtype {cfg.grad_accum_dtype!r}; expected one of {', '.join(GRAD_ACCUM_DTYPES)}")
    if method == "spiel" and not (cfg.spiel_every >= 1 and 1 <= cfg.spiel_accumulate <= cfg.spiel_every
                                  and 0 <= cfg.spiel_initial_rate <= 1 and not cfg.compact_grads):
        raise ValueError(f"spiel needs spiel_every >= 1, 1 <= spiel_accumulate <= spiel_every, spiel_initial_rate in "
                         f"[0, 1] and compact_grads=False; got {cfg.spiel_every}, {cfg.spiel_accumulate}, "
                         f"{cfg.spiel_initial_rate}, {cfg.compact_grads}")
    batches_ok = 1 <= cfg.reselect_batches <= cfg.reselect_every
    if cfg.reselect_every and (method != "gallop" or cfg.compact_grads or not batches_ok):
        raise ValueError(f"reselect_every={cfg.reselect_every} needs method 'gallop', compact_grads=False and "
                         f"1 <= reselect_batches <= reselect_every; got method {method!r}, compact_grads="
                         f"{cfg.compact_grads}, reselect_batches={cfg.reselect_batches}")
    check_split(cfg, method, len(train))
    torch.manual_seed(cfg.seed)  # LoRA's adapter init; the data order has its own seeded RNG
    batches = make_batches(tokenizer, train, cfg.batch_size, cfg.steps, cfg.max_len, cfg.seed, cfg.target)
    if method in ("lora", "dora"):
        return train_lora(model, batches, cfg, log, progress, use_dora=method == "dora", plain=plain)
    model = _sharded(model, cfg)
    if method == "fft":
        result = train_full(model, batches, cfg, log, progress)
    else:
        n_grad = grad_examples(cfg, len(train))
        grad_batches = make_batches(tokenizer, train[:n_grad], cfg.batch_size, math.ceil(n_grad / cfg.batch_size),
                                    cfg.max_len, cfg.seed + 1, cfg.target)
        result = train_sparse(model, batches, grad_batches, method, cfg, log, progress)
    return model, result
