"""select_mask and Selection on the reference path, against a float64 full sort."""

import functools
import math

import pytest
import torch
from helpers import (ADVERSARIAL, DTYPES, FLT_MAX, FLT_MAX_PAIRS, OVERFLOW_PAIRS, SELECTION_BACKENDS, SIZES, Bag,
                     adversarial_bag, bag_of, make_bag, on_backend_device, oracle_selection, usable_backend)

import gallop_kernels as gk
from gallop_kernels import keys, radix, reference, select
from gallop_kernels.reference import CRITERIA


def assert_same_selection(sel, expected, thr):
    assert set(sel) == set(expected)
    for name, idx in expected.items():
        assert sel[name].dtype == torch.int32  # every test tensor has fewer than 2^31 weights
        assert torch.equal(sel[name].cpu(), idx), f"{name}: {sel[name].tolist()[:10]} != {idx.tolist()[:10]}"
    assert sel.threshold == thr


def use_config(monkeypatch, config: radix.Config) -> None:
    """Make select_mask's reference backend run with ``config``."""
    monkeypatch.setitem(select._TOPK_BACKENDS, "reference", functools.partial(reference.topk_keys, config=config))


@pytest.fixture(params=[False, True], ids=["chunk=default", "chunk=tiny"])
def tiny_chunks(request, monkeypatch):
    """Also run the reference with chunks and candidate buffers far smaller than the
    tensors; the backend to ask for (auto is the host backend on the CPU when built)."""
    if request.param:  # several chunks in the larger tensors
        use_config(monkeypatch, radix.Config(chunk=1000, candidate_cap=5))
        return "reference"
    return "auto"


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("scope", gk.SCOPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={d}")
@pytest.mark.parametrize("rho", [0.001, 0.05, 0.5, 1.0])
def test_matches_full_sort(criterion, scope, dtype, rho, tiny_chunks):
    bag = make_bag(SIZES, DTYPES[dtype])
    sel = gk.select_mask(bag, rho=rho, criterion=criterion, scope=scope, backend=tiny_chunks)
    expected, thr = oracle_selection(bag, rho, criterion, scope)
    assert_same_selection(sel, expected, thr)
    n = sum(SIZES)
    if scope == "global":
        assert sel.num_selected == reference.num_to_select(rho, n)
    else:
        assert sel.num_selected == sum(reference.num_to_select(rho, s) for s in SIZES)
    assert sel.num_total == n


def test_tiny_chunks_take_every_path(monkeypatch):
    """Chunks of 64 and a buffer of 5 force the three-pass (heavy tie) resolution."""
    calls = []
    real = radix.boundary
    monkeypatch.setattr(radix, "boundary", lambda h, k: calls.append(k) or real(h, k))
    use_config(monkeypatch, radix.Config(chunk=64, candidate_cap=5))
    bag = make_bag([300, 301])
    for p in bag.parameters():  # 3 distinct values: the boundary bin is huge
        p.grad = torch.randint(0, 3, p.shape).float()
        p.data.fill_(1.0)
    sel = gk.select_mask(bag, rho=0.3, backend="reference")
    expected, thr = oracle_selection(bag, 0.3)
    assert_same_selection(sel, expected, thr)
    assert len(calls) == 2, "expected the low-digit histogram pass"


def test_chunks_bound_the_scored_block(monkeypatch):
    """No score tensor larger than one chunk is ever materialized."""
    use_config(monkeypatch, radix.Config(chunk=100))
    seen = []
    real = keys.score
    monkeypatch.setattr(keys, "score", lambda *a, **kw: seen.append(a[1].numel()) or real(*a, **kw))
    bag = make_bag([1000, 257])
    gk.select_mask(bag, rho=0.1, backend="reference")
    assert seen and max(seen) <= 100


def test_ties_go_to_earlier_parameter_then_lower_index():
    bag = Bag([torch.ones(10), torch.ones(10)])
    for p in bag.parameters():
        p.grad = torch.ones(10)
    sel = gk.select_mask(bag, rho=0.75)  # k = 15 of 20 equal scores
    assert sel["w0"].tolist() == list(range(10))
    assert sel["w1"].tolist() == list(range(5))
    assert sel.threshold == pytest.approx(1.0 / (1.0 + 1e-8))


def test_all_zero_gradients_select_first_weights():
    bag = make_bag([50, 50])
    for p in bag.parameters():
        p.grad.zero_()
    sel = gk.select_mask(bag, rho=0.1)
    assert sel["w0"].tolist() == list(range(10)) and sel["w1"].numel() == 0
    assert sel.threshold == 0.0


def test_zero_weight_dominates_and_signed_zero_ties():
    bag = Bag([torch.tensor([0.0, -0.0, 1.0, 2.0])])
    bag.w0.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    sel = gk.select_mask(bag, rho=0.5)
    assert sel["w0"].tolist() == [0, 1]  # |g| / eps = 1e8 for both zeros
    sel = gk.select_mask(bag, rho=0.25, criterion="pafi")
    assert sel["w0"].tolist() == [0]  # +0.0 and -0.0 tie; the lower index wins


def test_denormals_and_huge_values():
    p = torch.tensor([1e-40, 1e-45, 3e38, 1.0, 0.5])
    bag = Bag([p.clone()])
    bag.w0.grad = torch.tensor([1e-40, 2e-45, 1e38, 3.0, 1e-30])
    for crit in ("gallop", "saft", "magnitude", "pafi"):
        sel = gk.select_mask(bag, rho=0.4, criterion=crit)
        expected, thr = oracle_selection(bag, 0.4, crit)
        assert_same_selection(sel, expected, thr)


@pytest.mark.parametrize("kind", ADVERSARIAL)
@pytest.mark.parametrize("criterion", ["gallop", "saft", "magnitude", "pafi"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={d}")
def test_adversarial_matches_full_sort(kind, criterion, dtype, monkeypatch):
    """The reference plan, with its default buffers and with chunks and a candidate buffer far
    smaller than the tensors (low-digit histogram and tie quotas), against the float64 sort."""
    bag = adversarial_bag(kind, DTYPES[dtype], [1500, 97, 1024])
    for config in (radix.DEFAULT, radix.Config(chunk=1000, candidate_cap=5)):
        use_config(monkeypatch, config)
        for rho in (1 / 2621, 0.01, 0.3, 0.9):
            sel = gk.select_mask(bag, rho=rho, criterion=criterion, backend="reference")
            assert_same_selection(sel, *oracle_selection(bag, rho, criterion))


@pytest.mark.parametrize("backend", SELECTION_BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"], ids=lambda d: f"dtype={d}")
def test_scores_at_flt_max_are_selected(backend, dtype):
    """Scores of exactly FLT_MAX (the largest finite float32), reached exactly or by rounding,
    rank first and tie by position; every backend agrees with the float64 sort."""
    backend = usable_backend(backend)
    pairs = FLT_MAX_PAIRS[DTYPES[dtype]]
    gen = torch.Generator().manual_seed(5)
    thetas = [torch.randn(3000, generator=gen), torch.randn(97, generator=gen)]
    grads = [torch.randn(3000, generator=gen), torch.randn(97, generator=gen)]
    for t, g in zip(thetas, grads):
        for i, (gv, tv) in enumerate(pairs):
            g[10 * i + 3], t[10 * i + 3] = gv, -tv
    bag = bag_of([t.to(DTYPES[dtype]) for t in thetas], [g.to(DTYPES[dtype]) for g in grads])
    bag = on_backend_device(bag, backend)
    for k in (1, len(pairs), 2 * len(pairs), 40):
        sel = gk.select_mask(bag, rho=k / 3097, backend=backend)
        expected, thr = oracle_selection(bag, k / 3097)
        assert_same_selection(sel, expected, thr)
        if k <= 2 * len(pairs):
            assert thr == FLT_MAX


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter divides in numpy
@pytest.mark.parametrize("backend", SELECTION_BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"], ids=lambda d: f"dtype={d}")
@pytest.mark.parametrize("pair", [0, 1])
def test_score_overflowing_to_inf_raises(backend, dtype, pair):
    """Finite weights and gradients whose float32 score |g| / (|theta| + eps) overflows to +Inf
    (one ulp past a pair that scores FLT_MAX): every backend raises, naming the parameter and
    the index, as README says for an Inf score."""
    backend = usable_backend(backend)
    gv, tv = OVERFLOW_PAIRS[DTYPES[dtype]][pair]
    gen = torch.Generator().manual_seed(6)
    thetas = [torch.randn(3000, generator=gen), torch.randn(97, generator=gen)]
    grads = [torch.randn(3000, generator=gen), torch.randn(97, generator=gen)]
    grads[1][41], thetas[1][41] = -gv, tv
    bag = bag_of([t.to(DTYPES[dtype]) for t in thetas], [g.to(DTYPES[dtype]) for g in grads])
    bag = on_backend_device(bag, backend)
    assert torch.isfinite(bag.w1.detach()).all() and torch.isfinite(bag.w1.grad).all()
    with pytest.raises(ValueError, match=r"parameter 'w1': gallop score is Inf at flat index 41 "):
        gk.select_mask(bag, rho=0.01, backend=backend)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_score_names_parameter(bad):
    bag = make_bag([5, 5])
    bag.w1.grad[3] = bad
    with pytest.raises(ValueError, match=r"'w1'.*(NaN|Inf).*flat index 3"):
        gk.select_mask(bag, rho=0.5)


def test_zero_eps_zero_weight_is_an_error():
    bag = Bag([torch.tensor([0.0, 1.0])])
    bag.w0.grad = torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match=r"'w0'.*Inf"):
        gk.select_mask(bag, rho=0.5, eps=0.0)


def test_scores_are_float32_whatever_the_dtype():
    theta = torch.tensor([0.3, 1.7, 2.9], dtype=torch.bfloat16)
    grad = torch.tensor([0.1, 0.9, 0.2], dtype=torch.float16)
    s = reference.score("gallop", theta, grad, 1e-8)
    assert s.dtype == torch.float32
    exact = grad.double().abs() / (theta.double().abs() + 1e-8)
    torch.testing.assert_close(s.double(), exact, rtol=2.4e-7 * 4, atol=0)


def test_random_is_seeded_and_position_dependent():
    bag = make_bag([1000])
    a = gk.select_mask(bag, rho=0.1, criterion="random", seed=1)
    b = gk.select_mask(bag, rho=0.1, criterion="random", seed=1)
    c = gk.select_mask(bag, rho=0.1, criterion="random", seed=2)
    assert torch.equal(a["w0"], b["w0"]) and not torch.equal(a["w0"], c["w0"])
    # positions past 2**32 hash differently from their low 32 bits
    pos = torch.arange(100, dtype=torch.int64)
    assert not torch.equal(reference.random_score(pos, 0), reference.random_score(pos + 2**32, 0))
    s = reference.random_score(torch.arange(100_000), 0)
    assert 0.0 <= float(s.min()) and float(s.max()) < 1.0 and abs(float(s.mean()) - 0.5) < 0.01


def test_grads_mapping_and_frozen_parameters():
    bag = make_bag([20, 30, 40])
    bag.w1.requires_grad_(False)
    grads = {n: torch.randn(p.shape) for n, p in bag.named_parameters() if p.requires_grad}
    sel = gk.select_mask(bag, grads, rho=0.2)
    assert set(sel) == {"w0", "w2"} and sel.num_total == 60
    expected, thr = oracle_selection(bag, 0.2, grads=grads)
    assert_same_selection(sel, expected, thr)


def test_gradient_free_criteria_need_no_gradient():
    bag = Bag([torch.randn(30)])
    sel = gk.select_mask(bag, rho=0.1, criterion="magnitude")
    assert torch.equal(sel["w0"], torch.sort(bag.w0.detach().abs().topk(3).indices).values)


def test_num_to_select_rounding():
    assert reference.num_to_select(0.5, 3) == 2  # 1.5 rounds up
    assert reference.num_to_select(0.25, 10) == 3  # 2.5 rounds up
    assert reference.num_to_select(1e-9, 10) == 1  # at least one
    assert reference.num_to_select(1.0, 7) == 7
    assert reference.num_to_select(0.3, 0) == 0
    assert reference.num_to_select(0.01, 8_000_000_000) == 80_000_000  # beyond int32


def test_boundary_counts_beyond_int32():
    hist = torch.zeros(radix.NUM_BINS, dtype=torch.int64)
    hist[-1], hist[100], hist[7] = 2**32, 3 * 2**31, 5
    assert radix.boundary(hist, 2**32) == (radix.NUM_BINS - 1, 0)
    assert radix.boundary(hist, 2**32 + 1) == (100, 2**32)
    assert radix.boundary(hist, 2**32 + 3 * 2**31 + 2) == (7, 2**32 + 3 * 2**31)


def test_signed_key_orders_like_floats():
    vals = torch.tensor([-float("inf"), -3.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 2.0, float("inf")])
    keys = reference.signed_key(vals).to(torch.int64) + 2**31
    assert bool((keys[1:] >= keys[:-1]).all())
    assert int(keys[3]) + 1 == int(keys[4])  # -0.0 just below +0.0
    for v, k in zip(vals.tolist(), keys.tolist()):
        assert reference.key_to_score(k) == v and math.copysign(1, reference.key_to_score(k)) == math.copysign(1, v)


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_rho_out_of_range(rho):
    with pytest.raises(ValueError, match="rho"):
        gk.select_mask(make_bag([10]), rho=rho)


def test_unknown_criterion_scope_backend_eps():
    bag = make_bag([10])
    with pytest.raises(ValueError, match="criterion 'bogus'"):
        gk.select_mask(bag, criterion="bogus")
    with pytest.raises(ValueError, match="scope 'layer'"):
        gk.select_mask(bag, scope="layer")
    with pytest.raises(ValueError, match="backend 'cuda'"):
        gk.select_mask(bag, backend="cuda")
    with pytest.raises(ValueError, match="eps"):
        gk.select_mask(bag, eps=-1.0)


def test_gradient_problems_name_the_parameter():
    bag = make_bag([10, 12])
    with pytest.raises(ValueError, match=r"'w1'.*shape \(11,\)"):
        gk.select_mask(bag, {"w0": torch.randn(10), "w1": torch.randn(11)})
    with pytest.raises(ValueError, match=r"'w1' has no gradient.*missing from grads"):
        gk.select_mask(bag, {"w0": torch.randn(10)})
    with pytest.raises(ValueError, match=r"'w1'.*on meta"):
        gk.select_mask(bag, {"w0": torch.randn(10), "w1": torch.empty(12, device="meta")})
    with pytest.raises(ValueError, match=r"not trainable parameters.*'nope'"):
        gk.select_mask(bag, {"w0": torch.randn(10), "w1": torch.randn(12), "nope": torch.randn(1)})
    with pytest.raises(TypeError, match=r"'w0'.*gradient dtype torch.int32"):
        gk.select_mask(bag, {"w0": torch.zeros(10, dtype=torch.int32), "w1": torch.randn(12)})
    bag.w0.grad = None
    with pytest.raises(ValueError, match=r"'w0' has no gradient.*\.grad is None"):
        gk.select_mask(bag)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("criterion", ["gallop", "magnitude"])
def test_meta_parameters_name_themselves(backend, criterion):
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    with pytest.raises(ValueError, match=r"^parameter 'weight' is on the meta device: load or materialize"):
        gk.select_mask(model, rho=0.5, criterion=criterion, backend=backend)


@pytest.mark.parametrize("seed", ["a", 1.5, None, True])
def test_seed_must_be_an_integer(seed):
    with pytest.raises(TypeError, match=rf"^seed must be an integer, got {seed!r}$"):
        gk.select_mask(make_bag([10]), rho=0.5, criterion="random", seed=seed)


def test_no_trainable_parameters():
    bag = make_bag([3])
    bag.w0.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gk.select_mask(bag)


# ----------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------


def test_selection_accessors_and_masks():
    bag = make_bag([12, 0, 30], shapes=[(3, 4), (0, 5), (5, 6)])
    sel = gk.select_mask(bag, rho=0.25)
    assert sel.num_selected == 11 and sel.num_total == 42  # 10.5 rounds up
    assert sel.density == pytest.approx(11 / 42)
    masks = sel.masks()
    for name, p in bag.named_parameters():
        assert masks[name].shape == p.shape and masks[name].dtype == torch.bool
        assert torch.equal(masks[name].reshape(-1).nonzero().reshape(-1), sel[name])
    assert "num_selected=11" in repr(sel)


def test_selection_equality():
    bag = make_bag([40, 41])
    sel = gk.select_mask(bag, rho=0.1)
    same = gk.select_mask(bag, rho=0.1)
    assert sel == same and not (sel != same) and sel == gk.Selection.from_state_dict(sel.state_dict())
    assert sel == sel.to("cpu") and sel is not sel.to("cpu")
    with pytest.raises(TypeError, match="unhashable"):
        hash(sel)
    assert sel != {n: sel[n] for n in sel}  # a plain mapping of the same indices is not a Selection
    moved = gk.Selection.from_state_dict(sel.state_dict())
    moved._indices["w1"] = moved["w1"] + 1  # one index apart
    assert sel != moved
    state = sel.state_dict()
    del state["indices"]["w1"], state["shapes"]["w1"]
    assert sel != gk.Selection.from_state_dict(state)  # one parameter fewer
    for field, value in (("rho", 0.2), ("criterion", "saft"), ("scope", "per_tensor"), ("threshold", 0.5)):
        state = sel.state_dict()
        state[field] = value
        assert sel != gk.Selection.from_state_dict(state), field


def test_selection_state_dict_round_trip(tmp_path):
    bag = make_bag([40, 41])
    sel = gk.select_mask(bag, rho=0.1, scope="per_tensor")
    torch.save(sel.state_dict(), tmp_path / "sel.pt")
    back = gk.Selection.from_state_dict(torch.load(tmp_path / "sel.pt"))
    assert dict(back.shapes) == dict(sel.shapes) and back.threshold == sel.threshold
    assert back.scope == "per_tensor" and back.criterion == "gallop" and back.rho == 0.1
    assert all(torch.equal(back[n], sel[n]) for n in sel)


def test_selection_load_rejects_bad_indices():
    sel = gk.select_mask(make_bag([10]), rho=0.3)
    state = sel.state_dict()
    state["indices"]["w0"] = torch.tensor([1, 10])
    with pytest.raises(ValueError, match=r"'w0'.*out of range \[0, 10\)"):
        gk.Selection.from_state_dict(state)
    state["indices"]["w0"] = torch.tensor([3, 1])
    with pytest.raises(ValueError, match=r"'w0'.*sorted"):
        gk.Selection.from_state_dict(state)
    state["version"] = 99
    with pytest.raises(ValueError, match="version"):
        sel.load_state_dict(state)


def test_api_mistakes_name_themselves():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(TypeError, match=r"grads must be a mapping of parameter name -> gradient tensor.*rho=0\.01"):
        gk.select_mask(model, 0.01)  # rho passed where grads goes
    with pytest.raises(TypeError, match=r"grads must be a mapping of parameter name -> gradient tensor.*got list"):
        gk.select_mask(model, [torch.ones(3, 4), torch.ones(3)])
    with pytest.raises(TypeError, match=r"grads\['bias'\] must be a tensor, got list"):
        gk.select_mask(model, {"weight": torch.ones(3, 4), "bias": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="lacks 'indices', 'shapes', 'rho', 'criterion', 'scope', 'threshold'"):
        gk.Selection.from_state_dict({"version": 1})
    state = gk.select_mask(model, rho=0.5, criterion="magnitude").state_dict()
    del state["scope"]
    with pytest.raises(ValueError, match=r"lacks 'scope':"):
        gk.Selection.from_state_dict(state)
