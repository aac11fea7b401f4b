"""Advantages and returns for PPO: masked statistics, whitening and GAE.

All tensors are over *response* tokens, shape ``(B, T)`` with ``T`` = the longest response of the
batch; ``mask`` is 1 on a response's own tokens (its end-of-turn token included) and 0 on the
padding after it. Masked-out positions never enter a statistic, and the advantages and returns
there are 0.

    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    adv = masked_whiten(adv, mask)

GAE is eqn. 11-12 of Schulman et al. 2016 ("High-dimensional continuous control using
generalized advantage estimation"):

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)        (V after the last response token is 0)
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V(s_t)                             (the value target)
"""

from __future__ import annotations

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten", "compute_gae", "group_advantages"]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set (``x`` values under the mask's zeros are ignored, even NaN)."""
    masked = torch.where(mask.bool(), x, torch.zeros_like(x))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set.

    >>> masked_mean(torch.tensor([1.0, 2.0, 100.0]), torch.tensor([1, 1, 0]))
    tensor(1.5000)
    """
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected when ``unbiased``).

    Raises:
        ValueError: ``unbiased`` with fewer than two masked positions (the variance is undefined).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var: need at least 2 unmasked values for an unbiased variance, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to mean 0, variance 1 over the masked positions; masked-out positions become 0.

    Args:
        x: ``(B, T)`` values, e.g. advantages.
        mask: ``(B, T)`` 1 where ``x`` counts.
        shift_mean: when False the mean is added back (only the scale changes), as for rewards.
        eps: added to the variance before the square root.

    Returns:
        ``(B, T)`` whitened values.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask) if mask.sum() > 1 else torch.ones_like(mean)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and value targets for one batch of responses.

    The response's last unmasked token is terminal (the value after it is 0); ``mask`` must be a
    prefix of ones per row (tokens after the end of a response are padding).

    Args:
        rewards: ``(B, T)`` per-token rewards (KL penalty on every token, score on the last one).
        values: ``(B, T)`` value estimates V(s_t) of the state before each response token.
        mask: ``(B, T)`` 1 on response tokens, 0 on padding.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` and 0 where ``mask`` is 0.
    """
    m = mask.to(values.dtype)
    rewards = rewards * m
    values = values * m
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]  # padding carries nothing back
        advantages[:, t] = last
    returns = (advantages + values) * m
    return advantages, returns


def group_advantages(returns: torch.Tensor, mask: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out advantages over several samples of one prompt (RLOO, Ahmadian et al. 2024), no critic.

    Each response's advantage is its return (:func:`pipeline.rl.kl.sequence_returns`: the score minus the KL
    penalty summed over its tokens) minus the mean return of the other ``group_size - 1`` samples of the same
    prompt, the same for every token of the response. Rows come in groups: rows
    ``g * group_size .. (g + 1) * group_size - 1`` answer one prompt.

    Args:
        returns: ``(B,)`` sequence-level returns.
        mask: ``(B, T)`` 1 on response tokens.
        group_size: samples per prompt (>= 2, divides B).

    Returns:
        ``(advantages, returns)``, both ``(B, T)``: the advantage and the return broadcast over each
        response's tokens, 0 where ``mask`` is 0.

    >>> adv, ret = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), torch.ones(4, 2), 2)
    >>> adv[:, 0].tolist(), ret[:, 1].tolist()
    ([1.0, -1.0, 0.0, 0.0], [1.0, 0.0, 3.0, 3.0])
    """
    B = returns.shape[0]
    if group_size < 2 or B % group_size:
        raise ValueError(f"group_advantages: group_size={group_size} must be >= 2 and divide the batch of {B}")
    m = mask.to(returns.dtype)
    grouped = returns.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    adv = (grouped - baseline).view(B)
    return adv.unsqueeze(1) * m, returns.unsqueeze(1) * m
