"""The compiled sparse AdamW (host build on the CPU, CUDA kernel on a GPU) against the reference path."""

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import DTYPES, Bag, assert_adamw_step, make_bag, needs_ext

import gallop_kernels as gk
from gallop_kernels import _ext, distributed, reference
from gallop_kernels.optim import sparse_adamw as optim
from gallop_kernels.ops import sparse_adamw as kernel
from gallop_kernels.optim.compact_grads import CompactGrad

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)

SIZES = [97, 1025, 4099, 7, 1]
CONFIGS = {
    "wd": dict(weight_decay=0.1),
    "amsgrad-wd": dict(amsgrad=True, weight_decay=0.1),
    "maximize": dict(maximize=True),
    # 1 - beta1 >= 0.5 takes lerp's other branch
    "beta1=0.3": dict(betas=(0.3, 0.99), weight_decay=0.05),
}
SCALE = 3000.0  # not a power of two: 1/scale rounds


def _pair(dtype, master, device="cpu", backends=("host", "reference"), rho=0.2, **kw):
    bag = make_bag(SIZES, dtype).to(device)
    sel = gk.select_mask(bag, rho=rho)
    bags = [bag] + [copy.deepcopy(bag) for _ in backends[1:]]
    opts = [
        gk.SparseAdamW(b.named_parameters(), selection=sel, lr=1e-2, backend=be, master_weights=master, **kw)
        for b, be in zip(bags, backends)
    ]
    return sel, bags, opts


def _grads(bag, gen, scale, skip):
    out = {}
    for n, p in bag.named_parameters():
        g = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
        if skip:
            g.view(-1)[0] = float("inf")  # what an overflow under AMP looks like
        out[n] = g.to(p.device)
    return out


def _weights(bag, opt, sel) -> dict:
    """name -> the selected weights ``opt`` updates: its float32 master copy (once the state
    exists), else the parameter's own entries."""
    out = {}
    for n, p in bag.named_parameters():
        st = opt.state.get(p, {})
        out[n] = st["master_param"] if "master_param" in st else p.detach().reshape(-1)[sel[n]]
    return out


def _assert_same_step(sel, bags, opts, before, step):
    """The host build's step (bags[0]) against the reference path's (bags[1]) from equal
    states: helpers.assert_adamw_step on the updated weights and on the parameter entries
    (master weights round into them); then the reference starts the next step from the
    host's weights."""
    (b1, b2), (o1, o2) = bags, opts
    group = o2.param_groups[0]
    w1, w2 = _weights(b1, o1, sel), _weights(b2, o2, sel)
    for (n, p1), p2 in zip(b1.named_parameters(), b2.parameters()):
        if not sel[n].numel():
            continue
        s1, s2 = o1.state[p1], o2.state[p2]
        assert s1.keys() == s2.keys(), n
        assert torch.equal(s1["indices"], s2["indices"]) and torch.equal(s1["step"], s2["step"]), f"{n} step {step}"
        check = lambda got, want, what: assert_adamw_step(  # noqa: E731
            s1, s2, got, want, before[n], lr=group["lr"], weight_decay=group["weight_decay"],
            what=f"{n} step {step} {what}")
        check(w1[n], w2[n], "weights")
        if "master_param" in s1:
            check(p1.detach().reshape(-1)[sel[n]], p2.detach().reshape(-1)[sel[n]], "params")
        with torch.no_grad():
            p2.copy_(p1)
            w2[n].copy_(w1[n])


