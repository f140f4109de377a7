"""The Triton selection backend returns exactly the reference Selection.

On the CPU through the interpreter; where a GPU exists, on CUDA tensors (bench/gpu_check.sh).
A broken Triton fails this module at import: it is not a skip.
"""

import pytest
import torch
from helpers import (ADVERSARIAL, DTYPES, Bag, adversarial_bag, bag_of, make_bag, oracle_selection, oracle_topk,
                     sources_of)

import gallop_kernels as gk
from gallop_kernels import _env, keys, radix, reference, select
from gallop_kernels.ops import select_histogram as sh
from gallop_kernels.ops import select_triton as st
from gallop_kernels.reference import CRITERIA

B = st.BLOCK
# 0, 1, primes, exactly one block, one block + 1, a few blocks
SIZES = [0, 1, 7, 97, B, B + 1, 3 * B + 11]
DTYPE_PAIRS = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"), ("fp32", "fp16")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A narrow window even on small tensors: the sample is dense and the margin small.
NARROW = radix.Config(sample_stride=3, margin_min=2, margin_sigmas=3.0)


def assert_same(model, rho, criterion, scope, **kw):
    model.to(DEVICE)  # moves .grad too
    if kw.get("grads") is not None:
        kw["grads"] = {n: g.to(DEVICE) for n, g in kw["grads"].items()}
    got = gk.select_mask(model, rho=rho, criterion=criterion, scope=scope, backend="triton", **kw)
    want = gk.select_mask(model, rho=rho, criterion=criterion, scope=scope, backend="reference", **kw)
    oracle, thr = oracle_selection(model, rho, criterion, scope, grads=kw.get("grads"))
    for name in want:
        assert got[name].dtype == torch.int32  # every test tensor has fewer than 2^31 weights
        assert torch.equal(got[name].cpu(), oracle[name]), f"{name}: {got[name][:8].tolist()} != {oracle[name][:8]}"
        assert torch.equal(want[name].cpu(), oracle[name])
    assert got.threshold == want.threshold == thr
    return got


def run_plan(bag, rho, criterion="gallop", config=radix.DEFAULT, grads=None):
    """topk_keys_triton against the float64 full-sort oracle and the reference; the Plan."""
    srcs = sources_of(bag.to(DEVICE), grads)
    k = reference.num_to_select(rho, sum(s.numel for s in srcs))
    trace = []
    got, key = st.topk_keys_triton(srcs, k, criterion, config=config, trace=trace)
    want, want_key = reference.topk_keys(srcs, k, criterion)
    oracle, score = oracle_topk(srcs, k, criterion)
    for g, w, o in zip(got, want, oracle):
        assert torch.equal(g.cpu(), w.cpu()) and torch.equal(g.cpu(), o)
    assert key == want_key and reference.key_to_score(key) == score
    assert sum(g.numel() for g in got) == k
    return trace[0]


CASES = [(c, d, scope, rho) for c in CRITERIA for d in (DTYPE_PAIRS if c != "random" else DTYPE_PAIRS[:1])
         for scope, rho in (("global", 0.003), ("global", 0.5), ("per_tensor", 0.3))]


@pytest.mark.parametrize("criterion,dtypes,scope,rho", CASES, ids=lambda v: str(v))
def test_matches_reference(criterion, dtypes, scope, rho):
    bag = make_bag(SIZES, DTYPES[dtypes[0]])
    # torch refuses a .grad of another dtype: mixed pairs go through grads=
    grads = {n: p.grad.to(DTYPES[dtypes[1]]) for n, p in bag.named_parameters()}
    sel = assert_same(bag, rho, criterion, scope, grads=grads)
    if scope == "global":
        assert sel.num_selected == reference.num_to_select(rho, sum(SIZES))
    else:
        assert sel.num_selected == sum(reference.num_to_select(rho, n) for n in SIZES)


def _adversarial(kind: str, dtype) -> Bag:
    return adversarial_bag(kind, dtype, [B + 1, 97, 2 * B])


