"""The host (CPU, compiled) selection backend returns exactly the reference Selection,
and its count / emit primitives match a plain torch computation block by block."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import ADVERSARIAL, DTYPES, Bag, adversarial_bag, bag_of, make_bag, oracle_topk, sources_of

import gallop_kernels as gk
from gallop_kernels import keys, radix, reference, select
from gallop_kernels.reference import CRITERIA

sh = pytest.importorskip("gallop_kernels.ops.select_host")
if not gk.backends()["host"]:
    pytest.skip("gallop_kernels._C is not built", allow_module_level=True)

B = 64  # block of the direct topk_keys_host calls: many blocks on small tensors
SIZES = [0, 1, 7, 97, B, B + 1, 3 * B + 11]
BIG = [0, 1, 7, 97, sh.BLOCK, sh.BLOCK + 1, 2 * sh.BLOCK + 11]  # around the default block (select_mask)
DTYPE_PAIRS = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"), ("fp32", "fp16")]
STREAMED = ["gallop", "saft", "magnitude", "pafi"]
# A narrow window even on small tensors: a dense sample and a small margin.
NARROW = radix.Config(sample_stride=3, margin_min=2, margin_sigmas=3.0)


def run_plan(srcs, k, criterion="gallop", seed=0, **kw):
    """topk_keys_host (host-only options in kw) against the float64 full-sort oracle and
    reference.topk_keys, exactly; the Plan (None: no plan ran)."""
    trace = []
    got, key = sh.topk_keys_host(srcs, k, criterion, seed=seed, trace=trace, **kw)
    want, want_key = reference.topk_keys(srcs, k, criterion, seed=seed)
    oracle, score = oracle_topk(srcs, k, criterion, seed=seed)
    assert len(got) == len(want) == len(oracle)
    for g, w, o in zip(got, want, oracle):
        assert g.dtype == torch.int64 and torch.equal(g, o), f"{g.tolist()[:8]} != {o.tolist()[:8]}"
        assert torch.equal(w, o)
    assert key == want_key and (key is None) == (score is None)
    assert key is None or reference.key_to_score(key) == score
    return trace[0] if trace else None


def assert_same_selection(model, rho, criterion, scope, **kw):
    got = gk.select_mask(model, rho=rho, criterion=criterion, scope=scope, backend="host", **kw)
    want = gk.select_mask(model, rho=rho, criterion=criterion, scope=scope, backend="reference", **kw)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert got.threshold == want.threshold
    return got


# ----------------------------------------------------------------------------
# equal to the reference
# ----------------------------------------------------------------------------

CASES = [(c, d, scope, rho) for c in CRITERIA for d in (DTYPE_PAIRS if c != "random" else DTYPE_PAIRS[:1])
         for scope, rho in (("global", 0.003), ("global", 0.5), ("global", 1.0), ("per_tensor", 0.3))]


@pytest.mark.parametrize("criterion,dtypes,scope,rho", CASES)
def test_select_mask_matches_reference(criterion, dtypes, scope, rho):
    bag = make_bag(BIG, DTYPES[dtypes[0]])
    grads = {n: p.grad.to(DTYPES[dtypes[1]]) for n, p in bag.named_parameters()}  # mixed pairs via grads=
    sel = assert_same_selection(bag, rho, criterion, scope, grads=grads)
    want = (reference.num_to_select(rho, sum(BIG)) if scope == "global"
            else sum(reference.num_to_select(rho, n) for n in BIG))
    assert sel.num_selected == want


@pytest.mark.parametrize("criterion", STREAMED)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: "-".join(d))
@pytest.mark.parametrize("rho", [0.001, 0.05, 0.5, 1.0])
def test_small_blocks_match_reference(criterion, dtypes, rho):
    bag = make_bag(SIZES, DTYPES[dtypes[0]])
    srcs = sources_of(bag, {n: p.grad.to(DTYPES[dtypes[1]]) for n, p in bag.named_parameters()})
    run_plan(srcs, reference.num_to_select(rho, sum(SIZES)), criterion, block=B)


def test_k_zero_and_empty_sources():
    srcs = sources_of(make_bag([0, 5, 0]))
    got, key = sh.topk_keys_host(srcs, 0, "gallop")
    assert key is None and [g.tolist() for g in got] == [[], [], []]
    run_plan(srcs, 1, block=B)
    run_plan(srcs, 5, block=B)


def _adversarial(kind: str, dtype) -> Bag:
    return adversarial_bag(kind, dtype, [3 * B + 5, 97, 2 * B])


@pytest.mark.parametrize("kind", ADVERSARIAL)
@pytest.mark.parametrize("criterion", STREAMED)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_adversarial(kind, criterion, dtype):
    bag = _adversarial(kind, DTYPES[dtype])
    srcs = sources_of(bag)
    n = sum(s.numel for s in srcs)
    for rho in (1 / n, 0.01, 0.3, 0.9):
        run_plan(srcs, reference.num_to_select(rho, n), criterion, block=B)
        run_plan(srcs, reference.num_to_select(rho, n), criterion, block=B, config=NARROW)


def test_strided_inputs():
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(2 * B + 6, generator=gen)
    mat = torch.randn(67, 129, generator=gen)
    bag = Bag([big[::2].clone(), mat.clone()])  # parameters must be leaves; set strided data below
    bag.w0.data = big[::2]
    bag.w1.data = mat.t()
    bag.w0.grad = torch.randn(3 * (B + 3), generator=gen)[::3]
    bag.w1.grad = torch.randn(67, 129, generator=gen).t()
    assert bag.w0.stride() == (2,) and bag.w0.grad.stride() == (3,) and bag.w1.stride() == (1, 129)
    grads = {"w0": bag.w0.grad, "w1": torch.randn(129, 67, generator=gen).bfloat16().t().contiguous().t()}
    for criterion in STREAMED:
        for g in (None, grads):
            srcs = sources_of(bag, g)
            run_plan(srcs, reference.num_to_select(0.05, sum(s.numel for s in srcs)), criterion, block=B)
        assert_same_selection(bag, 0.02, criterion, "global", grads=grads)


def test_float64_and_random_stay_on_the_reference():
    bag = make_bag([97, 200], torch.float64)
    assert not radix.streams(sources_of(bag), "gallop")
    assert run_plan(sources_of(bag), 20, "gallop") is None  # no window plan ran
    assert run_plan(sources_of(make_bag([97, 200])), 20, "random", seed=5) is None


# ----------------------------------------------------------------------------
# the modes of the plan
# ----------------------------------------------------------------------------


def test_collect_mode_with_a_narrow_window():
    srcs = sources_of(make_bag([30 * B + 11, 97, 8 * B], torch.bfloat16))
    n = sum(s.numel for s in srcs)
    plan = run_plan(srcs, reference.num_to_select(0.05, n), block=B, config=NARROW)
    assert plan.mode == "collect" and plan.lo < plan.hi
    assert 0 < plan.above < plan.above + plan.window < n  # a real window, not everything


@pytest.mark.parametrize("rho", [1 / 3000, 0.5, 0.9])
def test_ties_mode_when_all_weights_are_equal(rho):
    srcs = sources_of(_adversarial("all_equal", torch.bfloat16))
    n = sum(s.numel for s in srcs)
    plan = run_plan(srcs, reference.num_to_select(rho, n), block=B, config=NARROW)
    assert plan.mode == "ties"
    assert (plan.above, plan.window, plan.equal) == (0, 0, n)


@pytest.mark.parametrize("criterion", STREAMED)
def test_thirty_percent_zeros(criterion):
    srcs = sources_of(_adversarial("zeros_30pct", torch.float32))
    n = sum(s.numel for s in srcs)
    # The k-th score is an exact zero past 70% (pafi: below 30%, its largest score
    # being -0.0 -> +0.0): the ties mode; elsewhere the window collects.
    ties_rho, collect_rho = (0.9, 0.01) if criterion != "pafi" else (0.01, 0.5)
    assert run_plan(srcs, reference.num_to_select(collect_rho, n), criterion, block=B, config=NARROW).mode == "collect"
    plan = run_plan(srcs, reference.num_to_select(ties_rho, n), criterion, block=B, config=NARROW)
    assert plan.mode == "ties" and reference.key_to_score(plan.lo + keys.SIGN) == 0.0


def test_window_miss_and_overflow_fall_back(monkeypatch):
    calls = []
    real = reference.topk_keys
    monkeypatch.setattr(reference, "topk_keys", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    srcs = sources_of(make_bag([B + 5, 300]))
    k = reference.num_to_select(0.1, B + 305)
    assert run_plan(srcs, k, block=B, config=radix.Config(window_cap=1)).mode == "overflow"
    top = (1 << 31) - 1
    monkeypatch.setattr(radix, "window", lambda *a: (top - 1, top))  # above every key
    assert run_plan(srcs, k, block=B).mode == "miss"
    assert len(calls) == 2 * 2  # each: the fallback and run_plan's own reference call


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_nonfinite_score_names_parameter(bad, dtype):
    bag = make_bag([5, 3 * B], DTYPES[dtype])
    bag.w1.grad[B + 3] = bad
    with pytest.raises(ValueError, match=rf"'w1'.*(NaN|Inf).*flat index {B + 3}"):
        sh.topk_keys_host(sources_of(bag), 7, "gallop", block=B)


def test_zero_over_zero_is_an_error():
    bag = Bag([torch.tensor([0.0, 1.0, 2.0])])
    bag.w0.grad = torch.tensor([0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"'w0'.*NaN.*flat index 0"):
        gk.select_mask(bag, rho=0.5, eps=0.0, backend="host")


def test_threads_agree():
    """3 threads (2**18 weights each at least) and 1 thread: the same selection."""
    n = 3 * (1 << 18) + 5
    bag = bag_of([torch.randn(n).bfloat16(), torch.randn(999)], [torch.randn(n).bfloat16(), torch.randn(999)])
    srcs = sources_of(bag)
    for rho in (0.001, 0.2):
        k = reference.num_to_select(rho, n + 999)
        one = sh.topk_keys_host(srcs, k, "gallop", block=4096, num_threads=1)
        three = sh.topk_keys_host(srcs, k, "gallop", block=4096, num_threads=3)
        assert one[1] == three[1] and all(torch.equal(a, b) for a, b in zip(one[0], three[0]))
    prims = [sh.HostPrimitives(srcs, "gallop", 1e-8, block=4096, num_threads=t) for t in (1, 3)]
    assert torch.equal(prims[0].count(-5, 10**9), prims[1].count(-5, 10**9))


# ----------------------------------------------------------------------------
# the primitives, block by block, against plain torch
# ----------------------------------------------------------------------------


def _block_keys(srcs, criterion, block):
    """Per block (in table order): its signed keys and global positions, by torch ops."""
    out, base = [], 0
    for s in (s for s in srcs if s.numel):  # split() would give an empty tensor one block
        keys = reference.signed_key(reference.score(criterion, s.param, s.grad, 1e-8))
        pos = torch.arange(s.numel) + base
        out += list(zip(keys.split(block), pos.split(block)))
        base += s.numel
    return out


def _few_value_sources(dtype=torch.bfloat16):
    """Strided and contiguous sources of mixed dtypes whose keys repeat a lot."""
    gen = torch.Generator().manual_seed(11)
    mat = torch.randint(-3, 4, (40, 33), generator=gen).to(dtype)
    thetas = [torch.randint(-3, 4, (3 * B + 7,), generator=gen).float().to(dtype), mat.t(), torch.ones(0)]
    grads = [torch.randint(0, 5, (3 * B + 7,), generator=gen).float(), torch.randn(40, 33, generator=gen).t().half(),
             torch.ones(0)]
    return [reference.Source(f"w{i}", t, g, 0) for i, (t, g) in enumerate(zip(thetas, grads))]


@pytest.mark.parametrize("criterion", STREAMED)
def test_count_matches_torch(criterion):
    srcs = _few_value_sources()
    prims = sh.HostPrimitives(srcs, criterion, 1e-8, block=B)
    blocks = _block_keys(srcs, criterion, B)
    assert prims.num_blocks == len(blocks) == 4 + 21
    allk = torch.cat([k for k, _ in blocks])
    for lo, hi in [(int(allk.min()), int(allk.max())), (int(allk.median()), int(allk.max()) - 1),
                   (int(allk.median()), int(allk.median())), (-(1 << 31), (1 << 31) - 1)]:
        counts = prims.count(lo, hi)
        assert counts.dtype == torch.int32 and counts.shape == (len(blocks), 4)
        want = torch.tensor([[int((k > hi).sum()), int(((k > lo) & (k <= hi)).sum()), int((k == lo).sum()), 0]
                             for k, _ in blocks], dtype=torch.int32)
        assert torch.equal(counts, want), (lo, hi)


def test_count_flags_nonfinite_per_block():
    t = torch.ones(3 * B)
    g = torch.ones(3 * B)
    g[B + 1], g[B + 2], t[2 * B] = float("nan"), float("inf"), 0.0
    prims = sh.HostPrimitives([reference.Source("w", t, g, 0)], "gallop", 0.0, block=B)
    assert prims.count(0, 0)[:, 3].tolist() == [0, 2, 1]  # 1 / (0 + 0) = Inf in block 2


@pytest.mark.parametrize("criterion", STREAMED)
def test_emit_collect_matches_torch(criterion):
    srcs = _few_value_sources()
    prims = sh.HostPrimitives(srcs, criterion, 1e-8, block=B)
    blocks = _block_keys(srcs, criterion, B)
    allk = torch.cat([k for k, _ in blocks])
    lo, hi = int(allk.kthvalue(allk.numel() // 3).values), int(allk.kthvalue(2 * allk.numel() // 3).values)
    assert lo < hi
    counts = prims.count(lo, hi).long()
    above, inside = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    out = torch.full((above,), -1, dtype=torch.int64)
    cand_key = torch.zeros(inside, dtype=torch.int32)
    cand_pos = torch.full((inside,), -1, dtype=torch.int64)
    starts = lambda c: c.cumsum(0) - c  # noqa: E731
    prims.emit(lo, hi, out, starts(counts[:, 0]), None, cand_key, cand_pos, starts(counts[:, 1]))
    assert torch.equal(out, torch.cat([p[k > hi] for k, p in blocks]))
    win = [(k > lo) & (k <= hi) for k, _ in blocks]
    assert torch.equal(cand_key, torch.cat([k[w] for (k, _), w in zip(blocks, win)]))
    assert torch.equal(cand_pos, torch.cat([p[w] for (_, p), w in zip(blocks, win)]))


@pytest.mark.parametrize("criterion", STREAMED)
def test_emit_ties_matches_torch(criterion):
    srcs = _few_value_sources()
    prims = sh.HostPrimitives(srcs, criterion, 1e-8, block=B)
    blocks = _block_keys(srcs, criterion, B)
    lo = int(torch.cat([k for k, _ in blocks]).mode().values)  # the most frequent key
    counts = prims.count(lo, lo).long()
    gen = torch.Generator().manual_seed(0)
    quota = (torch.rand(len(blocks), generator=gen) * (counts[:, 2] + 1)).long().minimum(counts[:, 2])
    assert quota.sum() > 0 and (quota < counts[:, 2]).any()
    sizes = counts[:, 0] + quota
    out = torch.full((int(sizes.sum()),), -1, dtype=torch.int64)
    prims.emit(lo, lo, out, sizes.cumsum(0) - sizes, quota.int(), None, None, None)
    want = []
    for (k, p), q in zip(blocks, quota.tolist()):
        tie = (k == lo).nonzero().reshape(-1)[:q]
        take = k > lo
        take[tie] = True
        want.append(p[take])
    assert torch.equal(out, torch.cat(want))


def test_primitives_reject_bad_arguments():
    srcs = _few_value_sources()
    prims = sh.HostPrimitives(srcs, "gallop", 1e-8, block=B)
    with pytest.raises(ValueError, match="lo <= hi"):
        prims.count(5, 4)
    counts = prims.count(0, 10).long()
    dst = counts[:, 0].cumsum(0) - counts[:, 0]
    out = torch.empty(int(counts[:, 0].sum()), dtype=torch.int64)
    with pytest.raises(ValueError, match="out_dst"):
        prims.emit(0, 10, out, dst[:-1], None, None, None, None)
    with pytest.raises(ValueError, match="quota"):
        prims.emit(0, 10, out, dst, dst, None, None, None)  # int64 quota
    for block in (0, (1 << 30) + 1):
        with pytest.raises(ValueError, match="block must be"):
            sh.HostPrimitives(srcs, "gallop", 1e-8, block=block)
    with pytest.raises(ValueError, match="'w0' has no gradient"):
        sh.HostPrimitives([reference.Source("w0", torch.ones(3), None, 0)], "saft", 1e-8)
    with pytest.raises(ValueError, match="no host kernel"):
        sh.HostPrimitives(srcs, "random", 1e-8)


# ----------------------------------------------------------------------------
# backend choice
# ----------------------------------------------------------------------------


def test_auto_picks_host_for_cpu_tensors():
    srcs = sources_of(make_bag([10]))
    assert select._TOPK_BACKENDS["host"] is sh.topk_keys_host
    assert select._pick_backend("auto", srcs, False) == "host"
    assert select._pick_backend("auto", srcs, True) == "reference"  # across ranks


def test_disabled_extension_falls_back_to_reference():
    script = (
        "import torch, gallop_kernels as gk\n"
        "from gallop_kernels import select\n"
        "from gallop_kernels.reference import Source\n"
        "print(select._pick_backend('auto', [Source('w', torch.ones(3), None, 0)], False))\n"
        "try:\n    gk.select_mask(torch.nn.Linear(2, 2), rho=0.5, criterion='magnitude', backend='host')\n"
        "except RuntimeError as e:\n    print('needs the compiled extension' in str(e))\n"
    )
    env = dict(os.environ, GALLOP_KERNELS_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "True"]
