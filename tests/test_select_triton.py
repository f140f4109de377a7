"""The Triton selection backend returns exactly the reference Selection.

On the CPU through the interpreter; where a GPU exists, on CUDA tensors (bench/gpu_check.sh).
"""

import pytest
import torch
from helpers import DTYPES, Bag, make_bag

import gallop_kernels as gk
from gallop_kernels import reference, select
from gallop_kernels.reference import CRITERIA

st = pytest.importorskip("gallop_kernels.ops.select_triton")

B = st.BLOCK
# 0, 1, primes, exactly one block, one block + 1, a few blocks
SIZES = [0, 1, 7, 97, B, B + 1, 3 * B + 11]
DTYPE_PAIRS = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"), ("fp32", "fp16")]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_same(model, rho, criterion, scope, **kw):
    model.to(DEVICE)  # moves .grad too
    if kw.get("grads") is not None:
        kw["grads"] = {n: g.to(DEVICE) for n, g in kw["grads"].items()}
    got = gk.select_mask(model, rho=rho, criterion=criterion, scope=scope, backend="triton", **kw)
    want = gk.select_mask(model, rho=rho, criterion=criterion, scope=scope, backend="reference", **kw)
    for name in want:
        assert got[name].dtype == torch.int64
        assert torch.equal(got[name], want[name]), f"{name}: {got[name][:8].tolist()} != {want[name][:8].tolist()}"
    assert got.threshold == want.threshold
    return got


CASES = [(c, d, scope, rho) for c in CRITERIA for d in (DTYPE_PAIRS if c != "random" else DTYPE_PAIRS[:1])
         for scope, rho in (("global", 0.003), ("global", 0.5), ("per_tensor", 0.3))]


@pytest.mark.parametrize("criterion,dtypes,scope,rho", CASES, ids=lambda v: str(v))
def test_matches_reference(criterion, dtypes, scope, rho):
    bag = make_bag(SIZES, DTYPES[dtypes[0]])
    # torch refuses a .grad of another dtype: mixed pairs go through grads=
    grads = {n: p.grad.to(DTYPES[dtypes[1]]) for n, p in bag.named_parameters()}
    sel = assert_same(bag, rho, criterion, scope, grads=grads)
    assert sel.num_selected == reference.num_to_select(rho, sum(SIZES)) or scope == "per_tensor"


def _bag_of(thetas, grads):
    bag = Bag([t.clone() for t in thetas])
    for p, g in zip(bag.parameters(), grads):
        p.grad = g.clone()
    return bag


def _adversarial(kind: str, dtype) -> Bag:
    gen = torch.Generator().manual_seed(7)
    sizes = [B + 1, 97, 2 * B]
    thetas = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    if kind == "zero_grads":
        grads = [torch.zeros(n) for n in sizes]
    elif kind == "ties":  # values from a tiny set: the boundary bin holds thousands of equal keys
        thetas = [torch.randint(-2, 3, (n,), generator=gen).float() for n in sizes]
        grads = [torch.randint(0, 3, (n,), generator=gen).float() for n in sizes]
    elif kind == "huge":
        grads[1][5] = 3e38 if dtype != torch.float16 else 6e4
        thetas[2][7] = 3e38 if dtype != torch.float16 else 6e4
    elif kind == "signed_zeros":
        thetas = [torch.where(t > 0, 0.0, -0.0) for t in thetas]
        grads = [torch.where(g > 0, 0.0, -0.0) * (i % 2) for i, g in enumerate(grads)]
    elif kind == "denormals":
        tiny = torch.finfo(dtype).tiny
        thetas = [t * tiny * 0.25 for t in thetas]
        grads = [g * tiny * 0.125 for g in grads]
    return _bag_of([t.to(dtype) for t in thetas], [g.to(dtype) for g in grads])


