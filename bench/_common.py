"""Shared helpers for the benchmarks in bench/: timing, bytes models, environment, tables.

Nothing here is specific to one op; each bench_*.py builds its own rows.
"""

from __future__ import annotations

import ctypes
import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from gallop_kernels.markdown import table

ROOT = Path(__file__).resolve().parents[1]

# Peak HBM bandwidth, bytes/s. H200 SXM: 4.8 TB/s, NVIDIA H200 datasheet
# (nvidia.com/en-us/data-center/h200). H100 SXM: 3.35 TB/s, NVIDIA H100 datasheet.
# A100 SXM 80GB: 2.039 TB/s, NVIDIA A100 datasheet.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.039e12}
# DRAM access granularity of NVIDIA GPUs: 32-byte sectors (CUDA C++ Best Practices
# Guide, "Coalesced Access to Global Memory"). CPUs move 64-byte cache lines.
SECTOR_BYTES = {"cuda": 32, "cpu": 64}


def sync(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device | str, *, warmup: int = 2, reps: int = 10, min_time_s: float = 0.0):
    """(p50, p20, p80) wall time of ``fn()`` in milliseconds.

    On CUDA each rep is bracketed by CUDA events; on the CPU by perf_counter.
    ``reps`` grows until the total measured time reaches ``min_time_s``.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    total = 0.0
    while len(times) < reps or total < min_time_s * 1e3:
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            ms = start.elapsed_time(stop)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        total += ms
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 28) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of ``nbytes``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    p50, _, _ = bench(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * nbytes / (p50 * 1e-3)


def touched_fraction(rho: float, elem_bytes: int, sector_bytes: int) -> float:
    """Fraction of sectors touched when a fraction ``rho`` of elements is picked at random.

    A sector holds sector_bytes / elem_bytes elements and is fetched whole when
    any of them is picked: 1 - (1 - rho) ** (sector_bytes / elem_bytes).
    """
    return 1.0 - (1.0 - rho) ** (sector_bytes / elem_bytes)


def scattered_bytes(n: int, rho: float, elem_bytes: int, sector_bytes: int) -> float:
    """Bytes moved to read (or write) a random fraction ``rho`` of ``n`` elements, whole sectors."""
    return touched_fraction(rho, elem_bytes, sector_bytes) * n * elem_bytes


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def peak_bandwidth(device: torch.device | str) -> float | None:
    """Datasheet bandwidth of a known GPU, else None."""
    name = device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def environment(device: torch.device | str) -> dict:
    """Device, versions, commit and time: printed with every table."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts), columns in the given order."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    return table(columns, [[r.get(c, "") for c in columns] for r in rows])


def print_report(title: str, rows: list[dict], device, columns: list[str] | None = None, notes: list[str] = ()) -> None:
    """Title, environment line, table and notes, ready to paste into bench/RESULTS.md."""
    env = environment(device)
    print(f"## {title}\n")
    print(", ".join(f"{k}: {v}" for k, v in env.items()) + "\n")
    print(markdown_table(rows, columns))
    for n in notes:
        print(f"\n{n}")
    print()


def time_fn(fn, device: torch.device | str, *, reps: int = 10) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of ``fn()``: triton.testing.do_bench on CUDA (it
    flushes L2 between reps), ``bench`` with perf_counter on the CPU."""
    if torch.device(device).type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    return bench(fn, device, warmup=1, reps=reps)


def _peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def peak_memory(fn, device: torch.device | str) -> int:
    """Peak bytes ``fn()`` allocates beyond what was allocated before the call.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU (Linux):
    growth of the peak resident set size VmHWM, after resetting it to the current
    RSS by writing 5 to /proc/self/clear_refs (Linux >= 4.0), so earlier peaks in the
    process do not hide this one. Pages count when touched; glibc is told to mmap
    every block of 128 KiB or more (mallopt M_MMAP_THRESHOLD), as it otherwise
    raises that threshold up to 32 MiB after frees and serves temporaries from heap
    pages already resident, which RSS would not see. Accurate to a few pages.
    """
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD (malloc.h)
    # Free heap pages left resident by earlier calls would be reused without RSS growth.
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _peak_rss()
    fn()
    return max(0, _peak_rss() - before)