@needs_ext
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("master", [False, True], ids=["nomaster", "master"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={d}")
def test_host_build_equals_reference(dtype, master, config):
    """100 steps under a grad scale with an overflow every 7th step (skipped), each from equal
    states: moments bit-equal, weights within ulp(theta) + 4 ulp(update) (helpers.assert_adamw_step)."""
    sel, bags, opts = _pair(DTYPES[dtype], master, **CONFIGS[config])
    init = {n: p.detach().clone() for n, p in bags[0].named_parameters()}
    gen = torch.Generator().manual_seed(5)
    scale = torch.tensor([SCALE])
    masks = sel.masks()
    for step in range(100):
        skip = step % 7 == 3
        grads = _grads(bags[0], gen, SCALE, skip)
        for b in bags:
            for n, p in b.named_parameters():
                p.grad = grads[n].clone()
        found_inf = torch.tensor([1.0 if skip else 0.0])
        before = {n: w.float().clone() for n, w in _weights(bags[1], opts[1], sel).items()}
        for o in opts:
            o.step(grad_scale=scale, found_inf=found_inf)
        _assert_same_step(sel, bags, opts, before, step)
    for n, p in bags[0].named_parameters():
        assert torch.equal(p.detach()[~masks[n]], init[n][~masks[n]]), f"{n}: unselected weights changed"
    p = bags[0].w1
    assert float(opts[0].state[p]["step"]) == 100 - len([s for s in range(100) if s % 7 == 3])
    assert ("master_param" in opts[0].state[p]) == master
    assert not torch.equal(p.detach(), init["w1"]), "the weights never moved"


@needs_ext
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rounding_to_param_dtype_matches_torch(dtype):
    """With lr=0 the kernel writes round(master) into the param: it must be torch's .to(dtype)."""
    dt = DTYPES[dtype]
    special = [0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 65504.0, 65519.0, 65520.0]
    # fp16 subnormals, their ties (3 and 5 halves of 2^-24), a float32 subnormal, overflow
    special += [1e-40, 2**-24, 2**-25, 3 * 2**-26, 3 * 2**-25, 5 * 2**-25, 2**-130 * 3, 2**-14 - 2**-26]
    special += [5.9e-8, -6.1e-5, 3.4e38, float("inf")]
    vals = torch.cat([torch.tensor(special), torch.randn(4000) * torch.logspace(-9, 5, 4000)])
    bag = Bag([torch.zeros(vals.numel(), dtype=dt)])
    sel = gk.Selection({"w0": torch.arange(vals.numel())}, {"w0": (vals.numel(),)}, rho=1.0, criterion="gallop", scope="global", threshold=0.0)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sel, lr=0.0, master_weights=True, backend="host")
    bag.w0.grad = torch.zeros_like(bag.w0)
    opt.step()  # creates the state
    opt.state[bag.w0]["master_param"].copy_(vals)
    opt.step()
    want = vals.to(dt)
    got = bag.w0.detach()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (got[got != want][:5], want[got != want][:5])


@needs_ext
def test_found_inf_leaves_everything_bit_for_bit():
    sel, bags, opts = _pair(torch.bfloat16, True, backends=("host",), amsgrad=True, weight_decay=0.1)
    bag, opt = bags[0], opts[0]
    for p in bag.parameters():
        p.grad = torch.randn(p.shape).to(p.dtype)
    opt.step()
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in bag.parameters()]
    opt.step(grad_scale=torch.tensor([2.0]), found_inf=torch.tensor([1.0]))
    for p, q in zip(bag.parameters(), before[1]):
        assert torch.equal(p.detach(), q)
    for pid, st in opt.state_dict()["state"].items():
        for key, t in st.items():
            assert torch.equal(t, before[0]["state"][pid][key]), key
    opt.step(grad_scale=torch.tensor([2.0]), found_inf=torch.tensor([0.0]))
    assert not torch.equal(bag.w1.detach(), before[1][1])