@pytest.mark.parametrize("kind", ADVERSARIAL)
@pytest.mark.parametrize("criterion", ["gallop", "saft", "magnitude", "pafi"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_adversarial(kind, criterion, dtype):
    bag = _adversarial(kind, DTYPES[dtype])
    for rho in (1 / 2000, 0.3):
        assert_same(bag, rho, criterion, "global")


# ----------------------------------------------------------------------------
# each mode of the window plan, and the fallback
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_collect_mode_with_a_narrow_window(dtype):
    plan = run_plan(make_bag([3 * B + 11, 97, B], DTYPES[dtype]), 0.05, config=NARROW)
    assert plan.mode == "collect" and plan.lo < plan.hi
    assert 0 < plan.above < plan.above + plan.window < 4 * B + 108  # a real window, not everything


@pytest.mark.parametrize("rho", [1 / 3000, 0.5, 1.0])
def test_ties_mode_when_all_weights_are_equal(rho):
    plan = run_plan(_adversarial("all_equal", torch.bfloat16), rho)
    assert plan.mode == "ties"  # lo is the one score; hi may open to the int32 limit
    assert (plan.above, plan.window, plan.equal) == (0, 0, 3 * B + 98)


@pytest.mark.parametrize("criterion", ["gallop", "saft", "magnitude", "pafi"])
def test_thirty_percent_zeros(criterion):
    """The k-th score is an exact zero (ties at lo) past 70%, or, for pafi (whose
    largest score is 0 - |0|), before 30%; elsewhere the window collects."""
    bag = _adversarial("zeros_30pct", torch.float32)
    scattered, zero = (0.5, 0.01) if criterion == "pafi" else (0.01, 0.9)
    assert run_plan(bag, scattered, criterion, NARROW).mode == "collect"
    plan = run_plan(bag, zero, criterion, NARROW)
    assert plan.mode == "ties" and reference.key_to_score(plan.lo + keys.SIGN) == 0.0


def _interleaved() -> Bag:
    """Even positions small scores, odd ones large: a stride-2 sample sees only the small."""
    n = 2 * B + 6
    grad = torch.where(torch.arange(n) % 2 == 1, 100.0, 1.0) * (1 + torch.rand(n))
    return bag_of([torch.ones(n)], [grad])


def test_window_miss_falls_back_to_the_histogram_plan(monkeypatch):
    calls = []
    real = sh._launch
    monkeypatch.setattr(sh, "_launch", lambda *a, **m: calls.append(m.get("MODE")) or real(*a, **m))
    blind = radix.Config(sample_stride=2, margin_sigmas=0.0, margin_min=0)
    plan = run_plan(_interleaved(), 0.1, config=blind)
    assert plan.mode == "miss" and plan.above >= reference.num_to_select(0.1, 2 * B + 6)
    assert calls == [None, "collect"]  # histogram pass, then its emission


def test_window_overflow_falls_back(monkeypatch):
    calls = []
    real = sh._launch
    monkeypatch.setattr(sh, "_launch", lambda *a, **m: calls.append(m.get("MODE")) or real(*a, **m))
    plan = run_plan(make_bag([B + 5, 300]), 0.1, config=radix.Config(window_cap=1))
    assert plan.mode == "overflow" and plan.window > 1 and calls == [None, None, "collect", "collect"]


@pytest.fixture
def blind_window(monkeypatch):
    """A window above every key: counts find nothing there, so the plan must fall back."""
    top = (1 << 31) - 1
    monkeypatch.setattr(radix, "window", lambda *a: (top - 1, top))


@pytest.mark.parametrize("kind", ["zero_grads", "ties", "signed_zeros"])
@pytest.mark.parametrize("criterion", ["gallop", "pafi"])
def test_fallback_heavy_ties(kind, criterion, blind_window):
    """A missed window and a candidate buffer of 5: the low-digit and tie passes decide."""
    for rho in (1 / 2000, 0.3):
        plan = run_plan(_adversarial(kind, torch.bfloat16), rho, criterion, radix.Config(candidate_cap=5))
        assert plan.mode == "miss"


def test_heavy_ties_take_four_passes(monkeypatch, blind_window):
    """All-zero gradients and a tiny buffer: low-digit histogram, then ties by position."""
    modes = []
    real = sh._launch
    monkeypatch.setattr(sh, "_launch", lambda kern, *a, **m: modes.append(m.get("MODE")) or real(kern, *a, **m))
    bag = _adversarial("zero_grads", torch.float32)
    assert run_plan(bag, 0.01, config=radix.Config(candidate_cap=5)).mode == "miss"
    assert modes[:3] == [None] * 3 and set(modes[3:]) == {"low", "above", "ties"}
    assert modes.count("ties") == 1  # the needed ties all lie in the first tensor's first block


def test_reads_theta_and_grad_twice(monkeypatch):
    """The window plan: one count and one emission launch per dtype group, each
    covering every non-empty source once; the fallback never runs."""
    seen = []
    real = st._launch
    monkeypatch.setattr(st, "_launch", lambda k, srcs, *a, **m: seen.append((k, tuple(srcs))) or real(k, srcs, *a, **m))
    monkeypatch.setattr(sh, "_launch", lambda *a, **m: pytest.fail("fallback ran"))
    bag = make_bag([B + 3, 5, 0, 2 * B, 16], torch.bfloat16)
    plan = run_plan(bag, 0.05)
    assert plan.mode == "collect"
    for kernel in (st._count_kernel, st._emit_kernel):
        covered = sorted(i for k, srcs in seen if k is kernel for i in srcs)
        assert covered == [0, 1, 3, 4]
    # aligned (2*B, 16) and unaligned (B + 3, 5) sources: two launches per pass
    assert len(seen) == 4


def test_non_contiguous_inputs():
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    big = torch.randn(2 * B + 6, generator=gen, device=DEVICE)
    mat = torch.randn(67, 129, generator=gen, device=DEVICE)
    bag = Bag([big[::2].clone(), mat.clone()])  # parameters must be leaves; set strided data below
    bag.w0.data = big[::2]
    bag.w1.data = mat.t()
    bag.w0.grad = torch.randn(3 * (B + 3), generator=gen, device=DEVICE)[::3]
    bag.w1.grad = torch.randn(67, 129, generator=gen, device=DEVICE).t()
    grads = {"w0": bag.w0.grad, "w1": torch.randn(129, 67, generator=gen, device=DEVICE).bfloat16().t().contiguous().t()}
    assert bag.w0.stride() == (2,) and bag.w0.grad.stride() == (3,) and bag.w1.stride() == (1, 129)
    for criterion in ("gallop", "pafi"):
        assert_same(bag, 0.02, criterion, "global")
        assert_same(bag, 0.02, criterion, "global", grads=grads)
        assert run_plan(bag, 0.02, criterion, NARROW).mode == "collect"
    assert bag.w0.grad.stride() == (3,)  # still strided: the backends read it in place
    flat, stride = radix.flat(bag.w0.grad)
    assert flat.data_ptr() == bag.w0.grad.data_ptr() and stride == 3


@pytest.mark.parametrize("criterion", ["gallop", "saft", "magnitude", "pafi"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raises_like_reference(criterion, bad):
    bag = make_bag([B + 9, 33]).to(DEVICE)
    with torch.no_grad():
        bag.w1[4] = bad
        bag.w1.grad[4] = bad
    messages = []
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match="'w1'") as err:
            gk.select_mask(bag, rho=0.1, criterion=criterion, backend=backend)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


def test_rho_one_over_n_and_one_and_k_zero():
    bag = make_bag([0, 13, B + 1])
    for rho in (1 / (B + 14), 1.0):
        assert_same(bag, rho, "gallop", "global")
    srcs = [reference.Source("a", torch.randn(5), torch.randn(5), 0)]
    assert st.topk_keys_triton(srcs, 0, "gallop")[1] is None


def test_float64_and_random_use_reference(monkeypatch):
    launches = []
    monkeypatch.setattr(st, "_launch", lambda *a, **m: launches.append(a))
    monkeypatch.setattr(sh, "_launch", lambda *a, **m: launches.append(a))
    assert_same(make_bag([50, 7], torch.float64), 0.1, "gallop", "global")
    assert_same(make_bag([50, 7]), 0.1, "random", "global")
    assert launches == []


def _shifted_table(prims, source, shift_blocks):
    """The primitives' table with ``source`` pretending to start shift_blocks blocks
    earlier: its programs then compute flat indices, positions and addresses past
    2**31 (pointers moved back by the same amount, so the loads hit the real data)."""
    table = prims.table.clone()
    row = table[source]
    shift = shift_blocks * B
    row[0] -= shift * prims._views[0].element_size()  # theta address
    row[1] -= shift * prims._views[1].element_size()  # grad address
    row[2] += shift  # n
    row[5] -= shift  # base: positions come out unchanged
    row[6] -= shift_blocks  # first block: block numbers too
    row[7] -= shift_blocks  # first program: the programs start deep inside the source
    return table


@pytest.mark.parametrize("aligned", [True, False])
def test_offsets_past_two_to_the_31(aligned):
    """The kernels' block offsets, addresses and positions are 64-bit: with a flat index
    of 2**32 + ... (a shifted table), the interpreter, which honours Triton's integer
    widths, still reads the right weights and writes the right positions."""
    n = 2 * B if aligned else 2 * B + 3
    bag = make_bag([n], torch.bfloat16).to(DEVICE)
    srcs = sources_of(bag)
    prims = st.TritonPrimitives(srcs, "gallop", 1e-8, torch.device(DEVICE))
    assert [g.aligned for g in prims.groups] == [aligned]
    lo, hi = radix.window(radix.sample_keys(srcs, "gallop", 1e-8, 3), 100, n, NARROW)
    want = prims.count(lo, hi)
    prims.table = _shifted_table(prims, 0, (2**32 + 2**31) // B)
    assert int(prims.table[0, 2]) > 2**32
    assert torch.equal(prims.count(lo, hi), want)
    counts = want.to(torch.int64)
    out = torch.empty(int(counts[:, 0].sum()), dtype=torch.int64, device=DEVICE)
    cand_key = torch.empty(int(counts[:, 1].sum()), dtype=torch.int32, device=DEVICE)
    cand_pos = torch.empty_like(cand_key, dtype=torch.int64)
    starts = lambda c: torch.cumsum(c, 0) - c  # noqa: E731
    prims.emit(lo, hi, out, starts(counts[:, 0]), None, cand_key, cand_pos, starts(counts[:, 1]))
    key = reference.signed_key(reference.score("gallop", bag.w0, bag.w0.grad))
    assert torch.equal(out, (key > hi).nonzero().reshape(-1))
    in_window = ((key > lo) & (key <= hi)).nonzero().reshape(-1)
    assert torch.equal(cand_pos, in_window) and torch.equal(cand_key, key[in_window])


def test_auto_backend_and_registration():
    assert select.topk_function("triton") is st.topk_keys_triton
    srcs = [reference.Source("a", torch.randn(3), torch.randn(3), 0)]
    assert select._pick_backend("triton", srcs, False) == "triton"
    assert "triton" not in gk.why_unavailable()


def test_broken_triton_is_reported_not_hidden(monkeypatch):
    err = ImportError("libtriton.so: cannot open shared object file")
    monkeypatch.setattr(_env, "TRITON_SELECTION", err)
    bag = make_bag([10])
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable") as info:
        gk.select_mask(bag, rho=0.1, backend="triton")
    assert info.value.__cause__ is err
    assert "libtriton.so" in gk.why_unavailable()["triton"] and not gk.backends()["triton"]
    assert gk.select_mask(bag, rho=0.1).num_selected == 1  # auto still works: the reference


def test_launch_arguments_match_the_aot_signature(monkeypatch):
    """The tensors' dtypes the launcher passes are those test_triton_compile compiles."""
    from test_triton_compile import buffer_dtypes

    seen = set()
    real = st._launch

    def spy(kernel, srcs, grid, *args, **meta):
        tensors = tuple(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
        seen.add((kernel.fn.__name__, meta.get("TIES"), tensors[:2] + tensors[4:]))
        real(kernel, srcs, grid, *args, **meta)

    monkeypatch.setattr(st, "_launch", spy)
    run_plan(make_bag([B + 3, 5]), 0.05, config=NARROW)
    run_plan(_adversarial("all_equal", torch.float32), 0.3)
    assert seen == {(name, ties, buffer_dtypes(name)) for name, ties in
                    (("_count_kernel", None), ("_emit_kernel", False), ("_emit_kernel", True))}
