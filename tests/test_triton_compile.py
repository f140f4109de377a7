"""Every selection kernel compiles ahead of time for sm_80 and sm_90, without spills.

No GPU needed: triton.compile lowers to PTX for a GPUTarget and ptxas reports the
registers and spills (CompiledKernel.n_regs / n_spills are filled only when the
binary is loaded on a device). The compiles run in a subprocess without
TRITON_INTERPRET (under the interpreter @triton.jit gives functions that cannot
be compiled). Run this file as a script for a markdown table of the figures.

Kernels: the window plan's count and emission (ops/select_triton.py) and the
histogram fallback's (ops/select_histogram.py).
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest
import triton
from triton.backends.compiler import GPUTarget

from gallop_kernels.ops import select_histogram as sh
from gallop_kernels.ops import select_triton as st

PTXAS = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
# Largest shared memory one block may use: A100 163 KB, H100/H200 227 KB
# (CUDA C++ Programming Guide, "Compute Capabilities" table).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Window kernels: the collect emission may take up to 80 registers (3 blocks of 8
# warps per SM, 37.5% occupancy), the count and the ties emission at most 64 (50%).
WINDOW_REGISTERS = {("_count_kernel", None): 64, ("_emit_kernel", True): 64, ("_emit_kernel", False): 80}
HISTOGRAM_MODES = ["collect", "low", "above", "ties"]
DTYPES = ["fp32", "bf16", "fp16"]
_T = {"int64": "*i64", "int32": "*i32"}


def variants():
    """(criterion, theta dtype, grad dtype) the launchers can pass: an unread tensor is
    replaced by the read one, so only gallop mixes two dtypes."""
    out = [("gallop", t, g) for t in DTYPES for g in DTYPES]
    out += [("saft", d, d) for d in DTYPES] + [(c, d, d) for c in ("magnitude", "pafi") for d in DTYPES]
    return out


def buffer_dtypes(name: str) -> tuple[str, ...]:
    """dtypes of the window kernels' tensor arguments other than theta_like/grad_like,
    in order: what the launcher passes (test_select_triton checks it) and what is compiled here."""
    table = ("int64", "int32")  # per-source table, program -> source
    if name == "_count_kernel":
        return table + ("int32",)
    return table + ("int64", "int64", "int32", "int32", "int64", "int64")  # out, out_dst, quota, cand_*


def _compile_window(name, criterion, theta, grad, cc, ties, aligned):
    """triton.compile a window kernel as the launcher specializes it: 16-byte aligned
    tensors, ALIGNED for contiguous aligned sources (else table strides)."""
    kernel = getattr(st, name)
    names = kernel.arg_names
    tensors = [a for a in names if a.endswith("_ptr")]
    sig = dict(zip(tensors, (_T[d] for d in buffer_dtypes(name))))
    sig.update(theta_like=f"*{theta}", grad_like=f"*{grad}", eps="fp32", lo="i32", hi="i32")
    const = {"CRITERION": criterion, "ALIGNED": aligned, "BLOCK": st.BLOCK}
    if ties is not None:
        const["TIES"] = ties
    sig.update({k: "constexpr" for k in const})
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in tensors + ["theta_like", "grad_like"]}
    src = triton.compiler.ASTSource(kernel, {a: sig[a] for a in names}, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": st.NUM_WARPS})


def _compile_histogram(name, criterion, theta, grad, cc, mode=None, strided=False):
    """triton.compile one fallback kernel as its launcher specializes it: 16-byte aligned
    pointers, unit strides as constants and n a multiple of 16; or (strided) int64
    strides, n, position and program bases, as past 2**31 elements."""
    kernel = sh._histogram_kernel if name == "histogram" else sh._emit_kernel
    names = kernel.arg_names
    sig = {a: "*i64" for a in names if a.endswith("_ptr")}
    sig.update(theta_ptr=f"*{theta}", grad_ptr=f"*{grad}", n="i64" if strided else "i32", eps="fp32")
    const = {"CRITERION": criterion, "BLOCK": sh.BLOCK}
    if strided:
        sig.update(theta_stride="i64", grad_stride="i64")
    else:
        const.update(theta_stride=1, grad_stride=1)
    if kernel is sh._histogram_kernel:
        const["HALF"] = sh._HALF
    else:
        wide = "i64" if strided else "i32"  # Python ints past 2**31 reach Triton as i64
        sig.update(key_buf_ptr="*i32", base=wide, prog0=wide, lo="i32", hi="i32")
        const["MODE"] = mode
    sig.update({k: "constexpr" for k in const})
    aligned = [a for a in names if a.endswith("_ptr")] + ([] if strided else ["n"])
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(kernel, {a: sig[a] for a in names}, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": sh.NUM_WARPS})


def ptxas_report(ptx: str, cc: int) -> dict:
    """Registers, spill bytes and stack frame from ``ptxas -v``."""
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"  # triton targets sm_90a on Hopper
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([PTXAS, "-v", "--gpu-name", arch, path, "-o", os.devnull], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    num = lambda pat: int(re.search(pat, r.stderr).group(1))  # noqa: E731
    return {
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack": num(r"(\d+) bytes stack frame"),
    }


WINDOW = [("_count_kernel", None), ("_emit_kernel", False), ("_emit_kernel", True)]
# (family, kernel, mode, criterion, theta, grad, cc, strided): every variant of the
# window kernels aligned and, for gallop, strided; the fallback's variants on sm_90
# and its strided gallop variant on both.
JOBS = [("window", k, m, *v, cc, False) for k, m in WINDOW for v in variants() for cc in (80, 90)]
JOBS += [("window", k, m, "gallop", t, g, cc, True) for k, m in WINDOW for t, g in (("bf16", "bf16"), ("fp32", "fp16"))
         for cc in (80, 90)]
HISTOGRAM = [("histogram", None)] + [("emit", m) for m in HISTOGRAM_MODES]
JOBS += [("histogram", k, m, *v, 90, False) for k, m in HISTOGRAM for v in variants()]
JOBS += [("histogram", k, m, "gallop", "bf16", "fp32", cc, True) for k, m in HISTOGRAM for cc in (80, 90)]


def figures(job) -> dict:
    """Compile one job; the facts the tests check."""
    family, kernel, mode, criterion, theta, grad, cc, strided = job
    if family == "window":
        c = _compile_window(kernel, criterion, theta, grad, cc, mode, not strided)
    else:
        c = _compile_histogram(kernel, criterion, theta, grad, cc, mode, strided)
    ptx = c.asm["ptx"]
    return {
        "job": list(job),
        "shared": c.metadata.shared,
        **ptxas_report(ptx, cc),
        "ftz": ".ftz" in ptx,
        "div_rn": "div.rn.f32" in ptx,
        "div_approx": "div.full.f32" in ptx or "div.approx" in ptx,
        "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v[24]\.b32", ptx)),
        "setp_s64": "setp.lt.s64" in ptx,
        # 64-bit block offsets (program - first program) * BLOCK, and flat index * stride
        "block_offset_64": bool(re.search(rf"shl\.b64\s+%rd\d+, %rd\d+, {int(math.log2(st.BLOCK))};", ptx)),
        "stride_mul_64": "mul.lo.s64" in ptx,
        "atomics": bool(re.search(r"\b(atom|red)\.", ptx)),
        "neg_f32": "neg.f32" in ptx,
        "sub_f32": bool(re.search(r"sub(\.rn)?\.f32", ptx)),
    }


def _all_figures() -> list[dict]:
    with ProcessPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(figures, JOBS))


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's gallop_kernels
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return {tuple(f["job"]): f for f in json.loads(r.stdout)}


needs_ptxas = pytest.mark.skipif(not os.path.exists(PTXAS), reason="needs ptxas (CUDA toolkit)")


def _id(job):
    family, kernel, mode, criterion, theta, grad, cc, strided = job
    return "-".join(str(x) for x in (kernel.strip("_"), mode, criterion, theta, grad, cc) if x is not None) + (
        "-strided" if strided else "")


@needs_ptxas
@pytest.mark.parametrize("job", JOBS, ids=_id)
def test_compiles_within_limits(compiled, job):
    f = compiled[job]
    family, kernel, mode, criterion, theta, grad, cc, strided = job
    assert f["shared"] <= SMEM_LIMIT[cc]
    assert f["spill_stores"] == f["spill_loads"] == f["stack"] == 0, f
    assert not f["ftz"]  # flushing subnormal scores to zero would change their keys
    if criterion == "gallop":
        assert f["div_rn"] and not f["div_approx"]
    if criterion == "pafi":  # 0 - |x|, not -|x|, which would give -0.0 a key of its own
        assert f["sub_f32"] and not f["neg_f32"]
    if family == "window":
        assert f["registers"] <= WINDOW_REGISTERS[kernel, mode], f
        assert not f["atomics"]  # per-program counts and prefix offsets only
        assert f["block_offset_64"]  # offsets past 2**31 elements
        if strided:
            assert f["stride_mul_64"]
        else:  # 16-byte loads: contiguous sources through multiple_of hints
            assert f["vector_loads"]
    elif strided:
        assert f["setp_s64"]  # offs < n compares 64-bit offsets
    else:  # 16-byte loads: the unit stride reached the compiler as a constant
        assert f["vector_loads"]


if __name__ == "__main__":
    rows = _all_figures()
    if sys.argv[1:] == ["--json"]:
        print(json.dumps(rows))
    else:
        print("| kernel | criterion | theta/grad | arch | layout | registers | shared (B) | spills (B) |")
        print("|---|---|---|---|---|---|---|---|")
        for f in rows:
            family, kernel, mode, criterion, theta, grad, cc, strided = f["job"]
            name = kernel.strip("_") + ("" if mode is None else f" ({'ties' if mode is True else 'collect' if mode is False else mode})")
            layout = "strided" if strided else "contiguous"
            print(
                f"| {family}: {name} | {criterion} | {theta}/{grad} | sm_{cc} | {layout} "
                f"| {f['registers']} | {f['shared']} | {f['spill_stores'] + f['spill_loads']} |"
            )
