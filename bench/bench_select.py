"""Selection benchmark: select_mask (the public call) against torch.topk on a materialized score.

Criterion gallop, k = round(rho * N), global scope. Inputs (``--sets``): one tensor of N
weights (``1e8``, ``1e9``, ...) or ``llama3-8b``, the 291 parameter shapes of
LLaMA-3-8B (8.03e9 weights); theta and grad in --dtypes. Data (``--data``):

- normal: theta, g ~ N(0, 1);
- llm: theta ~ N(0, 0.02), g ~ N(0, 1e-4), as in a fine-tuned LLM;
- equal: every weight and gradient equal (the k-th key is one huge tie);
- zeros30: normal data with 30% exact zeros in theta and in g.

Providers:

- select_mask: ``gallop_kernels.select_mask`` on a module holding the tensors
  (--backend, default auto: Triton on CUDA, the compiled host passes on the CPU);
  ``plan`` is the backend and the window plan's mode (collect / ties, or miss /
  overflow when it fell back), from a separate traced call of the same backend;
- torch.topk: the fp32 score |g| / (|theta| + eps) materialized over all weights,
  then ``torch.topk(score, k, sorted=False)``; skipped past 2**31 weights (torch
  falls back to a single-block radix select there).

Columns: ms = median (p20-p80); floor ms = the 2-pass floor 2 * (bytes of theta and
grad) + k int64 indices at the measured copy bandwidth (or --bandwidth); %floor =
floor / time; peak = extra memory at peak (CUDA: torch.cuda.max_memory_allocated;
CPU: growth of the peak RSS, see _common.peak_memory).

Usage: python bench/bench_select.py [--device cuda] [--sets 1e8 1e9 8e9 llama3-8b]
       [--dtypes bf16] [--rhos 0.001 0.01 0.1] [--data normal llm equal zeros30]
       [--bandwidth 4.2e12] [--no-memory] [--threads 1] [--backend auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import copy_bandwidth, fmt_bytes, peak_bandwidth, peak_memory, print_report, time_fn  # noqa: E402

import gallop_kernels as gk  # noqa: E402
from gallop_kernels import reference, select  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
PROVIDERS = ("select_mask", "torch.topk")
DATA = ("normal", "llm", "equal", "zeros30")
EPS = 1e-8
INDEX_BYTES = 8  # int64 flat indices
TOPK_LIMIT = 2**31


def llama3_8b_shapes() -> list[tuple[int, ...]]:
    """The 291 parameter shapes of LLaMA-3-8B in named_parameters() order (transformers
    LlamaConfig for meta-llama/Meta-Llama-3-8B: vocab 128256, hidden 4096,
    intermediate 14336, 32 layers, 32 heads, 8 key-value heads of 128, untied lm_head)."""
    vocab, hidden, inter, layers, kv = 128256, 4096, 14336, 32, 8 * 128
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q k v o
             (inter, hidden), (inter, hidden), (hidden, inter),  # gate up down
             (hidden,), (hidden,)]  # input / post-attention RMSNorm
    return [(vocab, hidden)] + layer * layers + [(hidden,), (vocab, hidden)]


def shapes_of(name: str) -> list[tuple[int, ...]]:
    return llama3_8b_shapes() if name == "llama3-8b" else [(int(float(name)),)]


def _fill(t: torch.Tensor, data: str, scale: float, gen) -> None:
    """Fill t in chunks, so that no fp32 temporary of t's size raises the peak."""
    flat = t.view(-1)
    for s in range(0, flat.numel(), 1 << 24):
        part = flat[s : s + (1 << 24)]
        if data == "equal":
            part.fill_(0.5 * scale)
            continue
        x = torch.randn(part.numel(), generator=gen, device=t.device) * scale
        if data == "zeros30":
            x *= torch.rand(part.numel(), generator=gen, device=t.device) >= 0.3
        part.copy_(x)


class Weights(nn.Module):
    """The benchmark's parameters, with their gradients in .grad."""

    def __init__(self, shapes, dtype, device, data: str, seed: int = 0):
        super().__init__()
        gen = torch.Generator(device=device).manual_seed(seed)
        theta_scale, grad_scale = (0.02, 1e-4) if data == "llm" else (1.0, 1.0)
        self.params = nn.ParameterList()
        for shape in shapes:
            p = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            _fill(p.data, data, theta_scale, gen)
            p.grad = torch.empty_like(p)
            _fill(p.grad, data, grad_scale, gen)
            self.params.append(p)


