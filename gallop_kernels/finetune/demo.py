"""A short GaLLoP run on the CPU with the public API only: ``python -m gallop_kernels.finetune.demo``.

A small Llama built from a config (random weights, no download) learns a toy
language (each token is an affine function of the one before it) while only a
fraction rho of its weights is trained: estimate the mean gradient on a few
batches, select with select_mask, train with SparseAdamW, print the loss.
"""

from __future__ import annotations

import argparse
import time

import torch

from .. import CRITERIA, SparseAdamW, select_mask

VOCAB = 96


def make_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama with random weights, built locally from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def toy_batch(gen: torch.Generator, batch: int = 16, seq: int = 32) -> torch.Tensor:
    """Token sequences that follow next = (5 * prev + 3) mod VOCAB from a random start."""
    tokens = torch.empty(batch, seq, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
    for i in range(1, seq):
        tokens[:, i] = (5 * tokens[:, i - 1] + 3) % VOCAB
    return tokens


def lm_inputs(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs for next-token prediction on ``tokens``."""
    return {"input_ids": tokens, "labels": tokens}


def run(
    rho: float = 0.05, steps: int = 60, lr: float = 1e-2, criterion: str = "gallop", seed: int = 0, log=print
) -> list[float]:
    """Select rho of the weights, train them for ``steps`` steps; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    model = make_model(seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: Llama, {n_params:,} weights (random init, built from a config)")

    t0 = time.perf_counter()
    for _ in range(4):  # the mean gradient of 4 batches accumulates in each parameter's .grad
        (model(**lm_inputs(toy_batch(gen))).loss / 4).backward()
    sel = select_mask(model, rho=rho, criterion=criterion)  # without grads: scores each parameter's .grad
    model.zero_grad(set_to_none=True)
    log(
        f"select_mask: {sel.num_selected:,} of {sel.num_total:,} weights ({100 * sel.density:.2f}%), "
        f"criterion={criterion}, threshold={sel.threshold:.4g}, {time.perf_counter() - t0:.2f} s"
    )
    busiest = sorted(sel.items(), key=lambda kv: -kv[1].numel())[:3]
    log("most selected: " + ", ".join(f"{n} ({i.numel():,})" for n, i in busiest))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SparseAdamW(model.named_parameters(), selection=sel, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    losses = []
    for step in range(steps):
        tokens = toy_batch(gen)
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.4f}")

    masks = sel.masks()
    changed = sum(int((p.detach() != before[n])[~masks[n]].sum()) for n, p in model.named_parameters())
    log(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; unselected weights changed: {changed}")
    return losses


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--criterion", choices=CRITERIA, default="gallop")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run(args.rho, args.steps, args.lr, args.criterion, args.seed)


if __name__ == "__main__":
    main()
