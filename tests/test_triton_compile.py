"""Every selection kernel compiles ahead of time for sm_80 and sm_90, without spills.

No GPU needed: triton.compile lowers to PTX for a GPUTarget and ptxas reports the
registers and spills (CompiledKernel.n_regs / n_spills are filled only when the
binary is loaded on a device). The compiles run in a subprocess without
TRITON_INTERPRET (under the interpreter @triton.jit gives functions that cannot
be compiled). Run this file as a script for a markdown table of the figures.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile

import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from gallop_kernels.ops import select_triton as st  # noqa: E402

PTXAS = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
# Largest shared memory one block may use: A100 163 KB, H100/H200 227 KB
# (CUDA C++ Programming Guide, "Compute Capabilities" table).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MODES = ["collect", "low", "above", "ties"]
DTYPES = ["fp32", "bf16", "fp16"]


def variants():
    """(criterion, theta dtype, grad dtype) the launcher can pass: an unread tensor is
    replaced by the read one, so only gallop mixes two dtypes."""
    out = [("gallop", t, g) for t in DTYPES for g in DTYPES]
    out += [("saft", d, d) for d in DTYPES] + [(c, d, d) for c in ("magnitude", "pafi") for d in DTYPES]
    return out


def _compile(name, criterion, theta, grad, cc, mode=None, strided=False):
    """triton.compile one kernel as the launcher specializes it: 16-byte aligned
    pointers, unit strides as constants and n a multiple of 16; or (strided) int64
    strides, n, position and program bases, as past 2**31 elements."""
    kernel = st._histogram_kernel if name == "histogram" else st._emit_kernel
    names = kernel.arg_names
    sig = {a: "*i64" for a in names if a.endswith("_ptr")}
    sig.update(theta_ptr=f"*{theta}", grad_ptr=f"*{grad}", n="i64" if strided else "i32", eps="fp32")
    const = {"CRITERION": criterion, "BLOCK": st.BLOCK}
    if strided:
        sig.update(theta_stride="i64", grad_stride="i64")
    else:
        const.update(theta_stride=1, grad_stride=1)
    if kernel is st._histogram_kernel:
        const["HALF"] = st._HALF
    else:
        wide = "i64" if strided else "i32"  # Python ints past 2**31 reach Triton as i64
        sig.update(key_buf_ptr="*i32", base=wide, prog0=wide, lo="i32", hi="i32")
        const["MODE"] = mode
    sig.update({k: "constexpr" for k in const})
    aligned = [a for a in names if a.endswith("_ptr")] + ([] if strided else ["n"])
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(kernel, {a: sig[a] for a in names}, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": st.NUM_WARPS})


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


KERNELS = [("histogram", None)] + [("emit", m) for m in MODES]
JOBS = [(k, m, *v, cc, False) for k, m in KERNELS for v in variants() for cc in (80, 90)]
JOBS += [(k, m, "gallop", "bf16", "fp32", cc, True) for k, m in KERNELS for cc in (80, 90)]


def figures(job) -> dict:
    """Compile one job; the facts the tests check."""
    kernel, mode, criterion, theta, grad, cc, strided = job
    c = _compile(kernel, criterion, theta, grad, cc, mode, strided)
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
        "neg_f32": "neg.f32" in ptx,
        "sub_f32": bool(re.search(r"sub(\.rn)?\.f32", ptx)),
    }


def _all_figures() -> list[dict]:
    with ProcessPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(figures, JOBS))


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return {tuple(f["job"]): f for f in json.loads(r.stdout)}


needs_ptxas = pytest.mark.skipif(not os.path.exists(PTXAS), reason="needs ptxas (CUDA toolkit)")


@needs_ptxas
@pytest.mark.parametrize("job", JOBS, ids=lambda j: "-".join(str(x) for x in j[:6] if x) + ("-strided" if j[6] else ""))
def test_compiles_within_limits(compiled, job):
    f = compiled[job]
    kernel, mode, criterion, theta, grad, cc, strided = job
    assert f["shared"] <= SMEM_LIMIT[cc]
    assert f["spill_stores"] == f["spill_loads"] == f["stack"] == 0, f
    assert not f["ftz"]  # flushing subnormal scores to zero would change their keys
    if criterion == "gallop":
        assert f["div_rn"] and not f["div_approx"]
    if strided:
        assert f["setp_s64"]  # offs < n compares 64-bit offsets
    else:  # 16-byte loads: the unit stride reached the compiler as a constant
        assert f["vector_loads"]
    if criterion == "pafi":  # 0 - |x|, not -|x|, which would give -0.0 a key of its own
        assert f["sub_f32"] and not f["neg_f32"]


if __name__ == "__main__":
    rows = _all_figures()
    if sys.argv[1:] == ["--json"]:
        print(json.dumps(rows))
    else:
        print("| kernel | criterion | theta/grad | arch | variant | registers | shared (B) | spills (B) |")
        print("|---|---|---|---|---|---|---|---|")
        for f in rows:
            kernel, mode, criterion, theta, grad, cc, strided = f["job"]
            layout = "strided" if strided else "contiguous"
            print(
                f"| {mode or kernel} | {criterion} | {theta}/{grad} | sm_{cc} | {layout} "
                f"| {f['registers']} | {f['shared']} | {f['spill_stores'] + f['spill_loads']} |"
            )
