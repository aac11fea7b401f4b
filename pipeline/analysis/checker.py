"""Checker accuracy: the share of held-out answers a task's ground-truth checker accepts.

Used by the SFT, reward and PPO stages, the report and bench/, so that "checker accuracy" means the same thing
everywhere: each prompt is answered by :func:`pipeline.lm.generate_responses` (greedy unless sampling is asked
for) and judged by :func:`pipeline.data.tasks.check_answer`.

    responses = generate_responses(model, tok, [r["prompt"] for r in recs], max_new_tokens=32)
    acc = checker_accuracy(recs, responses)   # None when no record has a checker
"""

from __future__ import annotations

from typing import Any

from pipeline.data.tasks import check_answer

__all__ = ["has_checker", "checker_accuracy"]


def has_checker(record: dict[str, Any]) -> bool:
    """A record can be checked when it carries the generated-task fields ``task`` and ``answer``."""
    return bool(record.get("task")) and record.get("answer") is not None


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
    if len(records) != len(responses):
        raise ValueError(f"checker_accuracy: {len(records)} records but {len(responses)} responses")
    pairs = [(r, s) for r, s in zip(records, responses) if has_checker(r)]
    if not pairs:
        return None
    return sum(bool(check_answer(r, s)) for r, s in pairs) / len(pairs)