@needs_ext
def test_state_dict_moves_between_backends():
    """10 steps with the host build, then 10 with the reference path, equal 20 reference steps."""
    sel, bags, opts = _pair(torch.bfloat16, True, backends=("host", "reference"), amsgrad=True, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    saved = None
    for step in range(20):
        grads = _grads(bags[0], gen, 1.0, False)
        for b in bags:
            for n, p in b.named_parameters():
                p.grad = grads[n].clone()
        for o in opts:
            o.step()
        if step == 9:
            saved = copy.deepcopy((bags[0].state_dict(), opts[0].state_dict()))
            ref_keys = {k for st in opts[1].state_dict()["state"].values() for k in st}
            assert {k for st in saved[1]["state"].values() for k in st} == ref_keys
            bag3 = copy.deepcopy(bags[0])
            bag3.load_state_dict(saved[0])
            opt3 = gk.SparseAdamW(bag3.named_parameters(), selection=sel, lr=1e-2, backend="reference", amsgrad=True, weight_decay=0.1)
            opt3.load_state_dict(saved[1])
            bags, opts = [bag3, bags[1]], [opt3, opts[1]]
    for p, q in zip(bags[0].parameters(), bags[1].parameters()):
        torch.testing.assert_close(p, q)


@needs_ext
def test_threads_split_the_entries_exactly():
    """Enough entries for several host threads: the same bits as one thread."""
    bag = make_bag([300_000, 50_000])
    sel = gk.select_mask(bag, rho=0.9)
    init = [p.detach().clone() for p in bag.parameters()]
    out = []
    for threads in (1, 4):
        b = copy.deepcopy(bag)  # drops .grad: each step gets its gradients below
        opt = gk.SparseAdamW(b.named_parameters(), selection=sel, lr=1e-2, weight_decay=0.1, backend="host")
        gen = torch.Generator().manual_seed(2)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for _ in range(3):
                for p in b.parameters():
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
        finally:
            torch.set_num_threads(old)
        out.append([p.detach() for p in b.parameters()])
    masks = sel.masks()
    for (n, m), p, q, p0 in zip(masks.items(), *out, init):
        assert torch.equal(p, q), n
        assert bool((p[m] != p0[m]).all()), f"{n}: a selected weight never moved"


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize("backend", [pytest.param("host", marks=needs_ext), "reference",
                                     pytest.param("cuda", marks=[pytest.mark.gpu, needs_ext])])
def test_int32_and_int64_indices_give_the_same_bits(backend, compact, monkeypatch):
    """Index lists are int32 below 2^31 weights and int64 from 2^31 (distributed.index_dtype).
    The int64 path, which a test cannot reach by allocating 2^31 weights, runs here by lowering
    the limit: the same steps (the kernel, the reference path, compact gradients) give the same bits."""
    device = "cuda" if backend == "cuda" else "cpu"
    runs = {}
    for limit in (2**31, 0):
        monkeypatch.setattr(distributed, "INT32_LIMIT", limit)
        bag = make_bag(SIZES, torch.bfloat16).to(device)
        sel = gk.select_mask(bag, rho=0.2)
        opt = gk.SparseAdamW(bag.named_parameters(), selection=sel, lr=1e-2, weight_decay=0.1, backend=backend,
                             compact_grads=compact)
        gen = torch.Generator().manual_seed(6)
        for _ in range(3):
            opt.zero_grad()
            x = {n: torch.randn(p.shape, generator=gen).to(device) for n, p in bag.named_parameters()}
            sum((p.float() * x[n]).sum() for n, p in bag.named_parameters()).backward()
            opt.step()
        want = torch.int32 if limit else torch.int64
        assert all(st["indices"].dtype == want for st in opt.state.values() if st), limit
        runs[limit] = [p.detach().clone() for p in bag.parameters()], [dict(st) for st in opt.state.values()]
    (p32, s32), (p64, s64) = runs[2**31], runs[0]
    assert all(torch.equal(a, b) for a, b in zip(p32, p64))
    for a, b in zip(s32, s64):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # equal values, int32 vs int64 indices
    assert not torch.equal(p32[1], make_bag(SIZES, torch.bfloat16).w1.to(device)), "the weights never moved"


@needs_ext
def test_auto_picks_the_kernel_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("reference path used")

    bag = make_bag([97, 33])
    sel = gk.select_mask(bag, rho=0.3)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sel)
    monkeypatch.setattr(reference, "sparse_adamw_step", boom)
    opt.step()  # the host build: no call to the reference
    bag64 = make_bag([97], torch.float64)
    opt64 = gk.SparseAdamW(bag64.named_parameters(), selection=gk.select_mask(bag64, rho=0.3))
    with pytest.raises(AssertionError, match="reference path used"):
        opt64.step()  # float64 is not a kernel dtype: auto takes the reference path


def test_without_the_extension(monkeypatch):
    """auto falls back to the reference path on the CPU; backend='host' says why it cannot run."""
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", ImportError("test: not built"))
    monkeypatch.setattr(optim, "_C", None)
    bag = make_bag([97])
    sel = gk.select_mask(bag, rho=0.3)
    before = bag.w0.detach().clone()
    gk.SparseAdamW(bag.named_parameters(), selection=sel, lr=1e-2).step()
    assert not torch.equal(bag.w0.detach(), before)
    with pytest.raises(RuntimeError, match="test: not built.*pip install"):
        gk.SparseAdamW(bag.named_parameters(), selection=sel, backend="host")


