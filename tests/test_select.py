"""select_mask and Selection on the reference path, against a float64 full sort."""

import functools
import math

import pytest
import torch
from helpers import DTYPES, SIZES, Bag, make_bag, oracle_selection

import gallop_kernels as gk
from gallop_kernels import radix, reference, select
from gallop_kernels.reference import CRITERIA


def assert_same_selection(sel, expected, thr):
    assert set(sel) == set(expected)
    for name, idx in expected.items():
        assert sel[name].dtype == torch.int32  # every test tensor has fewer than 2^31 weights
        assert torch.equal(sel[name], idx), f"{name}: {sel[name].tolist()[:10]} != {idx.tolist()[:10]}"
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
    expected, _ = oracle_selection(bag, 0.3)
    assert_same_selection(sel, expected, sel.threshold)
    assert len(calls) == 2, "expected the low-digit histogram pass"


def test_chunks_bound_the_scored_block(monkeypatch):
    """No score tensor larger than one chunk is ever materialized."""
    use_config(monkeypatch, radix.Config(chunk=100))
    seen = []
    real = reference.score
    monkeypatch.setattr(reference, "score", lambda *a, **kw: seen.append(a[1].numel()) or real(*a, **kw))
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