@pytest.mark.parametrize("kind", ["zero_grads", "ties", "huge", "signed_zeros", "denormals"])
@pytest.mark.parametrize("criterion", ["gallop", "saft", "magnitude", "pafi"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_adversarial(kind, criterion, dtype):
    bag = _adversarial(kind, DTYPES[dtype])
    for rho in (1 / 2000, 0.3):
        assert_same(bag, rho, criterion, "global")


@pytest.mark.parametrize("kind", ["zero_grads", "ties", "signed_zeros"])
@pytest.mark.parametrize("criterion", ["gallop", "pafi"])
def test_adversarial_heavy_ties(kind, criterion, monkeypatch):
    """A candidate buffer of 5 overflows at once: the low-digit and tie passes decide."""
    monkeypatch.setattr(reference, "CANDIDATE_CAP", 5)
    bag = _adversarial(kind, torch.bfloat16)
    for rho in (1 / 2000, 0.3):
        assert_same(bag, rho, criterion, "global")


def test_heavy_ties_take_four_passes(monkeypatch):
    """All-zero gradients and a tiny buffer: low-digit histogram, then ties by position."""
    modes = []
    real = st._launch
    monkeypatch.setattr(st, "_launch", lambda kern, *a, **m: modes.append(m.get("MODE")) or real(kern, *a, **m))
    monkeypatch.setattr(reference, "CANDIDATE_CAP", 5)
    bag = _adversarial("zero_grads", torch.float32)
    sel = assert_same(bag, 0.01, "gallop", "global")
    assert sel.num_selected == reference.num_to_select(0.01, B + 1 + 97 + 2 * B)
    assert modes[:3] == [None] * 3 and set(modes[3:]) == {"low", "above", "ties"}
    assert modes.count("ties") == 1  # the needed ties all lie in the first tensor's first block


def test_reads_theta_and_grad_twice(monkeypatch):
    reads = {}
    real = st._launch

    def counting(kernel, theta, grad, grid, *args, **meta):
        for t in {theta.data_ptr(), grad.data_ptr()}:
            reads[t] = reads.get(t, 0) + 1
        real(kernel, theta, grad, grid, *args, **meta)

    monkeypatch.setattr(st, "_launch", counting)
    bag = make_bag([B + 3, 5, 2 * B], torch.bfloat16)
    assert_same(bag, 0.05, "gallop", "global")
    tensors = [t for p in bag.parameters() for t in (p, p.grad)]
    assert [reads.get(t.data_ptr(), 0) for t in tensors] == [2] * len(tensors)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(2 * B + 6, generator=gen)
    mat = torch.randn(67, 129, generator=gen)
    bag = Bag([big[::2].clone(), mat.clone()])  # parameters must be leaves; set strided data below
    bag.w0.data = big[::2]
    bag.w1.data = mat.t()
    bag.w0.grad = torch.randn(3 * (B + 3), generator=gen)[::3]
    bag.w1.grad = torch.randn(67, 129, generator=gen).t()
    grads = {"w0": bag.w0.grad, "w1": torch.randn(129, 67, generator=gen).bfloat16().t().contiguous().t()}
    for criterion in ("gallop", "pafi"):
        assert_same(bag, 0.02, criterion, "global")
        assert_same(bag, 0.02, criterion, "global", grads=grads)
    flat, stride = st._flat(bag.w0.grad)  # a strided 1-D view is read in place, not copied
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
    assert_same(make_bag([50, 7], torch.float64), 0.1, "gallop", "global")
    assert_same(make_bag([50, 7]), 0.1, "random", "global")
    assert launches == []


def test_int64_offsets_by_arithmetic():
    """Grids, program numbers and positions for a tensor past 2**31 elements, nothing allocated."""
    n = 2**31 + 7
    grids, prog_base, bases = st._plan([n, 5, 0, 3])
    assert grids == [-(-n // B), 1, 0, 1]
    assert prog_base == [0, grids[0], grids[0] + 1, grids[0] + 1, grids[0] + 2]
    assert bases == [0, n, n + 5, n + 5, n + 8]
    last_first = (grids[0] - 1) * B  # the last program's first offset in the kernel
    assert last_first < n <= last_first + B and last_first + B > 2**31
    # The launcher's tensors of positions and program numbers are int64.
    pos = torch.tensor(bases)
    assert pos.dtype == torch.int64 and int(pos[-1]) == n + 8


def test_auto_backend_and_registration():
    assert select._TOPK_BACKENDS["triton"] is st.topk_keys_triton
    srcs = [reference.Source("a", torch.randn(3), torch.randn(3), 0)]
    assert select._pick_backend("auto", srcs, False) == "reference"  # CPU tensors
    assert select._pick_backend("triton", srcs, False) == "triton"


def test_launch_arguments_match_the_aot_signature(monkeypatch):
    """The buffers' dtypes the launcher passes are those test_triton_compile compiles."""
    seen = set()
    real = st._launch

    def spy(kernel, theta, grad, grid, *args, **meta):
        buffers = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
        seen.add((meta.get("MODE"), buffers))
        real(kernel, theta, grad, grid, *args, **meta)

    monkeypatch.setattr(st, "_launch", spy)
    assert_same(make_bag([B + 3, 5]), 0.05, "gallop", "global")
    monkeypatch.setattr(reference, "CANDIDATE_CAP", 5)
    assert_same(_adversarial("ties", torch.float32), 0.3, "gallop", "global")
    i64, i32 = "torch.int64", "torch.int32"
    emit = (i64, i64, i64, i64, i32, i64, i64)  # out, count, seg_dst, seg_cnt, key_buf, pos_buf, aux
    assert seen == {(None, (i64,))} | {(m, emit) for m in ("collect", "low", "above", "ties")}