@needs_ext
def test_unsupported_inputs_name_the_parameter():
    bag = make_bag([97], torch.float64)
    sel = gk.select_mask(bag, rho=0.3)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sel, backend="host")
    before = bag.w0.detach().clone()
    with pytest.raises(ValueError, match=r"'w0'.*not supported: grad torch.float64, param torch.float64"):
        opt.step()
    assert torch.equal(bag.w0.detach(), before) and not opt.state[bag.w0]
    with pytest.raises(ValueError, match="unknown backend"):
        gk.SparseAdamW(bag.named_parameters(), selection=sel, backend="ext")
    if _ext._C.built_with_cuda:  # CPU parameters with the CUDA kernel: refused at the step, naming the parameter
        with pytest.raises(ValueError, match=r"'w0' is on cpu, but backend='cuda' runs on cuda parameters only"):
            gk.SparseAdamW(bag.named_parameters(), selection=sel, backend="cuda").step()
    else:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            gk.SparseAdamW(bag.named_parameters(), selection=sel, backend="cuda")
    row = kernel.Row("w9", torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.tensor([1]), *[torch.zeros(1)] * 2,
                     None, None, False, 0, 0, 0.9, 0.999, 1e-8, 0.0, False, False)
    with pytest.raises(ValueError, match=r"'w9'.*not supported: grad torch.float32, param torch.float64"):
        kernel.StepPlan([row], torch.zeros(1), torch.zeros(1, dtype=torch.float64))


@needs_ext
def test_non_contiguous_params_take_the_reference_path():
    w = torch.randn(16, 8).t()  # a transposed view: flat indices are not memory offsets
    bag = Bag([w.clone().t().contiguous().t()])
    bag.w0.grad = torch.randn(8, 16).t().contiguous().t()
    sel = gk.select_mask(bag, rho=0.3)
    ref = copy.deepcopy(bag)
    ref.w0.grad = bag.w0.grad.clone()  # clone keeps the strides; deepcopy drops .grad
    assert not ref.w0.is_contiguous() and not ref.w0.grad.is_contiguous()
    gk.SparseAdamW(bag.named_parameters(), selection=sel, lr=1e-2).step()
    gk.SparseAdamW(ref.named_parameters(), selection=sel, lr=1e-2, backend="reference").step()
    assert torch.equal(bag.w0, ref.w0) and not torch.equal(bag.w0, w.clone().t().contiguous().t())
    with pytest.raises(ValueError, match="'w0'.*contiguous"):
        gk.SparseAdamW(ref.named_parameters(), selection=sel, backend="host").step()


# ----------------------------------------------------------------------------
# the CUDA build
# ----------------------------------------------------------------------------


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA part is not built here")
@needs_ext
def test_built_with_cuda_when_nvcc_exists():
    assert _ext._C.built_with_cuda, "nvcc exists but gallop_kernels._C has no CUDA kernels: check the CMake log"
    assert hasattr(_ext._C, "sparse_adamw_step_cuda")


def _ptxas_report(arch: int, tmp_path) -> str:
    # The flags of CMakeLists.txt's CUDA target (Release: -O3), one architecture at a time.
    cmd = [NVCC, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "--fmad=false", "-Xptxas=-v",
           "-DGALLOP_WITH_CUDA=1", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "sparse_adamw.cu"),
           "-o", str(tmp_path / f"sparse_adamw_sm{arch}.cubin")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm_{a}")
