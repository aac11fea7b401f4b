"""Where the reward model and the task checker disagree, and whether PPO exploited it.

PPO optimises the reward model's score; the generated tasks also have a checker
(:func:`pipeline.data.tasks.check_answer`), a measure the policy never sees. On held-out prompts answered
greedily by the SFT model and by the PPO policy, this module compares the two judges:

- per task: checker accuracy and mean reward of both models;
- transitions: prompts whose answer PPO changed, split into wrong->right, right->wrong and wrong->wrong,
  each with how often the reward model's score went up (a right->wrong change with a higher score is
  the reward model being exploited);
- agreement: on prompts where exactly one of the two answers is right, how often the reward model
  scores the right one higher, with examples where it does not;
- a verdict: reward up with checker accuracy flat or down means PPO exploited the reward model.

The best-of-k check before PPO is :mod:`pipeline.analysis.best_of_k`.

Usage::

    summary = rm_vs_checker(answers, kl=0.23, kl_target=6.0)
    print("\\n".join(format_markdown(summary)))

``answers`` holds one dict per held-out prompt with the record's ``task`` and ``answer`` and the two models'
``sft``/``policy`` texts and ``sft_score``/``policy_score`` (as ``pipeline.rl.components.evaluate_held_out``
returns them).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pipeline.data.preferences import expand_comparisons
from pipeline.data.tasks import check_answer, response_class

from .best_of_k import FLAT
from .checker import has_checker, percent

__all__ = [
    "rm_vs_checker",
    "format_markdown",
    "pair_accuracy_by_kind",
    "format_pairs",
    "markdown_cell",
]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def rm_vs_checker(
    answers: list[dict[str, Any]], kl: float | None = None, kl_target: float | None = None, n_examples: int = 5
) -> dict[str, Any] | None:
    """Compare reward-model scores with checker verdicts on held-out answers of the SFT and PPO models.

    Args:
        answers: per prompt ``prompt``, ``task``, ``answer`` (ground truth), ``sft``, ``sft_score``,
            ``policy``, ``policy_score``. Prompts without ``task``/``answer`` (no checker) are skipped.
        kl: the policy's KL to the reference on these prompts (reported with the verdict).
        kl_target: the configured KL target.
        n_examples: disagreement examples kept.

    Returns:
        The summary (see the module docstring), or None when no prompt has a checker.
    """
    rows = [a for a in answers if has_checker(a)]
    if not rows:
        return None
    by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    transitions = {k: {"n": 0, "reward_up": 0} for k in ("wrong_to_right", "right_to_wrong", "wrong_to_wrong")}
    agree = defaultdict(lambda: [0, 0])  # task -> [reward model agrees, prompts with exactly one right answer]
    examples: list[dict[str, Any]] = []
    for a in rows:
        sft_ok, ppo_ok = check_answer(a, a["sft"]), check_answer(a, a["policy"])
        for task in (a["task"], "all"):
            t = by_task[task]
            t["sft_ok"].append(float(sft_ok))
            t["ppo_ok"].append(float(ppo_ok))
            t["sft_reward"].append(float(a["sft_score"]))
            t["ppo_reward"].append(float(a["policy_score"]))
        if a["sft"].strip() == a["policy"].strip():
            continue
        up = a["policy_score"] > a["sft_score"]
        if sft_ok != ppo_ok:
            key = "wrong_to_right" if ppo_ok else "right_to_wrong"
            right_higher = up if ppo_ok else not up
            for task in (a["task"], "all"):
                agree[task][0] += int(right_higher)
                agree[task][1] += 1
            if not right_higher and len(examples) < n_examples:
                right, wrong = ("policy", "sft") if ppo_ok else ("sft", "policy")
                examples.append(
                    {
                        "prompt": a.get("prompt", ""),
                        "task": a["task"],
                        "answer": a["answer"],
                        "preferred": a[wrong],
                        "preferred_score": round(float(a[f"{wrong}_score"]), 4),
                        "preferred_by": "ppo" if wrong == "policy" else "sft",
                        "right": a[right],
                        "right_score": round(float(a[f"{right}_score"]), 4),
                    }
                )
        elif not sft_ok:
            key = "wrong_to_wrong"
        else:
            continue  # both right, written differently
        transitions[key]["n"] += 1
        transitions[key]["reward_up"] += int(up)

    tasks = {
        task: {
            "n": len(t["sft_ok"]),
            "sft_accuracy": _mean(t["sft_ok"]),
            "ppo_accuracy": _mean(t["ppo_ok"]),
            "sft_reward": _mean(t["sft_reward"]),
            "ppo_reward": _mean(t["ppo_reward"]),
            "rm_agrees": agree[task][0],
            "one_right": agree[task][1],
        }
        for task, t in sorted(by_task.items(), key=lambda kv: (kv[0] == "all", kv[0]))
    }
    overall = tasks["all"]
    reward_gain = overall["ppo_reward"] - overall["sft_reward"]
    accuracy_gain = overall["ppo_accuracy"] - overall["sft_accuracy"]
    hacked = transitions["right_to_wrong"]["reward_up"]
    answers = f"{hacked} answer{'' if hacked == 1 else 's'}"
    if reward_gain > 0 and accuracy_gain <= FLAT:
        verdict = (
            f"PPO exploited the reward model: the held-out reward rose by {reward_gain:+.3f} while checker "
            f"accuracy went {'down' if accuracy_gain < -FLAT else 'flat'} ({accuracy_gain * 100:+.1f} points); "
            f"{answers} went from right to wrong with a higher reward."
        )
        exploited = True
    elif reward_gain > 0:
        verdict = (
            f"The held-out reward rose by {reward_gain:+.3f} and checker accuracy by {accuracy_gain * 100:+.1f} "
            f"points: the reward gain is, on balance, real; {answers} still went from right to wrong "
            "with a higher reward."
        )
        exploited = False
    else:
        verdict = f"The held-out reward did not rise ({reward_gain:+.3f}); PPO did not optimise the reward model here."
        exploited = False
    return {
        "n": overall["n"],
        "tasks": tasks,
        "transitions": transitions,
        "examples": examples,
        "reward_gain": reward_gain,
        "accuracy_gain": accuracy_gain,
        "exploited": exploited,
        "kl": kl,
        "kl_target": kl_target,
        "verdict": verdict,
    }


PAIR_TYPES = (
    "right > near miss",
    "right > malformed",
    "near miss > near miss",
    "near miss > malformed",
    "malformed > malformed",
)


def pair_accuracy_by_kind(groups: list[Any], rewards: list[list[float]]) -> dict[str, dict[str, list[int]]] | None:
    """Held-out pair accuracy of the reward model per task and per kind of pair (right > near miss, ...).

    Args:
        groups: ranked ``PreferenceGroup``s; those whose ``meta`` has no ``task``/``answer`` are skipped.
        rewards: the reward of each response of each group.

    Returns:
        ``{task: {pair type: [pairs the reward model orders as the ranking does, pairs]}}`` with an ``all``
        task, or None when no group has a checker.
    """
    out: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for g, r in zip(groups, rewards):
        meta = getattr(g, "meta", None) or {}
        if not has_checker(meta):
            continue
        classes = [response_class(meta, text) for text in g.responses]
        for c in expand_comparisons(g):
            key = f"{classes[c.winner]} > {classes[c.loser]}"
            for task in (meta["task"], "all"):
                out[task][key][0] += int(r[c.winner] > r[c.loser])
                out[task][key][1] += 1
    if not out:
        return None
    return {t: {k: list(v) for k, v in out[t].items()} for t in sorted(out, key=lambda t: (t == "all", t))}


def format_pairs(by_kind: dict[str, dict[str, list[int]]]) -> list[str]:
    """:func:`pair_accuracy_by_kind` as a markdown table (accuracy and number of pairs per cell)."""
    types = [t for t in PAIR_TYPES if any(t in row for row in by_kind.values())]
    types += sorted({k for row in by_kind.values() for k in row} - set(types))
    lines = ["| task | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
    for task, row in by_kind.items():
        cells = [f"{row[t][0] / row[t][1]:.2f} ({row[t][1]})" if t in row and row[t][1] else "-" for t in types]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown_cell(text: Any, width: int = 160, empty: str = "") -> str:
    """``text`` as one markdown table cell: pipes escaped, newlines shown as ⏎, at most ``width`` characters."""
    return str(text).replace("|", "\\|").replace("\n", " ⏎ ")[:width] or empty


def _cell(text: Any) -> str:
    return markdown_cell(text, width=80, empty="(empty)")


def format_markdown(summary: dict[str, Any]) -> list[str]:
    """The summary as report lines: per-task table, transitions, examples, verdict."""
    lines = [
        f"Greedy answers of the SFT model and the PPO policy to {summary['n']} held-out prompts, judged by "
        "the reward model (score) and by the task checker (right or wrong).",
        "",
        "| task | n | SFT accuracy | PPO accuracy | SFT reward | PPO reward | reward model agrees with checker* |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, t in summary["tasks"].items():
        agrees = f"{t['rm_agrees']}/{t['one_right']}" if t["one_right"] else "-"
        lines.append(
            f"| {task} | {t['n']} | {percent(t['sft_accuracy'])} | {percent(t['ppo_accuracy'])} | "
            f"{_num(t['sft_reward'])} | {_num(t['ppo_reward'])} | {agrees} |"
        )
    tr = summary["transitions"]
    lines += [
        "",
        "\\* prompts where exactly one of the two answers is right: how often the reward model scores the right one higher.",
        "",
        "Answers PPO changed: "
        + ", ".join(f"{k.replace('_', ' ')} {v['n']} (reward up in {v['reward_up']})" for k, v in tr.items())
        + ".",
        "",
    ]
    if summary["examples"]:
        lines += [
            "Where the reward model and the checker disagree (the reward model scores the wrong answer higher):",
            "",
            "| prompt | right answer | preferred (wrong) | its score | the right one | its score |",
            "|---|---|---|---|---|---|",
        ]
        for e in summary["examples"]:
            lines.append(
                f"| {_cell(e['prompt'])} | {_cell(e['answer'])} | {_cell(e['preferred'])} ({e['preferred_by']}) | "
                f"{e['preferred_score']:.3f} | {_cell(e['right'])} | {e['right_score']:.3f} |"
            )
        lines.append("")
    kl = summary.get("kl")
    if kl is not None:
        target = summary.get("kl_target")
        within = "" if target is None else f" ({'within' if kl <= target else 'ABOVE'} the target {target:g})"
        lines += [f"KL to the reference (SFT) model on these prompts: {kl:.3f} nats per response{within}.", ""]
    lines += [f"**Verdict.** {summary['verdict']}", ""]
    return lines
