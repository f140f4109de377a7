"""Selection benchmark: GaLLoP top-k selection against torch.topk on a materialized score.

One tensor of N weights (theta and grad in --dtypes), k = round(rho * N), criterion
gallop. Providers:

- gallop: the package's selection (backend "triton" on CUDA, the plain-PyTorch
  reference on the CPU): two streaming passes over theta and grad, no score tensor;
- torch.topk: the fp32 score |g| / (|theta| + eps) materialized, then
  ``torch.topk(score, k, sorted=False)``.

Columns: ms = median (p20-p80); bytes = the provider's traffic model (``moved_bytes``);
%floor = (two-pass floor / bandwidth) / time, where the floor is
2 * (bytes of theta + bytes of grad) + k int64 indices and the bandwidth is --bandwidth
or a measured device copy; peak = extra memory at peak (CUDA:
torch.cuda.max_memory_allocated; CPU: growth of the peak RSS, reset before each
measurement, see _common.peak_memory).

Usage: python bench/bench_select.py [--device cuda] [--sizes 1e6 1e8 1e9] [--dtypes bf16 fp32]
       [--rhos 0.001 0.01 0.1] [--bandwidth 4.3e12] [--no-memory] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import copy_bandwidth, fmt_bytes, peak_bandwidth, peak_memory, print_report, time_fn  # noqa: E402

from gallop_kernels import reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
PROVIDERS = ("gallop", "torch.topk")
EPS = 1e-8
INDEX_BYTES = 8  # int64 flat indices


def make_inputs(n: int, dtype: torch.dtype, device, seed: int = 0):
    """theta and grad of n weights, filled chunk by chunk so that no fp32 temporary
    of size n raises the peak before the measurement."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(2):
        t = torch.empty(n, dtype=dtype, device=device)
        for s in range(0, n, 1 << 24):
            t[s : s + (1 << 24)] = torch.randn(min(1 << 24, n - s), generator=gen, device=device)
        out.append(t)
    return out


def selector(provider: str, theta: torch.Tensor, grad: torch.Tensor, k: int):
    """A no-argument function running one selection."""
    if provider == "gallop":
        if theta.is_cuda:
            from gallop_kernels.ops.select_triton import topk_keys_triton as topk
        else:
            topk = reference.topk_keys
        srcs = [reference.Source("w", theta, grad, 0)]
        return lambda: topk(srcs, k, "gallop", EPS)
    return lambda: torch.topk(reference.score("gallop", theta, grad, EPS), k, sorted=False)


def moved_bytes(provider: str, n: int, k: int, b: int) -> int:
    """Traffic model. gallop: theta and grad read twice, k indices written.
    torch.topk: theta and grad read once, fp32 score written and read at least once
    by the select, k fp32 values and k int64 indices written."""
    if provider == "gallop":
        return 2 * n * 2 * b + k * INDEX_BYTES
    return n * 2 * b + 2 * 4 * n + k * (4 + INDEX_BYTES)


def floor_bytes(n: int, k: int, b: int) -> int:
    """Two-pass floor: 2 * (bytes of theta + bytes of grad) + output indices."""
    return 2 * (n * b + n * b) + k * INDEX_BYTES


def run(args) -> None:
    device = torch.device(args.device)
    bw = args.bandwidth or copy_bandwidth(device)
    rows = []
    for n in (int(float(s)) for s in args.sizes):
        for dname in args.dtypes:
            b = DTYPES[dname].itemsize
            try:
                theta, grad = make_inputs(n, DTYPES[dname], device)
            except torch.OutOfMemoryError:
                print(f"N={n:.0e} {dname}: inputs do not fit", file=sys.stderr)
                continue
            for rho in args.rhos:
                k = reference.num_to_select(rho, n)
                floor = floor_bytes(n, k, b)
                for provider in args.providers:
                    try:
                        p50, p20, p80 = time_fn(selector(provider, theta, grad, k), device, reps=args.reps)
                    except torch.OutOfMemoryError:
                        rows.append({"N": f"{n:.0e}", "dtype": dname, "rho": rho, "provider": provider, "ms": "OOM"})
                        continue
                    moved = moved_bytes(provider, n, k, b)
                    row = {
                        "N": f"{n:.0e}",
                        "dtype": dname,
                        "rho": rho,
                        "provider": provider,
                        "ms": f"{p50:.2f} ({p20:.2f}-{p80:.2f})",
                        "bytes": fmt_bytes(moved),
                        "GB/s": f"{moved / (p50 * 1e-3) / 1e9:.1f}",
                        "%floor": f"{100 * floor / bw / (p50 * 1e-3):.1f}",
                    }
                    if args.memory:
                        row["peak"] = fmt_bytes(peak_memory(selector(provider, theta, grad, k), device))
                    rows.append(row)
            del theta, grad
    peak = peak_bandwidth(device)
    notes = [
        f"Bandwidth for %floor: {bw / 1e9:.0f} GB/s ({'given' if args.bandwidth else 'measured device copy'})"
        + (f"; datasheet peak {peak / 1e12:.1f} TB/s" if peak else ""),
        "gallop = " + ("Triton backend" if device.type == "cuda" else "reference backend (plain PyTorch, CPU)"),
    ]
    print_report("Selection: gallop vs torch.topk on a materialized fp32 score", rows, device, notes=notes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", help="N values, e.g. 1e6 1e8 (default: up to 1e9 on CUDA, 1e7 on CPU)")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    ap.add_argument("--rhos", nargs="+", type=float, default=[0.001, 0.01, 0.1])
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--bandwidth", type=float, default=None, help="bytes/s for %%floor (default: measured copy)")
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions (CUDA: do_bench decides)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory column")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sizes is None:
        args.sizes = ["1e6", "1e7", "1e8", "1e9"] if args.device.startswith("cuda") else ["1e6", "1e7"]
    run(args)


if __name__ == "__main__":
    main()
