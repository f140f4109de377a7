"""Selection across ranks: time and bytes each rank sends, FSDP2 shards vs one process.

    python bench/bench_distributed.py [--sizes 1e5 1e6 1e7] [--rho 0.01] [--world 2]

Runs on the CPU with gloo (torch.multiprocessing). Each rank sends one int64
histogram of 2**16 bins (512 KiB) and its share of the boundary bin's candidates:
the bytes should not grow with the model.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _common import bench, fmt_bytes, print_report  # noqa: E402

import gallop_kernels as gk  # noqa: E402


def _model(n: int) -> torch.nn.Module:
    """Four square linear layers holding about n weights, with random gradients."""
    d = max(2, int(math.sqrt(n / 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(4)])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def _worker(rank, world, path, sizes, rho, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    rows = []
    for n in sizes:
        model = _model(n)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        one = bench(lambda: gk.select_mask(model, rho=rho), "cpu", warmup=1, reps=3)[0] if rank == 0 else None
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for name, p in model.named_parameters():  # FSDP2 shards the gradient like the parameter
            p.grad = torch.distributed.tensor.distribute_tensor(grads[name], mesh, p.placements)
        sel = gk.select_mask(model, rho=rho)
        ms = bench(lambda: gk.select_mask(model, rho=rho), "cpu", warmup=1, reps=3)[0]
        if rank == 0:
            total = sum(p.numel() for p in model.parameters())
            rows.append(
                {
                    "N": f"{total:,}",
                    "ranks": world,
                    "rho": rho,
                    "1 process (ms)": f"{one:.1f}",
                    f"{world} ranks (ms)": f"{ms:.1f}",
                    "sent per rank": fmt_bytes(sel.bytes_exchanged),
                }
            )
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    ap.add_argument("--rho", type=float, default=0.01)
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(
            _worker,
            args=(args.world, os.path.join(tmp, "rdzv"), [int(s) for s in args.sizes], args.rho, out),
            nprocs=args.world,
        )
        rows = torch.load(out)
    print_report(
        "select_mask across ranks (FSDP2 shards, gloo)",
        rows,
        "cpu",
        notes=["'sent per rank': bytes one rank contributes to the histogram all-reduce and the candidate all-gather."],
    )


if __name__ == "__main__":
    main()
