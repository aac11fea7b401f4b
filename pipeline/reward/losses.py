"""Reward-model losses: the grouped Bradley-Terry loss of a scalar head, and DPO's loss with RPO's NLL term.

loss = grouped_bradley_terry_loss(rewards, winners, losers, weights)      # InstructGPT eqn. 1
loss, margin = dpo_loss(logps, ref_logps, beta)                          # DPO eqn. 7
loss = loss + nll_weight * chosen_nll(logps, lengths, best)             # RPO (Pang et al. 2024)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_bradley_terry_loss", "dpo_loss", "chosen_nll"]


def grouped_bradley_terry_loss(
    rewards: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
    weights: torch.Tensor,
    margins: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted Bradley-Terry loss over comparisons within a batch of scored sequences.

    ``loss = -sum_c w_c * log(sigmoid(r[winner_c] - r[loser_c] - m_c))``. With ``w_c = 1 / (B * C(K,2))``
    this is InstructGPT's eqn. 1 averaged over the B prompts of the batch; with one pair per prompt and no
    margin it is TRL's ``RewardTrainer`` loss; the margin term is Llama 2's (Touvron et al. 2023, eqn. 2).

    Args:
        rewards: (N,) one reward per sequence.
        winners, losers: (P,) indices into ``rewards`` of each comparison's preferred / other sequence.
        weights: (P,) comparison weights (summing to 1 over the batch).
        margins: (P,) or None.

    Returns:
        Scalar loss.
    """
    diff = rewards[winners] - rewards[losers]
    if margins is not None:
        diff = diff - margins
    return -(weights * F.logsigmoid(diff)).sum()


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss on interleaved (chosen, rejected) log-probs, and the implicit reward margins
    (Rafailov et al. 2023, eqn. 7)::

        loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

    >>> loss, margin = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), 0.5)
    >>> round(float(margin[0]), 3), round(float(loss), 4)
    (1.0, 0.3133)
    """
    ratio = logps - ref_logps
    margin = beta * (ratio[0::2] - ratio[1::2])
    return -F.logsigmoid(margin).mean(), margin


def chosen_nll(logps: torch.Tensor, lengths: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of the chosen responses (even rows of interleaved log-probs) whose ``best`` flag is set:
    ``-sum logps / sum lengths`` over those rows, 0 when there are none (RPO's NLL term).

    Plain DPO lowers the chosen responses' likelihood too, so every token's implicit reward drifts negative and
    shorter outputs (a prefix of the right answer, or none) score higher: a shortcut PPO takes (bench/RESULTS.md).
    This term keeps the best responses above the reference.

    >>> round(float(chosen_nll(torch.tensor([-1.0, -3.0, -6.0, -1.0]), torch.tensor([4, 1, 2, 1]),
    ...                        torch.tensor([1.0, 0.0]))), 3)
    0.25
    """
    w = best.to(logps.dtype)
    return -(logps[0::2] * w).sum() / (lengths[0::2].to(logps.dtype) * w).sum().clamp(min=1)
