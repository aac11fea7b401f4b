"""The sequence score PPO maximises, from a scorer's raw score: normalisation with the reward stage's statistics,
optional clipping, and the penalty for a response that does not end with the end-of-turn token.

    score = clip((raw - shift) / scale, -reward_clip, reward_clip) - missing_eos_penalty * (not ended)

``shift`` and ``scale`` come from ``ppo.reward_norm`` and reward_stats.json (the reward model's scores on SFT
samples): standardised rewards have mean 0 and standard deviation 1 on the SFT policy's samples (Ziegler et al.
2019), so ``reward_clip`` and ``missing_eos_penalty`` are in those standard deviations.
"""

from __future__ import annotations

import torch

__all__ = ["reward_normalisation", "final_scores"]


def reward_normalisation(reward_norm: str, stats: dict[str, float]) -> tuple[float, float]:
    """``(shift, scale)`` that normalise a raw score as ``(raw - shift) / scale``.

    Args:
        reward_norm: ``"standardize"`` (mean and std), ``"center"`` (mean only) or ``"none"``.
        stats: ``{"mean", "std"}`` of the reward model's scores on SFT samples (a missing std counts as 1).

    >>> reward_normalisation("standardize", {"mean": 1.0, "std": 2.0})
    (1.0, 2.0)
    >>> reward_normalisation("center", {"mean": 1.0, "std": 2.0}), reward_normalisation("none", {"mean": 1.0})
    ((1.0, 1.0), (0.0, 1.0))
    """
    if reward_norm == "none":
        return 0.0, 1.0
    if reward_norm not in ("center", "standardize"):
        raise ValueError(f"reward_norm must be 'standardize', 'center' or 'none', got {reward_norm!r}")
    scale = max(float(stats.get("std", 1.0)), 1e-8) if reward_norm == "standardize" else 1.0
    return float(stats["mean"]), scale


def final_scores(
    normalised: torch.Tensor, ended: torch.Tensor, reward_clip: float = 0.0, missing_eos_penalty: float = 0.0
) -> torch.Tensor:
    """The score ``(B,)`` PPO maximises: the normalised score clipped to ``[-reward_clip, reward_clip]`` (0: no
    clipping), minus ``missing_eos_penalty`` where the response did not end with the end-of-turn token.

    Args:
        normalised: ``(B,)`` scores after :func:`reward_normalisation`.
        ended: ``(B,)`` bool, the response ended with the end-of-turn token.
        reward_clip: clip bound (``ppo.reward_clip``), >= 0.
        missing_eos_penalty: subtracted from responses that did not end (``ppo.missing_eos_penalty``).

    >>> final_scores(torch.tensor([5.0, -0.5, -4.0]), torch.tensor([True, False, False]), 2.0, 1.0)
    tensor([ 2.0000, -1.5000, -3.0000])
    """
    if reward_clip < 0:
        raise ValueError(f"reward_clip must be >= 0, got {reward_clip}")
    scores = normalised.clamp(-reward_clip, reward_clip) if reward_clip > 0 else normalised
    return scores - missing_eos_penalty * (~ended.bool()).to(scores.dtype)