def test_kernel_does_not_spill(arch, tmp_path):
    """Every instantiation (3 param dtypes x 4 grad kinds) and the prepare kernel: no
    spills, <= 64 registers (256 threads x 64 keeps 4 blocks per SM on sm_80/sm_90).
    Measured with nvcc 13 (2026-11-30): update kernels 60-64, prepare 40 registers."""
    report = _ptxas_report(arch, tmp_path)
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", report)
    assert len([e for e, _ in entries if "sparse_adamw_kernel" in e]) == 12, report
    assert any("prepare_kernel" in e for e, _ in entries), report
    props = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    smem = [int(s) for s in re.findall(r"(\d+) bytes smem", report)]
    assert props and regs and smem, report
    for frame, stores, loads in props:
        assert (int(frame), int(stores), int(loads)) == (0, 0, 0), report
    assert max(regs) <= 64, report
    assert max(smem) <= 1024, report


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_kernel_issues_the_gathers_before_any_store(tmp_path):
    """The PTX of the bf16 param / bf16 grad kernel: the 4 gradient gathers and the 4
    master-weight loads of a thread's tile come before its first global store, so
    they are in flight together (the table is const __restrict__: no reload forced
    by a store)."""
    ptx = tmp_path / "sparse_adamw.ptx"
    cmd = [NVCC, "-ptx", "-arch=sm_90", "-O3", "-std=c++17", "--fmad=false", "-DGALLOP_WITH_CUDA=1",
           f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "sparse_adamw.cu"), "-o", str(ptx)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = ptx.read_text()
    body = re.search(r"\.entry \w*sparse_adamw_kernelILi1ELi1E\w*\(.*?\n}\n", text, re.S).group(0)
    before_store = body[: body.index("st.global")]
    assert before_store.count("ld.global.u16") >= 4, "gradient gathers not all issued before the first store"
    assert before_store.count("ld.global.f32") >= 4 * 3, "master/exp_avg/exp_avg_sq loads not all before the first store"


