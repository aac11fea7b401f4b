"""How good a trained reward model is on held-out rankings, and the statistics PPO normalises its rewards with.

- :func:`evaluate_rankings`: held-out pair accuracy, per-prompt rank correlation, reward distributions;
- :func:`reward_stats` / :func:`policy_reward_stats`: mean and std of rewards on the SFT policy's samples, which PPO
  uses to centre (and standardise) a scalar reward model's scores (``reward_stats.json``). Departure from
  InstructGPT: the reward is not normalised into the model's bias after training; the statistics are saved beside
  it and PPO applies them.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.data.preferences import PreferenceGroup, expand_comparisons
from pipeline.lm import generate_responses

from .losses import grouped_bradley_terry_loss
from .scorer import RewardScorer

log = logging.getLogger(__name__)

__all__ = [
    "RankingEval",
    "ranking_metrics",
    "evaluate_rankings",
    "reward_stats",
    "policy_reward_stats",
    "normalisation_stats",
    "stage_metrics",
]


@dataclass
class RankingEval:
    """Held-out ranking quality of a reward model."""

    pair_accuracy: float
    """Share of all held-out comparisons with reward(winner) > reward(loser) (ties count as wrong)."""
    val_loss: float
    """Grouped Bradley-Terry loss, averaged over prompts."""
    rank_correlation: float | None
    """Spearman correlation of rewards with the true ranking, per prompt, averaged (K > 2 only)."""
    kendall_tau: float | None
    """Kendall's tau per prompt, averaged (K > 2 only)."""
    chosen: list[float] = field(default_factory=list)
    """Reward of each prompt's best response."""
    rejected: list[float] = field(default_factory=list)
    """Reward of each prompt's worst response."""
    n_groups: int = 0
    n_pairs: int = 0
    group_rewards: list[list[float]] = field(default_factory=list)
    """Reward of every response, per group (for breakdowns such as ``pipeline.analysis.agreement.pair_accuracy_by_kind``)."""


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of ``x`` (ascending), ties sharing their mean rank."""
    order = torch.argsort(x)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else 0.0


def ranking_metrics(
    groups: list[PreferenceGroup], rewards: list[torch.Tensor], use_margin: bool = False
) -> RankingEval:
    """Ranking metrics from per-group rewards (``rewards[i]`` has one entry per response of ``groups[i]``).

    >>> from pipeline.data.preferences import PreferenceGroup
    >>> g = PreferenceGroup("q", ["a", "b", "c"], [0, 1, 2])
    >>> e = ranking_metrics([g], [torch.tensor([3.0, 1.0, 2.0])])
    >>> round(e.pair_accuracy, 3), e.rank_correlation, round(e.kendall_tau, 3)
    (0.667, 0.5, 0.333)
    """
    correct = total = 0
    losses, spearman, kendall, chosen, rejected = [], [], [], [], []
    for g, r in zip(groups, rewards):
        comps = expand_comparisons(g)
        w = torch.tensor([c.winner for c in comps])
        lo = torch.tensor([c.loser for c in comps])
        weights = torch.tensor([c.weight for c in comps])
        margins = torch.tensor([c.margin for c in comps]) if use_margin else None
        losses.append(float(grouped_bradley_terry_loss(r, w, lo, weights, margins)))
        wins = (r[w] > r[lo]).float()
        correct += int(wins.sum())
        total += len(comps)
        if len(g.responses) > 2:
            position = torch.empty(len(g.ranking))
            position[torch.tensor(g.ranking)] = torch.arange(len(g.ranking), dtype=torch.float)
            spearman.append(_spearman(r, -position))
            kendall.append(float((wins - (r[w] < r[lo]).float()).mean()))
        chosen.append(float(r[g.ranking[0]]))
        rejected.append(float(r[g.ranking[-1]]))
    if not total:
        raise ValueError("ranking_metrics: no held-out comparisons")
    return RankingEval(
        pair_accuracy=correct / total,
        val_loss=sum(losses) / len(losses),
        rank_correlation=sum(spearman) / len(spearman) if spearman else None,
        kendall_tau=sum(kendall) / len(kendall) if kendall else None,
        chosen=chosen,
        rejected=rejected,
        n_groups=len(groups),
        n_pairs=total,
        group_rewards=[[float(x) for x in r] for r in rewards],
    )


def evaluate_rankings(
    scorer: RewardScorer, groups: list[PreferenceGroup], batch_size: int = 32, use_margin: bool = False
) -> RankingEval:
    """Score every response of the held-out ``groups`` and compute :func:`ranking_metrics`."""
    prompts = [g.prompt for g in groups for _ in g.responses]
    responses = [r for g in groups for r in g.responses]
    flat = scorer.score_texts(prompts, responses, batch_size)
    per_group = list(torch.split(flat, [len(g.responses) for g in groups]))
    return ranking_metrics(groups, per_group, use_margin)


def reward_stats(rewards: torch.Tensor) -> dict[str, float | int]:
    """``{"mean", "std", "n"}`` of rewards (sample standard deviation; 1.0 when n < 2 or all equal, so
    dividing by it is always safe).

    >>> reward_stats(torch.tensor([1.0, 2.0, 3.0]))
    {'mean': 2.0, 'std': 1.0, 'n': 3}
    """
    n = int(rewards.numel())
    if n == 0:
        raise ValueError("reward_stats: no rewards")
    std = float(rewards.std()) if n > 1 else 0.0
    return {"mean": float(rewards.mean()), "std": std if std > 0 else 1.0, "n": n}


def policy_reward_stats(
    policy: Any,
    scorer: RewardScorer,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    seed: int | None = None,
) -> dict[str, float | int]:
    """:func:`reward_stats` of the reward model on responses sampled (temperature 1) from ``policy``.

    Args:
        policy: the causal LM whose samples PPO starts from (the SFT model).
        scorer: the trained reward model.
        tokenizer: the policy's tokenizer (chat template, pad token).
        prompts: user-message strings (repeat a prompt to draw several samples for it).
        max_new_tokens: sample length cap.
        batch_size: prompts per generate/score call.
        seed: sampling seed.
    """
    responses = generate_responses(
        policy, tokenizer, prompts, max_new_tokens, batch_size=batch_size, do_sample=True, seed=seed
    )
    return reward_stats(scorer.score_texts(prompts, responses, batch_size))


def normalisation_stats(
    policy: Callable[[], Any],
    scorer: RewardScorer,
    tokenizer: Any,
    groups: list[PreferenceGroup],
    n: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """``reward_stats.json``: :func:`policy_reward_stats` on ``n`` sampled answers of the SFT policy to the training
    prompts (user messages, cycled in a seeded order); when the groups have only multi-turn prompts (e.g. HH), the
    reward model's scores of the training responses themselves.

    Args:
        policy: a zero-argument function returning the SFT policy (loaded only when needed).
    """
    prompts = list(dict.fromkeys(g.prompt for g in groups if isinstance(g.prompt, str)))
    random.Random(seed).shuffle(prompts)
    prompts = [prompts[i % len(prompts)] for i in range(n)] if prompts else []
    if not prompts:  # the policy's samples cannot be drawn the same way
        log.warning("reward: no single-message training prompts; reward_stats come from the training responses")
        flat = [(g.prompt, r) for g in groups for r in g.responses][:n]
        rewards = scorer.score_texts([p for p, _ in flat], [r for _, r in flat], batch_size)
        return {**reward_stats(rewards), "source": "train_responses"}
    stats = policy_reward_stats(policy(), scorer, tokenizer, prompts, max_new_tokens, batch_size, seed)
    return {**stats, "source": "sft_samples"}


def stage_metrics(
    ev: RankingEval, stats: dict[str, Any], train_loss: float, step: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reward manifest's ``metrics`` and the final ``metrics.jsonl`` record of a held-out evaluation."""
    final: dict[str, Any] = {"step": step, "rm/accuracy": ev.pair_accuracy, "val/loss": ev.val_loss}
    metrics: dict[str, Any] = {
        "pair_accuracy": ev.pair_accuracy,
        "val_loss": ev.val_loss,
        "train_loss": train_loss,
        "reward_chosen_mean": sum(ev.chosen) / len(ev.chosen),
        "reward_rejected_mean": sum(ev.rejected) / len(ev.rejected),
        "reward_norm_mean": stats["mean"],
        "reward_norm_std": stats["std"],
        "steps": step,
    }
    if ev.rank_correlation is not None:
        final["rm/rank_correlation"] = ev.rank_correlation
        metrics.update(rank_correlation=ev.rank_correlation, kendall_tau=ev.kendall_tau)
    return metrics, final
