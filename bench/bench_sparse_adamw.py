"""Optimizer-step benchmark: SparseAdamW (compiled kernel) against dense torch.optim.AdamW.

Model: N bf16 weights in T tensors; a random fraction rho of each tensor is
selected. SparseAdamW (the CUDA kernel on a GPU, its host build on the CPU,
fp32 master weights on, the default for bf16) updates the selected weights;
torch.optim.AdamW (fused=True on CUDA, its default foreach path on the CPU)
updates the same model from masked gradients. Columns:

- ms: median step time (p20-p80);
- floor: bytes the step must move at least (see ``floor_bytes``), and
  %floor = (floor / measured copy bandwidth) / time, i.e. the fraction of
  the bandwidth bound this step reaches (dense AdamW: its own floor,
  read p, g, m, v and write p, m, v once);
- state: optimizer-state memory (SparseAdamW: exp_avg, exp_avg_sq and the
  master copy, plus the int64 index list it keeps in ``state["indices"]``),
  and the same per weight of the model (dense bf16 AdamW: 4 B).

A training-step table (``--train``): forward, backward and SparseAdamW step of
a randomly initialised bf16 Llama (TinyLlama-1.1B shape on a GPU), with dense
and with compact gradients. A second table, the host time per step: ``opt.step()`` plus an lr scheduler
step on T small tensors (4096 weights, rho = 1%), timed whole and with the
kernel call stubbed out (what the host does per step: plan checks, gradient
addresses, lr buffer, the custom op call), and that host time per parameter.

Usage: python bench/bench_sparse_adamw.py [--device cuda] [--sizes 22 24] [--rhos 0.001 0.01 0.1]
[--tensors 8 104] [--llama3-8b] [--host-tensors 1 64 291] [--skip-step] [--train tinyllama]
(sizes are log2 N). Prints markdown tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import timeit
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SECTOR_BYTES, bench, copy_bandwidth, fmt_bytes, peak_bandwidth, print_report, scattered_bytes  # noqa: E402

import gallop_kernels as gk  # noqa: E402
from gallop_kernels import backends  # noqa: E402
from gallop_kernels.ops import sparse_adamw as launcher  # noqa: E402

INDEX_BYTES = 4  # int32 flat indices, as Selection stores them in tensors of fewer than 2^31 weights
KERNEL = {"cpu": "host", "cuda": "cuda"}  # SparseAdamW backend that runs the compiled kernel on each device
STATE_BYTES = 4  # fp32 exp_avg / exp_avg_sq / master


def floor_bytes(n: int, k: int, rho: float, b_param: int, b_grad: int, master: bool, sector: int) -> tuple[float, float]:
    """(ideal, sector-aware) bytes of one sparse AdamW step over k of n weights.

    Ideal: k * (index + m, v read+write + [master read+write] + gathered grad +
    param read+write). Sector-aware: the gathered gradient and the param's
    read-modify-write cost whole sectors, for uniformly spread indices
    (performance-facts.md 3.1).
    """
    compact = k * (INDEX_BYTES + 4 * STATE_BYTES + (2 * STATE_BYTES if master else 0))
    ideal = compact + k * (b_grad + 2 * b_param)
    sectored = compact + scattered_bytes(n, rho, b_grad, sector) + 2 * scattered_bytes(n, rho, b_param, sector)
    return ideal, max(ideal, sectored)


def dense_bytes(n: int, b_param: int, b_grad: int, b_state: int) -> int:
    """torch AdamW: read p, g, m, v; write p, m, v."""
    return n * (2 * b_param + b_grad + 4 * b_state)


def make_model(n: int, tensors: int, device, dtype):
    """N random weights and gradients in ``tensors`` tensors, generated on ``device``."""
    sizes = [n // tensors] * tensors
    sizes[-1] += n - sum(sizes)
    return make_shapes([(s,) for s in sizes], device, dtype)


def make_shapes(shapes, device, dtype):
    """Random weights and gradients of the given shapes on ``device``."""
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]
    grads = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    return params, grads


def llama3_8b_shapes() -> list[tuple[int, ...]]:
    """The 291 weight tensors of LLaMA-3-8B (vocab 128256, hidden 4096, 32 layers,
    8 KV heads of 128, MLP 14336, untied embeddings): 8.03e9 weights."""
    h, kv, mlp, vocab = 4096, 1024, 14336, 128256
    layer = [(h, h), (kv, h), (kv, h), (h, h), (mlp, h), (mlp, h), (h, mlp), (h,), (h,)]
    return [(vocab, h)] + layer * 32 + [(h,), (vocab, h)]


def random_selection(params, rho: float, names=None) -> gk.Selection:
    """A uniformly random, sorted index list of round(rho * numel) weights per tensor
    (tensors named ``names``, default w0, w1, ...)."""
    idx, shapes = {}, {}
    for i, p in enumerate(params):
        name = names[i] if names is not None else f"w{i}"
        k = gk.reference.num_to_select(rho, p.numel())
        idx[name] = torch.randperm(p.numel(), device=p.device)[:k].sort().values
        shapes[name] = p.shape
    return gk.Selection(idx, shapes, rho=rho, criterion="random", scope="per_tensor", threshold=None)


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for key, t in st.items() if torch.is_tensor(t) and key not in ("step", "indices"))


def _row(provider, label, tensors, rho, k, ms, p20, p80, ideal, floor, bw, state, n, sector) -> dict:
    return {
        "provider": provider,
        "N": label,
        "tensors": tensors,
        "rho": rho,
        "updated": k,
        "ms (p20-p80)": f"{ms:.3f} ({p20:.3f}-{p80:.3f})",
        "floor ideal": fmt_bytes(ideal),
        f"floor ({sector} B sectors)": fmt_bytes(floor),
        "GB/s at floor": f"{floor / (ms * 1e-3) / 1e9:.2f}",
        "%floor": f"{100 * floor / bw / (ms * 1e-3):.0f}%",
        "state (+index)": fmt_bytes(state),
        "state B/weight": f"{state / n:.3f}",
    }


def run(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not backends()["cuda"]:
        raise SystemExit("the CUDA sparse AdamW kernel is not available here (gallop_kernels.backends())")
    if device.type == "cpu" and not backends()["host"]:
        raise SystemExit("gallop_kernels._C is not built: pip install --no-build-isolation -e .")
    dtype = torch.bfloat16
    sector = SECTOR_BYTES[device.type]
    bw = copy_bandwidth(device)
    peak = peak_bandwidth(device)
    torch.manual_seed(0)
    rows = []
    cases = [(f"2^{log_n}", t, lambda log_n=log_n, t=t: make_model(1 << log_n, t, device, dtype)) for log_n in args.sizes for t in args.tensors]
    if args.llama3_8b:
        cases.append(("LLaMA-3-8B", 291, lambda: make_shapes(llama3_8b_shapes(), device, dtype)))
    for label, tensors, build in cases:
        params, grads = build()
        n = sum(p.numel() for p in params)
        named = [(f"w{i}", p) for i, p in enumerate(params)]
        for j, rho in enumerate(args.rhos):
            sel = random_selection(params, rho)
            k = sel.num_selected
            masks = sel.masks()
            for (name, p), g in zip(named, grads):
                p.grad = g * masks[name]
            del masks
            opt = gk.SparseAdamW(named, selection=sel, lr=1e-4, weight_decay=0.01, backend=KERNEL[device.type])
            ms, p20, p80 = bench(opt.step, device, warmup=1, reps=args.reps)
            ideal, floor = floor_bytes(n, k, rho, 2, 2, master=True, sector=sector)
            st = state_bytes(opt) + k * INDEX_BYTES
            rows.append(_row("gallop SparseAdamW", label, tensors, rho, k, ms, p20, p80, ideal, floor, bw, st, n, sector))
            del opt
            if j == 0 and not args.skip_dense:
                # one dense row per N: its cost does not depend on how many gradients are masked
                fused = device.type == "cuda"
                dense = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=fused or None)
                ms, p20, p80 = bench(dense.step, device, warmup=1, reps=args.dense_reps)
                b = dense_bytes(n, 2, 2, 2)  # torch keeps bf16 states for bf16 params
                name = f"torch AdamW ({'fused' if fused else 'foreach'}, masked grads)"
                rows.append(_row(name, label, tensors, "any", n, ms, p20, p80, b, b, bw, state_bytes(dense), n, sector))
                del dense
            for p in params:
                p.grad = None
        del params, grads
    notes = [
        f"Measured copy bandwidth: {bw / 1e9:.1f} GB/s (read + write of 256 MiB)"
        + (f"; datasheet peak {peak / 1e12:.2f} TB/s." if peak else "."),
        "bf16 weights and gradients; SparseAdamW keeps fp32 exp_avg, exp_avg_sq and master "
        "weights (12 B per selected weight) plus the int64 index; torch AdamW keeps bf16 exp_avg, exp_avg_sq (4 B per weight).",
        f"Floors: ideal counts bytes; the sector-aware floor counts whole {sector}-byte "
        f"{'DRAM sectors' if device.type == 'cuda' else 'cache lines'} for the gathered gradient and the weights' "
        "read-modify-write at random positions. %floor = (floor bytes / copy bandwidth) / time.",
    ]
    print_report(f"Sparse AdamW step, bf16 weights, {device.type}", rows, device, notes=notes)


@contextlib.contextmanager
def stubbed_kernel():
    """The launcher's extension with the step calls replaced by no-ops: what is
    left of opt.step() is its host work."""
    C = launcher.require_ext("the benchmark")
    stub = types.SimpleNamespace(**{k: getattr(C, k) for k in dir(C) if not k.startswith("__")})
    stub.sparse_adamw_step_host = stub.sparse_adamw_step_cuda = lambda *a, **k: None
    real = launcher.require_ext
    launcher.require_ext = lambda op: stub
    try:
        yield
    finally:
        launcher.require_ext = real


def host_us(fn, reps: int, batch: int = 20) -> float:
    """Host wall time of fn() in microseconds: the fastest of ``reps`` batches of
    ``batch`` calls (no device sync: launches are asynchronous). The minimum,
    because on a shared machine the other processes only ever add time."""
    fn()
    return min(timeit.timeit(fn, number=batch) / batch for _ in range(reps)) * 1e6


def host_overhead(args) -> None:
    """Table: step time and host time per step for T small tensors."""
    device = torch.device(args.device)
    rows = []
    for t in args.host_tensors:
        params, grads = make_model(4096 * t, t, device, torch.bfloat16)
        for p, g in zip(params, grads):
            p.grad = g
        sel = random_selection(params, 0.01)
        opt = gk.SparseAdamW([(f"w{i}", p) for i, p in enumerate(params)], selection=sel, lr=1e-4, weight_decay=0.01, backend=KERNEL[device.type])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))

        def step():
            opt.step()
            sched.step()

        ms, p20, p80 = bench(step, device, warmup=2, reps=args.host_reps)
        with stubbed_kernel():
            host = host_us(step, args.host_reps)
        rows.append({
            "tensors": t,
            "step ms (p20-p80)": f"{ms:.3f} ({p20:.3f}-{p80:.3f})",
            "host us/step (kernel stubbed)": f"{host:.1f}",
            "host us/param": f"{host / t:.2f}",
        })
    if len(rows) > 1:
        first, last = args.host_tensors[0], args.host_tensors[-1]
        slope = (float(rows[-1]["host us/step (kernel stubbed)"]) - float(rows[0]["host us/step (kernel stubbed)"])) / (last - first)
        rows.append({"tensors": f"per added tensor ({first} to {last})", "step ms (p20-p80)": "", "host us/step (kernel stubbed)": "",
                     "host us/param": f"{slope:.2f}"})
    notes = [
        "Each step: opt.step() and a LambdaLR step (a new lr every step), 4096 bf16 weights per tensor, rho = 1%, "
        "the same gradient tensors every step. Host time: the same with the extension's step call replaced by a "
        "no-op, fastest of --host-reps batches of 20 steps.",
    ]
    print_report(f"SparseAdamW host time per step, {device.type}", rows, device, notes=notes)


# Llama shapes for the training-step table: TinyLlama-1.1B, and a toy one that runs on a CPU.
TRAIN_SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, batch=4, seq=512),
    "toy": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, batch=2, seq=32),
}


def train_step(args) -> None:
    """Table: a training step (forward, backward, SparseAdamW step) of a randomly
    initialised bf16 Llama, with dense and with compact gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    shape = dict(TRAIN_SHAPES[args.train])
    batch, seq = shape.pop("batch"), shape.pop("seq")
    rows = []
    for compact in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(device=device, dtype=torch.bfloat16)
        named = list(model.named_parameters())
        sel = random_selection([p for _, p in named], 0.01, names=[n for n, _ in named])
        opt = gk.SparseAdamW(named, selection=sel, lr=1e-4, weight_decay=0.01, compact_grads=compact)
        x = torch.randint(shape["vocab_size"], (batch, seq), device=device)

        def step():
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms, p20, p80 = bench(step, device, warmup=2, reps=args.reps)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        rows.append({
            "gradients": "compact" if compact else "dense",
            "params": f"{sum(p.numel() for _, p in named) / 1e9:.2f}e9",
            "batch x seq": f"{batch} x {seq}",
            "step ms (p20-p80)": f"{ms:.1f} ({p20:.1f}-{p80:.1f})",
            "peak": fmt_bytes(peak) if peak is not None else "n/a",
        })
        del model, opt, sel
    base = float(rows[0]["step ms (p20-p80)"].split()[0])
    rows[1]["vs dense"] = f"{float(rows[1]['step ms (p20-p80)'].split()[0]) / base:.3f}x"
    rows[0]["vs dense"] = "1x"
    print_report(f"Training step, {args.train} shape, bf16, rho = 1%, {device.type}", rows, device,
                 notes=["Goal (H200, tinyllama): compact gradients add <= 5% to the step."])


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="log2 N (default: 22 24 on the CPU, 26 28 30 32 on CUDA)")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    ap.add_argument("--tensors", type=int, nargs="+", default=[8], help="numbers of weight tensors N is split into")
    ap.add_argument("--llama3-8b", action="store_true", help="add the 291 LLaMA-3-8B weight shapes (8e9 weights; CUDA)")
    ap.add_argument("--host-tensors", type=int, nargs="+", default=[1, 64, 291], help="tensor counts of the host-time table")
    ap.add_argument("--host-reps", type=int, default=15)
    ap.add_argument("--skip-step", action="store_true", help="only the host-time table")
    ap.add_argument("--train", choices=sorted(TRAIN_SHAPES), help="also the training-step table for this Llama shape")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dense-reps", type=int, default=3)
    ap.add_argument("--skip-dense", action="store_true", help="omit the torch AdamW rows")
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = [26, 28, 30, 32] if args.device.startswith("cuda") else [22, 24]
    if args.llama3_8b and not args.device.startswith("cuda"):
        raise SystemExit("--llama3-8b needs a CUDA device (8e9 bf16 weights and gradients)")
    if any(math.ceil((1 << s) / min(args.tensors)) >= 1 << 31 for s in args.sizes):
        print("note: tensors of 2^31 or more elements: int64 offsets are exercised", file=sys.stderr)
    if not args.skip_step:
        run(args)
    host_overhead(args)
    if args.train:
        train_step(args)


if __name__ == "__main__":
    main()
