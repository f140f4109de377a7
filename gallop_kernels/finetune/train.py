"""Fine-tuning: gradient estimation, GaLLoP (or another criterion) through SparseAdamW, and the baselines.

Every method trains on the same batches for the same number of steps with the
same schedule (linear warm-up, cosine decay) and clipping: ``fft`` is
torch.optim.AdamW on all weights, ``lora`` is peft's LoRA (merged back into the
weights afterwards), and the criteria of ``select_mask`` go through the
sparse path: estimate the mean gradient, select, train with SparseAdamW.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import SparseAdamW, select_mask
from ..reference import GRADIENT_CRITERIA
from .choices import METHODS
from .delta import selected_values
from .tasks import Example

IGNORE = -100  # label of positions that carry no loss (the prompt, the padding)


@dataclass
class TrainConfig:
    """Hyper-parameters shared by every method."""

    steps: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    warmup: int = 3
    weight_decay: float = 0.0
    clip: float = 1.0
    max_len: int = 256
    seed: int = 0
    grad_fraction: float = 0.25
    """d_s: the share of the training examples the mean gradient is estimated on."""
    rho: float = 0.01
    eps: float = 1e-8
    lora_rank: int = 16
    log_every: int = 5


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
    extra: dict = field(default_factory=dict)


def encode(tokenizer, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + reply + EOS; the loss is on the reply and EOS only."""
    prompt = tokenizer(ex.prompt(), add_special_tokens=False)["input_ids"]
    reply = tokenizer(ex.target(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
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
                 seed: int) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` batches drawn in epochs over a seeded shuffle of ``examples``."""
    if not examples:
        raise ValueError("no training examples")
    encoded = [encode(tokenizer, ex, max_len) for ex in examples]
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


def estimate_gradients(model: torch.nn.Module, batches: Iterable[dict], *, progress: bool = True,
                       desc: str = "gradient") -> dict[str, torch.Tensor]:
    """The mean loss gradient over ``batches`` (each a dict of model inputs with labels): name -> float32 tensor.

    Micro-batch gradients are summed into float32 buffers as they come, so memory
    does not grow with the number of batches and low-precision weights lose no
    precision; every batch counts equally.
    """
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters() if p.requires_grad}
    count = 0
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] += p.grad.float()
        count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("estimate_gradients needs at least one batch")
    for g in grads.values():
        g /= count
    return grads


def lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    return f


def train_loop(model, opt, clip: Callable[[], object], batches: list[dict], cfg: TrainConfig, log=print,
               progress: bool = True, desc: str = "train") -> list[float]:
    """Train for one step per batch with the shared schedule; returns the loss of every step."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, len(batches)))
    model.train()
    losses = []
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False)
    for step, batch in enumerate(bar):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        clip()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if cfg.log_every and (step % cfg.log_every == 0 or step == len(batches) - 1):
            log(f"  step {step:4d}  loss {losses[-1]:.4f}  lr {sched.get_last_lr()[0]:.2e}")
    model.eval()
    return losses


def count_selected_zeros(model, selection) -> int:
    """How many selected weights are exactly 0 in ``model`` (call before training)."""
    params = dict(model.named_parameters())
    return sum(int((params[n].detach().reshape(-1)[idx] == 0).sum()) for n, idx in selection.items())


def train_sparse(model, batches: list[dict], grad_batches: list[dict], criterion: str, cfg: TrainConfig, log=print,
                 progress: bool = True) -> TrainResult:
    """Estimate the mean gradient (criteria that need one), select rho of the weights, train them."""
    t0 = time.perf_counter()
    grads_used = criterion in GRADIENT_CRITERIA  # the other criteria are data-free
    grads = estimate_gradients(model, grad_batches, progress=progress) if grads_used else None
    t1 = time.perf_counter()
    sel = select_mask(model, grads, rho=cfg.rho, criterion=criterion, eps=cfg.eps, seed=cfg.seed)
    del grads
    zeros = count_selected_zeros(model, sel)
    base = selected_values(model, sel)
    grad_note = f"gradient over {len(grad_batches)} batches {t1 - t0:.1f} s; " if grads_used else ""
    log(f"  {grad_note}select_mask {time.perf_counter() - t1:.1f} s: "
        f"{sel.num_selected:,} of {sel.num_total:,} weights ({100 * sel.density:.3g}%), "
        f"{zeros:,} of them exactly 0 in the base model")
    opt = SparseAdamW(model.named_parameters(), selection=sel, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = train_loop(model, opt, lambda: opt.clip_grad_norm_(cfg.clip), batches, cfg, log, progress, criterion)
    return TrainResult(criterion, losses, sel.num_selected, selection=sel, selected_zero=zeros, base_values=base)


def train_full(model, batches: list[dict], cfg: TrainConfig, log=print, progress: bool = True) -> TrainResult:
    """Full fine-tuning with torch.optim.AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = train_loop(model, opt, lambda: torch.nn.utils.clip_grad_norm_(params, cfg.clip), batches, cfg, log,
                        progress, "fft")
    return TrainResult("fft", losses, sum(p.numel() for p in params))


def train_lora(model, batches: list[dict], cfg: TrainConfig, log=print, progress: bool = True, use_dora: bool = False):
    """LoRA (peft) on the attention and MLP projections, or DoRA with ``use_dora``; returns (merged model, result)."""
    from peft import LoraConfig, get_peft_model

    method = "dora" if use_dora else "lora"
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                        use_dora=use_dora,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"])
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = train_loop(peft_model, opt, lambda: torch.nn.utils.clip_grad_norm_(params, cfg.clip), batches, cfg,
                        log, progress, method)
    return peft_model.merge_and_unload(), TrainResult(method, losses, sum(p.numel() for p in params))


def finetune(model, tokenizer, train: list[Example], method: str, cfg: TrainConfig, log=print, progress: bool = True):
    """Fine-tune ``model`` in place on ``train`` with ``method``; returns (tuned model, TrainResult).

    The gradient of the sparse criteria is estimated on the first ``grad_fraction``
    of the training examples, in batches of ``batch_size``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    batches = make_batches(tokenizer, train, cfg.batch_size, cfg.steps, cfg.max_len, cfg.seed)
    if method == "fft":
        return model, train_full(model, batches, cfg, log, progress)
    if method in ("lora", "dora"):
        return train_lora(model, batches, cfg, log, progress, use_dora=method == "dora")
    n_grad = max(1, round(cfg.grad_fraction * len(train)))
    grad_batches = make_batches(tokenizer, train[:n_grad], cfg.batch_size, math.ceil(n_grad / cfg.batch_size),
                                cfg.max_len, cfg.seed + 1)
    return model, train_sparse(model, batches, grad_batches, method, cfg, log, progress)
