"""Best of k: can optimising a reward model raise checker accuracy at all?

On held-out prompts, :func:`best_of_k` compares a policy's greedy accuracy with the accuracy of the sample the
reward model prefers among ``k`` (best-of-k) and with pass@k (some sample right). PPO moves the policy toward what
the reward model prefers; when its best-of-k is not above greedy accuracy, PPO has no reward-model-visible gain to
find, and checker accuracy is expected to fall as the policy moves. :func:`pipeline.analysis.diagnostics.held_out_best_of_k`
draws the samples for the reward stage's check; ``bench/rl_headroom.py`` runs the same on any policy and reward
model. This module only tabulates: it loads no model.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pipeline.data.tasks import check_answer

from .checker import has_checker, percent

__all__ = [
    "FLAT",
    "best_of_k",
    "format_best_of_k",
    "best_of_k_reading",
    "visible_gain",
]

FLAT = 0.02
"""A change in checker accuracy within this (2 points on 200 prompts: 4 answers) counts as flat."""


def best_of_k(
    records: list[dict[str, Any]], greedy: list[str], samples: list[str], scores: list[float], k: int
) -> dict[str, dict[str, float | int | None]] | None:
    """Per task: greedy, sampled and pass@k accuracy of a policy, and what the reward model picks.

    Args:
        records: prompts with a checker (``task``, ``answer``); others are skipped.
        greedy: the policy's greedy answer to each record.
        samples: ``k`` sampled answers per record, record by record.
        scores: the reward model's score of each sample.
        k: samples per record.

    Returns:
        ``{task: {"n", "greedy", "sampled", "pass_at_k", "rm_best_of_k", "rm_auc", "auc_prompts"}}`` with an
        ``all`` row (accuracies are shares; ``rm_best_of_k`` is the checker accuracy of each prompt's
        highest-scored sample; ``rm_auc`` how often a right sample outscores a wrong one of the same prompt,
        ties half, over the ``auc_prompts`` prompts that have both, None without such prompts), or None
        when no record has a checker.
    """
    if len(greedy) != len(records) or len(samples) != len(records) * k or len(scores) != len(samples):
        raise ValueError(
            f"best_of_k: {len(records)} records need {len(records)} greedy answers and {len(records) * k} samples "
            f"and scores (k={k}); got {len(greedy)}, {len(samples)} and {len(scores)}"
        )
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for i, rec in enumerate(records):
        if not has_checker(rec):
            continue
        ok = [check_answer(rec, r) for r in samples[i * k : (i + 1) * k]]
        sc = scores[i * k : (i + 1) * k]
        right = [x for x, o in zip(sc, ok) if o]
        wrong = [x for x, o in zip(sc, ok) if not o]
        for task in (rec["task"], "all"):
            a = acc[task]
            a["n"] += 1
            a["greedy"] += check_answer(rec, greedy[i])
            a["sampled"] += sum(ok) / k
            a["pass_at_k"] += any(ok)
            a["rm_best_of_k"] += ok[max(range(k), key=lambda j: sc[j])]  # first of equal maxima
            a["auc_pairs"] += len(right) * len(wrong)
            a["auc_wins"] += sum((g > b) + 0.5 * (g == b) for g in right for b in wrong)
            a["auc_prompts"] += bool(right and wrong)
    if not acc:
        return None
    out: dict[str, dict[str, float | int | None]] = {}
    for task in sorted(acc, key=lambda t: (t == "all", t)):
        a = acc[task]
        n = int(a["n"])
        row: dict[str, Any] = {m: a[m] / n for m in ("greedy", "sampled", "pass_at_k", "rm_best_of_k")}
        row["rm_auc"] = a["auc_wins"] / a["auc_pairs"] if a["auc_pairs"] else None
        out[task] = {"n": n, **row, "auc_prompts": int(a["auc_prompts"])}
    return out


def format_best_of_k(table: dict[str, dict[str, Any]], k: int) -> list[str]:
    """:func:`best_of_k` as a markdown table and a one-line reading of its ``all`` row."""
    lines = [
        f"| task | n | greedy | sampled | pass@{k} | reward model's best of {k} | right-vs-wrong AUC (prompts) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, r in table.items():
        auc = "-" if r["rm_auc"] is None else f"{r['rm_auc']:.3f}"
        lines.append(
            f"| {task} | {r['n']} | {r['greedy']:.3f} | {r['sampled']:.3f} | {r['pass_at_k']:.3f} | "
            f"{r['rm_best_of_k']:.3f} | {auc} ({r['auc_prompts']}) |"
        )
    return [*lines, "", best_of_k_reading(table["all"], k)]


def visible_gain(row: dict[str, Any]) -> bool:
    """Whether a :func:`best_of_k` row's reward-model pick beats the greedy answers by more than :data:`FLAT`."""
    return row["rm_best_of_k"] - row["greedy"] > FLAT


def best_of_k_reading(row: dict[str, Any], k: int) -> str:
    """One sentence on a :func:`best_of_k` row: is the reward model's pick better than the greedy answer?"""
    gain = row["rm_best_of_k"] - row["greedy"]
    if visible_gain(row):
        reading = "It is above the greedy answers: there is a gain the reward model can see."
    elif gain >= -FLAT:
        reading = (
            f"It is not clearly above the greedy answers (within {FLAT * 100:.0f} points): optimising the reward "
            "model has little or no gain to find."
        )
    else:
        reading = (
            "It is below the greedy answers, so optimising the reward model is expected to lower checker accuracy."
        )
    return (
        f"The reward model's pick among {k} samples is right {percent(row['rm_best_of_k'])} of the time against "
        f"{percent(row['greedy'])} for the greedy answer ({gain * 100:+.1f} points; pass@{k} {percent(row['pass_at_k'])}). "
        + reading
    )
