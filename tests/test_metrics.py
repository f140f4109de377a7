"""Forget Ratio and Collapse Rate on hand-computed cases."""

import math

import pytest

from gallop_kernels.finetune.metrics import binomial_se, collapse_rate, forget_ratio, mean_se


@pytest.mark.parametrize(
    "vanilla, tuned, expected",
    [
        (0.50, 0.40, 0.20),  # (0.5 - 0.4) / 0.5
        (0.80, 0.20, 0.75),  # (0.8 - 0.2) / 0.8
        (0.60, 0.00, 1.00),  # everything forgotten
        (0.40, 0.40, 0.00),  # nothing forgotten
        (0.40, 0.55, 0.00),  # OOD accuracy rose: clamped at 0, never negative
        (0.00, 0.00, 0.00),  # vanilla accuracy 0: nothing to forget
        (0.00, 0.30, 0.00),
    ],
)
def test_forget_ratio_hand_computed(vanilla, tuned, expected):
    assert math.isclose(forget_ratio(vanilla, tuned), expected, abs_tol=1e-12)


def test_forget_ratio_of_a_mean_over_ood_tasks():
    vanilla_ood = [0.6, 0.5, 0.4]  # mean 0.5
    tuned_ood = [0.3, 0.5, 0.1]  # mean 0.3
    fr = forget_ratio(sum(vanilla_ood) / 3, sum(tuned_ood) / 3)
    assert math.isclose(fr, 0.4)  # (0.5 - 0.3) / 0.5


@pytest.mark.parametrize(
    "accs, expected",
    [
        ([0.5, 0.6, 0.7], 0.0),
        ([0.0, 0.6, 0.7, 0.2], 0.25),
        ([0.0099, 0.0, 0.5], 2 / 3),  # 0.99% floors to 0%: collapsed
        ([0.01, 0.0100001, 0.9], 0.0),  # exactly 1% does not
        ([0.0, 0.0], 1.0),
    ],
)
def test_collapse_rate_hand_computed(accs, expected):
    assert math.isclose(collapse_rate(accs), expected)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_metrics_refuse_accuracies_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="accuracy in"):
        forget_ratio(bad, 0.5)
    with pytest.raises(ValueError, match="accuracy in"):
        forget_ratio(0.5, bad)
    with pytest.raises(ValueError, match=r"ood_accs\[1\]"):
        collapse_rate([0.5, bad])


def test_collapse_rate_needs_tasks():
    with pytest.raises(ValueError, match="at least one"):
        collapse_rate([])


@pytest.mark.parametrize(
    "acc, n, expected",
    [
        (0.5, 12, 0.5 / math.sqrt(12)),  # 14.4 points: the noise of one score on 12 questions
        (0.25, 100, math.sqrt(0.25 * 0.75 / 100)),
        (0.0, 8, 0.0),
        (1.0, 8, 0.0),
    ],
)
def test_binomial_se_hand_computed(acc, n, expected):
    assert math.isclose(binomial_se(acc, n), expected)


def test_mean_se_of_independent_accuracies():
    # two tasks: the variances p (1 - p) / n add, and the mean divides by 2
    expected = math.sqrt(0.5 * 0.5 / 4 + 0.2 * 0.8 / 10) / 2
    assert math.isclose(mean_se([0.5, 0.2], [4, 10]), expected)
    assert math.isclose(mean_se([0.3], [7]), binomial_se(0.3, 7))


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_binomial_se_needs_a_question_count(n):
    with pytest.raises(ValueError, match="questions must be a positive integer"):
        binomial_se(0.5, n)


def test_mean_se_needs_matching_counts():
    with pytest.raises(ValueError, match="one question count per accuracy"):
        mean_se([0.5, 0.5], [10])
    with pytest.raises(ValueError, match="accuracy in"):
        mean_se([1.5], [10])
