"""The analysis each stage records, one function per stage: the stage calls it and writes what it returns.

- :func:`reward_diagnostics`: held-out pair accuracy per kind of pair, and the best-of-k check of the SFT policy
  against the new reward model (can PPO on it gain at all?);
- :func:`ppo_diagnostics`: where the reward model and the checker disagree on the held-out answers of the SFT and
  PPO models, and whether PPO exploited the reward model;
- :func:`policy_best_of_k` / :func:`held_out_best_of_k`: draw a policy's greedy answers and samples and tabulate
  them with :func:`pipeline.analysis.best_of_k.best_of_k` (also used by ``bench/rl_headroom.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.data.preferences import PreferenceGroup
from pipeline.lm import generate_responses
from pipeline.reward.scorer import RewardScorer

from .agreement import pair_accuracy_by_kind, rm_vs_checker
from .best_of_k import best_of_k
from .checker import has_checker

__all__ = ["reward_diagnostics", "ppo_diagnostics", "policy_best_of_k", "held_out_best_of_k"]

log = logging.getLogger(__name__)


def reward_diagnostics(
    scorer: RewardScorer,
    policy: Callable[[], Any],
    tokenizer: Any,
    held_out: list[PreferenceGroup],
    group_rewards: list[list[float]],
    k: int,
    n_prompts: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """``{"pair_accuracy_by_kind", "best_of_k"}`` of a trained reward model (each None where no record has a
    checker; ``best_of_k`` also None when ``k`` is 0).

    Args:
        scorer: the trained reward model.
        policy: returns the SFT policy (loaded only when needed).
        tokenizer: the policy's tokenizer.
        held_out: the held-out preference groups, and ``group_rewards`` the scorer's reward of each response.
        k, n_prompts, max_new_tokens, batch_size, seed: the best-of-k check (``reward.best_of_k`` and friends).
    """
    by_kind = pair_accuracy_by_kind(held_out, group_rewards)
    bok = held_out_best_of_k(policy, scorer, tokenizer, held_out, k, n_prompts, max_new_tokens, batch_size, seed)
    if bok:
        a = bok["all"]
        log.info("reward: SFT policy on %d held-out prompts: greedy %.3f, pass@%d %.3f, reward model's best of %d %.3f",
                 a["n"], a["greedy"], k, a["pass_at_k"], k, a["rm_best_of_k"])  # fmt: skip
    return {"pair_accuracy_by_kind": by_kind, "best_of_k": {"k": k, "tasks": bok} if bok else None}


def ppo_diagnostics(answers: list[dict[str, Any]], kl: float | None, kl_target: float) -> dict[str, Any] | None:
    """:func:`~pipeline.analysis.agreement.rm_vs_checker` of the held-out answers (None without a checker)."""
    agreement = rm_vs_checker(answers, kl, kl_target)
    if agreement is not None:
        log.info("ppo: %s", agreement["verdict"])
    return agreement


def policy_best_of_k(
    policy: Any,
    scorer: RewardScorer,
    tokenizer: Any,
    records: list[dict[str, Any]],
    k: int,
    max_new_tokens: int,
    batch_size: int = 32,
    seed: int | None = None,
) -> dict[str, dict[str, Any]] | None:
    """:func:`best_of_k` of ``policy`` on ``records`` (``prompt`` plus ``task``/``answer``).

    Draws the policy's greedy answer and ``k`` samples (temperature 1, ``seed``) per prompt through ``tokenizer``
    (the policy's), and scores the samples with ``scorer``.
    """
    prompts = [r["prompt"] for r in records]
    greedy = generate_responses(policy, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    many = [p for p in prompts for _ in range(k)]
    samples = generate_responses(
        policy, tokenizer, many, max_new_tokens, batch_size=batch_size, do_sample=True, seed=seed
    )
    scores = scorer.score_texts(many, samples, batch_size).tolist()
    return best_of_k(records, greedy, samples, scores, k)


def held_out_best_of_k(
    policy: Callable[[], Any],
    scorer: RewardScorer,
    tokenizer: Any,
    groups: list[PreferenceGroup],
    k: int,
    n_prompts: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> dict[str, dict[str, Any]] | None:
    """:func:`policy_best_of_k` on the first ``n_prompts`` distinct single-message prompts with a checker among the
    held-out ``groups``: greedy and ``k`` samples (temperature 1, ``seed``) of up to ``max_new_tokens`` tokens each.
    None when no prompt has a checker or ``k`` is 0 (``policy()`` is then never called: it loads the model)."""
    records: dict[str, dict[str, Any]] = {}
    for g in groups:
        if isinstance(g.prompt, str) and has_checker(g.meta):
            records.setdefault(g.prompt, {"prompt": g.prompt, "task": g.meta["task"], "answer": g.meta["answer"]})
    recs = list(records.values())[:n_prompts]
    if not recs or not k:
        return None
    return policy_best_of_k(policy(), scorer, tokenizer, recs, k, max_new_tokens, batch_size, seed)
