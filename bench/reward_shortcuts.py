"""Does the reward model score the right answer above the shortcuts a policy can take to it?

For each generated held-out prompt (``ppo_eval``), the reward model scores the right answer and three kinds of
output that need no skill: a proper prefix of the answer (``2`` for ``20``, ``k i`` for ``k i n g``: stopping
early), the empty answer, and one punctuation token (``.``, ``,``, ``!``). A reward model that prefers any of them
on many prompts invites PPO to take it (an implicit DPO reward whose every token drifted negative prefers shorter
answers; bench/RESULTS.md, "The default run meets issue #3's bar").

    python bench/reward_shortcuts.py runs/tiny/reward/artifact
    python bench/reward_shortcuts.py RM --config configs/tiny.yaml 'data.tasks.kinds=[spell]'

Prints a markdown table: per kind of shortcut, the number of prompts, the share where the answer scores higher
than every shortcut of that kind, and the mean score of the answer and of the shortcuts.
"""

from __future__ import annotations

import argparse

import torch
from task_args import add_task_arguments, task_records

PUNCTUATION = (".", ",", "!")


def shortcuts(answer: str) -> dict[str, list[str]]:
    """The shortcuts of one answer by kind; letter answers are cut between letters, numbers between digits.

    >>> shortcuts("20")["prefix"], shortcuts("k i n g")["prefix"]
    (['2'], ['k', 'k i', 'k i n'])
    """
    parts = answer.split() if " " in answer else list(answer)
    sep = " " if " " in answer else ""
    return {
        "prefix": [sep.join(parts[:i]) for i in range(1, len(parts))],
        "empty": [""],
        "punctuation": list(PUNCTUATION),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reward", help="reward model folder (runs/<run>/reward/artifact)")
    add_task_arguments(ap)
    a = ap.parse_intermixed_args()
    torch.set_num_threads(a.threads)

    from pipeline.reward import load_scorer

    scorer = load_scorer(a.reward)  # a scalar head or DPO's implicit reward
    stats: dict[str, dict[str, float]] = {}
    for rec in task_records(a, "ppo_eval"):
        kinds = shortcuts(rec["answer"])
        texts = [rec["answer"]] + [t for ts in kinds.values() for t in ts]
        scores = scorer.score_texts([rec["prompt"]] * len(texts), texts).tolist()
        right, rest = scores[0], scores[1:]
        for kind, ts in kinds.items():
            if not ts:
                continue
            mine, rest = rest[: len(ts)], rest[len(ts) :]
            s = stats.setdefault(kind, {"n": 0, "wins": 0, "sum": 0.0, "sum_right": 0.0, "count": 0})
            s["n"] += 1
            s["wins"] += right > max(mine)
            s["sum"] += sum(mine)
            s["count"] += len(mine)
            s["sum_right"] += right
    print("| shortcut | prompts | answer above every shortcut | mean score: answer | mean score: shortcut |")
    print("|---|---|---|---|---|")
    for kind, s in stats.items():
        print(
            f"| {kind} | {s['n']:.0f} | {s['wins'] / s['n']:.3f} | {s['sum_right'] / s['n']:.3f} "
            f"| {s['sum'] / s['count']:.3f} |"
        )


if __name__ == "__main__":
    main()
