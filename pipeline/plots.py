"""Metric curves as PNG panels, one figure per stage, from its ``metrics.jsonl`` records.

The PPO stage draws its ``curves.png`` with :func:`plot_stage` as it finishes; the run report draws every stage's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

__all__ = ["PLOTS", "plot_stage"]

PLOTS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "pretrain": [("loss", ("train/loss", "val/loss"))],
    "sft": [("loss", ("train/loss", "val/loss")), ("held-out answer accuracy", ("sft/checker_accuracy",))],
    "reward": [("loss", ("train/loss", "val/loss")), ("pair accuracy", ("train/accuracy", "rm/accuracy"))],
    "ppo": [
        ("reward", ("ppo/reward", "eval/reward_mean", "eval/sft_reward_mean")),
        ("KL to reference", ("ppo/kl", "eval/kl")),
        ("entropy", ("ppo/entropy",)),
        ("response length", ("ppo/response_length",)),
    ],
}
"""Stage -> panels (title, metrics.jsonl keys drawn on it)."""


def plot_stage(stage: str, records: list[dict[str, Any]], path: Path, manifest: dict[str, Any] | None = None) -> bool:
    """Draw ``stage``'s panels from its metrics.jsonl records into ``path``; False when there is nothing to draw."""
    panels = [(t, [(k, [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]) for k in keys])
              for t, keys in PLOTS.get(stage, [])]  # fmt: skip
    panels = [(t, [(k, pts) for k, pts in series if pts]) for t, series in panels]
    panels = [p for p in panels if p[1]]
    rewards = (manifest or {}).get("eval_rewards") or {}
    has_hist = stage == "reward" and rewards.get("chosen") and rewards.get("rejected")
    n = len(panels) + bool(has_hist)
    if n == 0:
        return False
    matplotlib.use("Agg")  # files only, no display: chosen before pyplot is first imported
    import matplotlib.pyplot as plt  # after the backend; a library import has no side effects

    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for key, pts in series:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 12 else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    if has_hist:
        ax = axes[0][-1]
        ax.hist(rewards["chosen"], bins=30, alpha=0.6, label="chosen (better)")
        ax.hist(rewards["rejected"], bins=30, alpha=0.6, label="rejected (worse)")
        ax.set_title("held-out rewards")
        ax.set_xlabel("reward")
        ax.legend(fontsize=7)
    fig.suptitle(stage)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
