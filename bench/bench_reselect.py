"""SparseAdamW.reselect against one optimizer step and one select_mask.

Inputs: the 291 weight tensors of LLaMA-3-8B with every dimension divided by ``--scale``
(default 16 on the CPU: 31e6 weights; 1 on a GPU: 8.03e9), float32 (CPU) or bf16 (CUDA)
weights and gradients, a global GaLLoP selection at ``--rho`` (default 0.01). The new
selection replaces ``--replace`` (default 0.2) of every tensor's entries: the ones that
stay and the ones that join picked at random.

Rows (median, p20-p80 of ``--reps``):

- reselect: ``opt.reselect(new)``, alternating between the two selections, each call
  moving 20% of the set (the state exists: one step ran before);
- step: one ``opt.step()`` on a steady plan (the step right after a reselect also
  re-plans: the ``reselect + step`` row);
- select_mask: one ``gk.select_mask(model, grads, rho)`` (--backend, default auto).

Goal (issue 19): on a GPU with LLaMA-3-8B shapes, reselect <= select_mask + step.

Usage: python bench/bench_reselect.py [--device cuda] [--scale 16] [--rho 0.01]
       [--replace 0.2] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from _common import print_report, time_fn
from bench_sparse_adamw import llama3_8b_shapes, make_shapes

import gallop_kernels as gk


def scaled_shapes(scale: int) -> list[tuple[int, ...]]:
    """LLaMA-3-8B's 291 weight shapes with every dimension divided by ``scale``."""
    return [tuple(max(1, d // scale) for d in s) for s in llama3_8b_shapes()]


def replaced(sel: gk.Selection, share: float, gen: torch.Generator) -> gk.Selection:
    """``sel`` with ``share`` of each tensor's entries swapped for as many random unselected ones
    (O(k) work per tensor: rejection sampling, not a permutation of the whole tensor)."""
    out = {}
    for name, idx in sel.items():
        n = int(torch.Size(sel.shapes[name]).numel())
        r = min(int(share * idx.numel()), n - idx.numel())
        stay = idx[torch.randperm(idx.numel(), generator=gen)[r:].to(idx.device)]
        join = idx[:0]
        while join.numel() < r:
            cand = torch.randint(n, (2 * r + 16,), generator=gen).to(idx.device)
            join = torch.cat([join, cand[~torch.isin(cand, idx)]]).unique()
        join = join[torch.randperm(join.numel(), generator=gen)[:r].to(idx.device)]
        out[name] = torch.cat([stay, join]).sort().values
    return gk.Selection(out, sel.shapes, rho=sel.rho, criterion=sel.criterion, scope=sel.scope, threshold=None)


def run(args) -> None:
    """Build the model and the two selections, time the three calls, print the table."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params, grads = make_shapes(scaled_shapes(args.scale), device, dtype)
    model = torch.nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"w{i}", p)
    named_grads = {f"w{i}": g for i, g in enumerate(grads)}
    sel = gk.select_mask(model, named_grads, rho=args.rho, backend=args.backend)
    sels = [sel, replaced(sel, args.replace, torch.Generator().manual_seed(0))]
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel, lr=1e-4)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    turn = [0]

    def reselect():
        turn[0] ^= 1
        opt.reselect(sels[turn[0]])

    def reselect_then_step():
        reselect()
        opt.step()

    n, k = sum(p.numel() for p in params), sel.num_selected
    rows = []
    for what, fn in [("reselect", reselect), ("step", opt.step), ("reselect + step (re-plans)", reselect_then_step),
                     ("select_mask", lambda: gk.select_mask(model, named_grads, rho=args.rho, backend=args.backend))]:
        p50, p20, p80 = time_fn(fn, device, reps=args.reps)
        rows.append({"call": what, "ms": f"{p50:.1f} ({p20:.1f}-{p80:.1f})"})
    print_report(f"reselect, LLaMA-3-8B shapes / {args.scale} ({len(params)} tensors, {n:.3g} weights, "
                 f"k = {k:,}, {args.replace:.0%} replaced)", rows, device,
                 notes=["reselect moves the state of all tensors of a device at once (one searchsorted, one "
                        "torch.where per state key); the step after it rebuilds the step plan."])


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--scale", type=int, default=None,
                    help="divide every LLaMA-3-8B dimension by this (default 16 on the CPU, 1 on CUDA)")
    ap.add_argument("--rho", type=float, default=0.01)
    ap.add_argument("--replace", type=float, default=0.2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="auto", help="select_mask backend")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args(argv)
    if args.scale is None:
        args.scale = 1 if args.device.startswith("cuda") else 16
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
