"""Checker accuracy: the share of held-out answers a task's ground-truth checker accepts, with a 95% interval.

Used by the SFT, reward and PPO stages, the report and bench/, so that "checker accuracy" means the same thing
everywhere: each prompt is answered by :func:`pipeline.lm.generate_responses` (greedy unless sampling is asked
for) and judged by :func:`pipeline.data.tasks.check_answer`. Every accuracy a manifest records comes with its
Wilson score interval (``<name>_ci95`` = [low, high]), so two accuracies on a few hundred prompts are compared
by their intervals, not by their point values.

    responses = generate_responses(model, tok, [r["prompt"] for r in recs], max_new_tokens=32)
    acc = checker_accuracy(recs, responses)   # None when no record has a checker
    acc, ci95, n = checker_accuracy_ci(recs, responses)
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.data.task_checks import check_answer, has_checker

__all__ = ["has_checker", "checker_accuracy", "checker_accuracy_ci", "wilson_interval", "wilson_ci95", "percent"]

Z_95 = 1.959964
"""The standard normal quantile of 0.975: a two-sided 95% interval."""


def _count_right(records: list[dict[str, Any]], responses: list[str]) -> tuple[int, int]:
    """``(right, checked)``: responses the checker accepts, and records that have a checker."""
    if len(records) != len(responses):
        raise ValueError(f"checker_accuracy: {len(records)} records but {len(responses)} responses")
    pairs = [(r, s) for r, s in zip(records, responses) if has_checker(r)]
    return sum(bool(check_answer(r, s)) for r, s in pairs), len(pairs)


def checker_accuracy(records: list[dict[str, Any]], responses: list[str]) -> float | None:
    """Share of checkable records whose response passes ``pipeline.data.tasks.check_answer``.

    Args:
        records: held-out records (any with ``task`` and ``answer`` has a checker).
        responses: one response per record, same order.

    Returns:
        Accuracy in [0, 1] over the records that have a checker; None when none has one.

    Raises:
        ValueError: ``records`` and ``responses`` differ in length.
    """
    right, n = _count_right(records, responses)
    return right / n if n else None


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (Wilson 1927, "Probable inference, the law of
    succession, and statistical inference", JASA 22(158): 209-212).

    Unlike the normal approximation ``p +- z * sqrt(p(1-p)/n)``, it stays inside [0, 1] and does not shrink to a
    point at 0 or n successes, which matters for accuracies near 0 or 1 on a few hundred prompts:

        center = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    >>> [round(x, 4) for x in wilson_interval(45, 100)]
    [0.3561, 0.5476]
    >>> [round(x, 4) for x in wilson_interval(0, 10)]
    [0.0, 0.2775]

    Args:
        successes: number of successes, 0 <= successes <= n.
        n: number of trials, > 0.
        z: the normal quantile (1.959964: 95%).

    Returns:
        ``(low, high)``, with ``low <= successes / n <= high`` and both in [0, 1].

    Raises:
        ValueError: ``n`` <= 0 or ``successes`` outside [0, n].
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p, z2 = successes / n, z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # the interval always holds p; the clamps undo rounding (1 - 1e-16 at p = 1)
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def wilson_ci95(successes: int, n: int) -> list[float] | None:
    """:func:`wilson_interval` at 95% as the ``[low, high]`` list manifests record (4 places); None when ``n`` is 0.

    >>> wilson_ci95(10, 10)
    [0.7225, 1.0]
    """
    if n == 0:
        return None
    low, high = wilson_interval(successes, n)
    return [round(low, 4), round(high, 4)]


def checker_accuracy_ci(
    records: list[dict[str, Any]], responses: list[str]
) -> tuple[float | None, list[float] | None, int]:
    """:func:`checker_accuracy` with its 95% Wilson interval and the number of records checked.

    Returns:
        ``(accuracy, [low, high], n)``: accuracy as :func:`checker_accuracy` gives it, the interval rounded to 4
        places, and ``n`` the records that have a checker; ``(None, None, 0)`` when none has one.

    Raises:
        ValueError: ``records`` and ``responses`` differ in length.
    """
    right, n = _count_right(records, responses)
    if not n:
        return None, None, 0
    return right / n, wilson_ci95(right, n), n


def percent(x: float | None) -> str:
    """An accuracy as the tables show it: ``0.695`` -> ``69.5%``, None -> ``-``."""
    return "-" if x is None else f"{x * 100:.1f}%"
