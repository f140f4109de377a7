"""The window plan (radix.select_window) with plain-torch primitives, against the oracle.

``TorchPrimitives`` is the executable spec of radix.Primitives: materialized keys,
no kernels. Any backend's primitives must return what it returns.
"""

import pytest
import torch
from helpers import Bag, make_bag, oracle_topk, sources_of

from gallop_kernels import radix, reference


class TorchPrimitives:
    """radix.Primitives by materializing every key (tests only)."""

    def __init__(self, sources, criterion, eps=1e-8, block=64):
        self.device = torch.device("cpu")
        keys, block_of, pos = [], [], []
        first = radix.bases(sources)
        nblocks = 0
        for s, base in zip(sources, first):
            keys.append(reference.signed_key(reference.score(criterion, s.param, s.grad, eps)))
            local = torch.arange(s.numel, dtype=torch.int64)
            block_of.append(nblocks + local // block)
            pos.append(base + local)
            nblocks += -(-s.numel // block)
        self.keys, self.block, self.pos = torch.cat(keys), torch.cat(block_of), torch.cat(pos)
        self.num_blocks = nblocks

    def _per_block(self, mask):
        return torch.bincount(self.block[mask], minlength=self.num_blocks)

    def count(self, lo, hi):
        k = self.keys
        bad = (k > radix.FINITE_MAX) | (k < radix.FINITE_MIN)
        parts = [k > hi, (k > lo) & (k <= hi), k == lo, bad]
        return torch.stack([self._per_block(m) for m in parts], 1).to(torch.int32)

    def _rank_in_block(self, mask):
        """1-based rank of each masked weight among its block's masked weights."""
        c = torch.cumsum(mask.to(torch.int64), 0)
        before = torch.zeros(self.num_blocks + 1, dtype=torch.int64)
        before[1:] = torch.cumsum(self._per_block(mask), 0)
        return c - before[self.block]

    def emit(self, lo, hi, out, out_dst, quota, cand_key, cand_pos, cand_dst):
        take = self.keys > hi
        if quota is not None:
            tie = self.keys == lo
            take |= tie & (self._rank_in_block(tie) <= quota.to(torch.int64)[self.block])
        out[out_dst[self.block[take]] + self._rank_in_block(take)[take] - 1] = self.pos[take]
        if cand_key is not None:
            cand = (self.keys > lo) & (self.keys <= hi)
            slot = cand_dst[self.block[cand]] + self._rank_in_block(cand)[cand] - 1
            cand_key[slot] = self.keys[cand]
            cand_pos[slot] = self.pos[cand]


def select(sources, k, criterion="gallop", config=radix.DEFAULT):
    """select_window with TorchPrimitives, checked against the full-sort oracle; the Plan."""
    trace, fell_back = [], []

    def fallback():
        fell_back.append(True)
        return reference.topk_keys(sources, k, criterion)

    prims = TorchPrimitives(sources, criterion)
    got, key = radix.select_window(sources, k, criterion, 1e-8, prims, fallback, config, trace)
    want, score = oracle_topk(sources, k, criterion)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert reference.key_to_score(key) == score
    assert bool(fell_back) == (trace[0].mode in ("miss", "overflow"))
    return trace[0]


def _llm_like(sizes, gen):
    thetas = [torch.randn(n, generator=gen) * 0.02 for n in sizes]
    grads = [torch.randn(n, generator=gen) * 1e-4 for n in sizes]
    bag = Bag([t.bfloat16() for t in thetas])
    for p, g in zip(bag.parameters(), grads):
        p.grad = g.bfloat16()
    return bag


@pytest.mark.parametrize("rho", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("data", ["normal", "llm"])
def test_default_window_holds_the_threshold(rho, data):
    """At ~1e6 weights over tensors of awkward sizes, the sampled window holds the k-th
    key and is as small as its margin says."""
    sizes = [4096 * 129, 1, 257 * 1000, 11, 300_007]
    gen = torch.Generator().manual_seed(5)
    bag = make_bag(sizes, torch.bfloat16, gen) if data == "normal" else _llm_like(sizes, gen)
    n = sum(sizes)
    k = reference.num_to_select(rho, n)
    plan = select(sources_of(bag), k)
    assert plan.mode in ("collect", "ties")
    # the window holds about 2 * margin sample ranks of stride weights each
    m = sum(-(-s // radix.DEFAULT.sample_stride) for s in sizes)
    margin = radix.DEFAULT.margin_sigmas * (m * rho * (1 - rho)) ** 0.5 + radix.DEFAULT.margin_min
    assert plan.window < 1.5 * 2 * margin * n / m


def test_modes_and_tie_quota_across_sources():
    bag = Bag([torch.ones(100), torch.ones(37), torch.ones(250)])
    for p in bag.parameters():
        p.grad = torch.ones_like(p)
    for k in (1, 64, 100, 101, 386, 387):
        plan = select(sources_of(bag), k)
        assert plan.mode == "ties" and (plan.above, plan.window, plan.equal) == (0, 0, 387)


def test_miss_and_overflow_fall_back():
    n = 1000
    bag = Bag([torch.ones(n)])
    bag.w0.grad = torch.where(torch.arange(n) % 2 == 1, 100.0, 1.0) * (1 + torch.rand(n))
    blind = radix.Config(sample_stride=2, margin_sigmas=0.0, margin_min=0)
    assert select(sources_of(bag), 100, config=blind).mode == "miss"
    assert select(sources_of(make_bag([500, 300])), 80, config=radix.Config(window_cap=3)).mode == "overflow"


def test_nonfinite_is_reported_by_the_count_pass():
    bag = make_bag([100, 50])
    bag.w1.grad[7] = float("nan")
    with pytest.raises(ValueError, match=r"'w1'.*NaN.*flat index 7"):
        select(sources_of(bag), 10)


def test_window_edges():
    """k at the top of the sample: hi opens to the int32 limit; at its bottom, lo stops
    at the smallest sample key."""
    sample = torch.arange(-5, 5, dtype=torch.int32)
    cfg = radix.Config(margin_sigmas=0.0, margin_min=2)
    assert radix.window(sample, 1, 10, cfg) == (1, 2**31 - 1)  # keys 4 3 2 1 ...
    assert radix.window(sample, 10, 10, cfg) == (-5, -4)
    lo, hi = radix.window(sample, 5, 10, cfg)
    assert -5 < lo < hi < 4


def test_sample_keys_match_the_reference_keys_and_do_not_copy():
    mat = torch.randn(67, 129).t()  # no flat view: the sampled weights are gathered
    srcs = [reference.Source("a", mat, torch.randn(129, 67), 0),
            reference.Source("b", torch.randn(1000).bfloat16(), torch.randn(1000).bfloat16(), 0)]
    got = radix.sample_keys(srcs, "gallop", 1e-8, 7)
    want = torch.cat([reference.signed_key(reference.score("gallop", s.param, s.grad))[::7] for s in srcs])
    assert torch.equal(torch.sort(got).values, torch.sort(want).values)


def test_stride_is_odd_and_bounds_the_sample():
    cfg = radix.Config(sample_stride=257, sample_max=1000)
    assert radix.stride(257_000, cfg) == 257
    for n in (257_001, 10**6, 8 * 10**9):
        s = radix.stride(n, cfg)
        assert s % 257 == 0 and s % 2 == 1 and -(-n // s) <= 1000
