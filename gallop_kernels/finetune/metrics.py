"""The paper's forgetting metrics. Accuracies are fractions in [0, 1]."""

from __future__ import annotations

import math
from collections.abc import Sequence

COLLAPSE_BELOW = 0.01  # an accuracy that floors to 0 in percent, i.e. below 1%


def _check(acc: float, what: str) -> None:
    if not (isinstance(acc, (int, float)) and math.isfinite(acc) and 0.0 <= acc <= 1.0):
        raise ValueError(f"{what} must be an accuracy in [0, 1], got {acc!r}")


def forget_ratio(vanilla_ood_acc: float, tuned_ood_acc: float) -> float:
    """Forget Ratio_r = max(0, (Acc_vanilla^OOD - Acc^OOD_r) / Acc_vanilla^OOD).

    Acc^OOD_r is the mean accuracy over the OOD tasks of the model fine-tuned on
    task r, Acc_vanilla^OOD that of the model before fine-tuning on the same tasks.
    0 means nothing was forgotten (or OOD accuracy rose), 1 that all was lost.
    When the vanilla accuracy is 0 there is nothing to forget: the ratio is 0.
    """
    _check(vanilla_ood_acc, "vanilla_ood_acc")
    _check(tuned_ood_acc, "tuned_ood_acc")
    if vanilla_ood_acc == 0:
        return 0.0
    return max(0.0, (vanilla_ood_acc - tuned_ood_acc) / vanilla_ood_acc)


def collapse_rate(ood_accs: Sequence[float]) -> float:
    """Collapse Rate_r = |{t in OOD : floor(100 * Acc_t) = 0}| / |OOD|.

    The share of OOD tasks whose accuracy, in percent, floors to 0 (is below
    1%): the fine-tuned model no longer answers them in a usable form. Meaningful
    in the generative mode only, where a reply without the task's answer format
    counts as wrong.
    """
    if len(ood_accs) == 0:
        raise ValueError("collapse_rate needs at least one OOD accuracy")
    for i, a in enumerate(ood_accs):
        _check(a, f"ood_accs[{i}]")
    return sum(math.floor(100 * a) == 0 for a in ood_accs) / len(ood_accs)


def binomial_se(acc: float, questions: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of an accuracy p measured on n questions.

    The noise of one score: on 12 questions a true 50% is measured within about
    ±14 points (one standard error), and one question moves the score by 8.3.
    """
    _check(acc, "acc")
    if isinstance(questions, bool) or not isinstance(questions, int) or questions < 1:
        raise ValueError(f"questions must be a positive integer, got {questions!r}")
    return math.sqrt(acc * (1 - acc) / questions)


def mean_se(accs: Sequence[float], questions: Sequence[int]) -> float:
    """Standard error of the mean of independent accuracies: sqrt(sum_t p_t (1 - p_t) / n_t) / T."""
    if len(accs) == 0 or len(accs) != len(questions):
        raise ValueError(f"mean_se needs one question count per accuracy, got {len(accs)} and {len(questions)}")
    return math.sqrt(sum(binomial_se(a, n) ** 2 for a, n in zip(accs, questions))) / len(accs)