def selector(provider: str, model: Weights, rho: float, backend: str = "auto"):
    """A no-argument function running one selection."""
    if provider == "select_mask":
        return lambda: gk.select_mask(model, rho=rho, backend=backend)
    params = list(model.parameters())
    k = reference.num_to_select(rho, sum(p.numel() for p in params))

    def topk():
        score = torch.cat([reference.score("gallop", p, p.grad, EPS) for p in params])
        return torch.topk(score, k, sorted=False)

    return topk


def plan_mode(model: Weights, rho: float, backend: str = "auto") -> str:
    """The backend and its window plan's mode for this selection (a separate, traced call)."""
    sources = select._sources(select._trainable(model), None, True)[0]
    name = select._pick_backend(backend, sources, False)
    if name == "reference":
        return "reference"
    trace = []
    k = reference.num_to_select(rho, sum(s.numel for s in sources))
    select.topk_function(name)(sources, k, "gallop", EPS, trace=trace)
    return f"{name}: {trace[0].mode if trace else '-'}"


def run(args) -> None:
    device = torch.device(args.device)
    bw = args.bandwidth or copy_bandwidth(device)
    rows = []
    for set_name in args.sets:
        shapes = shapes_of(set_name)
        n = sum(torch.Size(s).numel() for s in shapes)
        for dname in args.dtypes:
            b = DTYPES[dname].itemsize
            for data in args.data:
                try:
                    model = Weights(shapes, DTYPES[dname], device, data)
                except torch.OutOfMemoryError:
                    print(f"{set_name} {dname} {data}: inputs do not fit", file=sys.stderr)
                    continue
                for rho in args.rhos:
                    k = reference.num_to_select(rho, n)
                    floor_ms = 1e3 * (2 * 2 * n * b + k * INDEX_BYTES) / bw
                    for provider in args.providers:
                        row = {"set": set_name, "tensors": len(shapes), "N": f"{n:.2e}", "dtype": dname,
                               "data": data, "rho": rho, "provider": provider}
                        if provider == "torch.topk" and n >= TOPK_LIMIT:
                            rows.append({**row, "ms": "n/a (past 2**31)"})
                            continue
                        try:
                            fn = selector(provider, model, rho, args.backend)
                            p50, p20, p80 = time_fn(fn, device, reps=args.reps)
                            row.update(ms=f"{p50:.2f} ({p20:.2f}-{p80:.2f})", floor_ms=f"{floor_ms:.2f}",
                                       pct_floor=f"{100 * floor_ms / p50:.1f}")
                            if provider == "select_mask":
                                row["plan"] = plan_mode(model, rho, args.backend)
                            if args.memory:
                                extra = peak_memory(fn, device)
                                row["peak"] = fmt_bytes(extra)
                                row["peak/(8k)"] = f"{extra / (INDEX_BYTES * k):.2f}"
                        except torch.OutOfMemoryError:
                            row["ms"] = "OOM"
                        rows.append(row)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    peak = peak_bandwidth(device)
    notes = [
        f"Bandwidth for the floor: {bw / 1e9:.0f} GB/s ({'given' if args.bandwidth else 'measured device copy'})"
        + (f"; datasheet peak {peak / 1e12:.1f} TB/s" if peak else ""),
        f"select_mask backend: {args.backend} (the plan column names the one that ran); "
        f"torch threads: {torch.get_num_threads()}",
        "goal (issue 9, H200): 1e9 bf16 >= 60% of floor and >= 10x torch.topk; 8e9 <= 25 ms; llama3-8b <= 30 ms; "
        "peak <= 8 B per selected weight + 64 MiB",
    ]
    print_report("Selection: select_mask vs torch.topk on a materialized fp32 score", rows, device, notes=notes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sets", nargs="+", help="N values (1e8) or llama3-8b (default: 1e8 1e9 8e9 llama3-8b on CUDA, 1e6 1e7 on CPU)")
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    ap.add_argument("--rhos", nargs="+", type=float, default=[0.001, 0.01, 0.1])
    ap.add_argument("--data", nargs="+", default=["normal"], choices=DATA)
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--bandwidth", type=float, default=None, help="bytes/s for the floor (default: measured copy)")
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions (CUDA: do_bench decides)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory column")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    ap.add_argument("--backend", default="auto", help="select_mask backend: auto, reference, triton or host")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sets is None:
        args.sets = ["1e8", "1e9", "8e9", "llama3-8b"] if args.device.startswith("cuda") else ["1e6", "1e7"]
    run(args)


if __name__ == "__main__":
    main()