# ----------------------------------------------------------------------------
# GPU: the CUDA kernel against the host build, bit for bit
# ----------------------------------------------------------------------------


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("master", [False, True], ids=["nomaster", "master"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={d}")
def test_cuda_kernel_equals_host_build(dtype, master):
    """The CUDA kernel (backend='cuda') and its host build (backend='host') give the same bits:
    weights and every state tensor, every step, overflow steps included."""
    dt = DTYPES[dtype]
    bag = make_bag(SIZES, dt)
    sel = gk.select_mask(bag, rho=0.2)
    host, dev = bag, copy.deepcopy(bag).cuda()
    init = [p.detach().clone() for p in host.parameters()]
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.1, master_weights=master)
    o_host = gk.SparseAdamW(host.named_parameters(), selection=sel, backend="host", **kw)
    o_dev = gk.SparseAdamW(dev.named_parameters(), selection=sel, backend="cuda", **kw)
    gen = torch.Generator().manual_seed(9)
    for step in range(30):
        skip = step % 7 == 3
        grads = _grads(host, gen, SCALE, skip)
        for n, p in host.named_parameters():
            p.grad = grads[n].clone()
            getattr(dev, n).grad = grads[n].cuda()
        fi = torch.tensor([1.0 if skip else 0.0])
        o_host.step(grad_scale=torch.tensor([SCALE]), found_inf=fi)
        o_dev.step(grad_scale=torch.tensor([SCALE]).cuda(), found_inf=fi.cuda())
        for (n, p), q in zip(host.named_parameters(), dev.parameters()):
            assert q.is_cuda and torch.equal(p.detach(), q.detach().cpu()), f"{n} step {step}"
            st_host, st_dev = o_host.state.get(p, {}), o_dev.state.get(q, {})
            assert st_host.keys() == st_dev.keys() and (bool(st_host) == bool(sel[n].numel())), f"{n} step {step}"
            for key, t in st_host.items():
                assert torch.equal(t, st_dev[key].cpu()), f"{n} {key} step {step}"
    assert o_dev._plan.launches and o_dev._plan.launches[0].plan.device.type == "cuda" and not o_dev._plan.ref
    assert not torch.equal(host.w1.detach(), init[1]), "the weights never moved"


# ----------------------------------------------------------------------------
# the numerical contract (csrc/gallop/adamw_math.h): against torch.optim.AdamW
# ----------------------------------------------------------------------------


# (dtype, master_weights): the default for each dtype (float32 writes straight into the weights,
# bf16/fp16 keep float32 master weights) and float32 with master weights.
WEIGHTS = {"fp32": ("fp32", None), "fp32-master": ("fp32", True), "bf16": ("bf16", None), "fp16": ("fp16", None)}


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("wd", [0.0, 0.1], ids=["wd=0", "wd=0.1"])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("backend", [pytest.param("host", marks=needs_ext), "reference",
                                     pytest.param("cuda", marks=[pytest.mark.gpu, needs_ext])])
def test_ulp_budget_against_torch_adamw(backend, weights, wd, amsgrad, maximize):
    """Every step from equal states, against torch.optim.AdamW(foreach=False) on the gathered
    float32 weights on the CPU: helpers.assert_adamw_step (moments bit-equal, weights within
    ulp(theta) + 4 ulp(update), NaN fails)."""
    dtype, master = WEIGHTS[weights]
    dt = DTYPES[dtype]
    bag = make_bag([97, 1025, 4099], dt)
    sel = gk.select_mask(bag, rho=0.2)
    bag = bag.to("cuda" if backend == "cuda" else "cpu")
    kw = dict(lr=1e-2, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sel, backend=backend, master_weights=master, **kw)
    comp = [torch.nn.Parameter(p.detach().reshape(-1)[sel[n].to(p.device)].float().cpu().clone())
            for n, p in bag.named_parameters()]
    ref = torch.optim.AdamW(comp, foreach=False, **kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(100):
        old = [c.detach().clone() for c in comp]
        for (n, p), c in zip(bag.named_parameters(), comp):
            g = torch.randn(p.shape, generator=gen).to(dt)
            p.grad, c.grad = g.to(p.device), g.reshape(-1)[sel[n]].float()
        opt.step()
        ref.step()
        for (n, p), c, o in zip(bag.named_parameters(), comp, old):
            st = opt.state[p]
            assert ("master_param" in st) == (dt != torch.float32 or master is True), n
            got = (st["master_param"] if "master_param" in st else p.detach().reshape(-1)[sel[n].to(p.device)]).cpu()
            assert_adamw_step(st, ref.state[c], got, c, o, lr=1e-2, weight_decay=wd, what=f"{n} step {step}")
            with torch.no_grad():  # the next step starts from equal states again
                c.copy_(got)


# ----------------------------------------------------------------------------
# the custom op gallop::sparse_adamw_step
# ----------------------------------------------------------------------------


def _op_args(opt, dev="cpu"):
    """The op's arguments for opt's last planned step (as SparseAdamW.step passes them)."""
    launch = opt._plan.launches[0]
    dev = launch.plan.device
    grads, _ = opt._grads()
    return (launch.params, launch.take(grads), launch.indices, launch.states, opt._steps[dev], opt._lrs[dev],
            None, None, launch.plan.id, True)


@needs_ext
def test_custom_op_is_registered_and_passes_opcheck():
    bag = make_bag([97, 1025], torch.bfloat16)
    sel = gk.select_mask(bag, rho=0.2)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sel, lr=1e-2, amsgrad=True, backend="host")
    for p in bag.parameters():
        p.grad = torch.randn(p.shape).to(p.dtype)
    opt.step()
    schema = str(torch.ops.gallop.sparse_adamw_step.default._schema)
    assert "Tensor(a0!)[] params" in schema and "Tensor(a3!)[] states" in schema and "Tensor(a4!) steps" in schema
    torch.library.opcheck(torch.ops.gallop.sparse_adamw_step.default, _op_args(opt))


@needs_ext
def test_custom_op_follows_the_tensors_it_is_given():
    """The op writes into the tensors of its arguments, not the ones the table was built
    with (what functionalization under torch.compile hands it): clones get the update."""
    bag = make_bag([97, 1025])
    sel = gk.select_mask(bag, rho=0.2)
    opt = gk.SparseAdamW(bag.named_parameters(), selection=sel, lr=1e-2, backend="host")
    for p in bag.parameters():
        p.grad = torch.randn(p.shape)
    opt.step()
    params, grads, indices, states, steps, lrs, *rest = _op_args(opt)
    clones = [p.clone() for p in params], [s.clone() for s in states], steps.clone()
    before = [p.clone() for p in params], [s.clone() for s in states], steps.clone()
    torch.ops.gallop.sparse_adamw_step(clones[0], grads, indices, clones[1], lrs=lrs, steps=clones[2], grad_scale=None,
                                       found_inf=None, plan=rest[2], refresh=True)
    assert all(torch.equal(p, q) for p, q in zip(params, before[0])) and torch.equal(steps, before[2])
    assert not all(torch.equal(p, q) for p, q in zip(clones[0], before[0]))
    assert torch.equal(clones[2], before[2] + 1)


def _twins(device, dtype=torch.bfloat16, compact=False, **kw):
    """Two equal bags and their optimizers (the second with compact_grads=compact)."""
    bag = make_bag(SIZES, dtype).to(device)
    sel = gk.select_mask(bag, rho=0.2)
    bags = [bag, copy.deepcopy(bag)]
    backend = "host" if device == "cpu" else "cuda"
    opts = [gk.SparseAdamW(b.named_parameters(), selection=sel, backend=backend, weight_decay=0.1, amsgrad=True,
                           compact_grads=c, **kw) for b, c in zip(bags, (False, compact))]
    return bags, opts


def _assert_twins_equal(bags, opts, what):
    for (n, p), q in zip(bags[0].named_parameters(), bags[1].parameters()):
        assert torch.equal(p, q), f"{n} {what}"
        for key, t in opts[0].state[p].items():
            assert torch.equal(t, opts[1].state[q][key]), f"{n} {key} {what}"


@needs_ext
@pytest.mark.parametrize("backend", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.gpu)])
def test_compiled_step_has_no_graph_break_and_equals_eager(backend):
    """torch.compile(opt.step, fullgraph=True) after one eager step (which plans the
    step): one graph (the custom op inside), same bits as eager."""
    device = "cuda" if backend == "inductor" else "cpu"
    bags, opts = _twins(device, lr=torch.tensor(1e-2, dtype=torch.float64, device=device))
    gen = torch.Generator().manual_seed(3)
    compiled = torch.compile(opts[1].step, backend=backend, fullgraph=True)
    for step in range(5):
        step_fn = opts[1].step if step == 0 else compiled
        for b in bags:
            for n, p in b.named_parameters():
                p.grad = None
        grads = _grads(bags[0], gen, 1.0, False)
        for b in bags:
            for n, p in b.named_parameters():
                p.grad = grads[n].clone()
        opts[0].step()
        step_fn()
        for o in opts:
            o.param_groups[0]["lr"].mul_(0.9)  # a scheduler's in-place update, read on the device
        _assert_twins_equal(bags, opts, f"step {step}")
    assert float(opts[1].state[bags[1].w1]["step"]) == 5


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
def test_cuda_graph_replay_equals_eager(compact):
    """A step captured in a CUDA graph and replayed equals eager steps bit for bit
    (static gradients, tensor lr changed in place, AMP grad scale with an overflow step).
    compact: the captured optimizer reads compact gradients (written straight into its
    buffers, as backward's hooks would) against the eager one's dense bf16 gradients: a
    bf16 value is exact in float32, so the bits agree."""
    bags, opts = _twins("cuda", compact=compact, lr=torch.tensor(1e-2, dtype=torch.float64, device="cuda"))
    static = {n: torch.zeros_like(p) for n, p in bags[1].named_parameters()}
    scale, found = torch.tensor([SCALE], device="cuda"), torch.zeros(1, device="cuda")
    for n, p in bags[1].named_parameters():
        p.grad = CompactGrad(p, opts[1]._compact) if compact else static[n]
    gen = torch.Generator().manual_seed(4)

    def feed(step):
        grads = _grads(bags[0], gen, SCALE, step % 5 == 3)
        found.fill_(1.0 if step % 5 == 3 else 0.0)
        for (n, p), q in zip(bags[0].named_parameters(), bags[1].parameters()):
            p.grad = grads[n].clone()
            if compact:
                opts[1]._compact.grad(q).copy_(grads[n].reshape(-1)[opts[1]._indices[q]])
            else:
                static[n].copy_(grads[n])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: creates the state and the plan
        for step in range(2):
            feed(step)
            opts[0].step(grad_scale=scale, found_inf=found)
            opts[1].step(grad_scale=scale, found_inf=found)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[1].step(grad_scale=scale, found_inf=found)
    for step in range(2, 9):
        feed(step)
        opts[0].step(grad_scale=scale, found_inf=found)
        graph.replay()
        for o in opts:
            o.param_groups[0]["lr"].mul_(0.9)
        torch.cuda.synchronize()
        _assert_twins_equal(bags, opts, f"step {step}")
    opts[1].step(grad_scale=scale, found_inf=found)  # eager again after capture: its own table
    opts[0].step(grad_scale=scale, found_inf=found)
    _assert_twins_equal(bags, opts, "eager after replay")
