"""PPO losses and their diagnostics: clipped policy loss, clipped value loss, entropy.

Every mean is over the unmasked response tokens of the minibatch (``mask`` is 1 on a response's
tokens, 0 on the padding after its end), so tokens after the end of a response never count.

    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    vf_loss, vf_stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    loss = pg_loss + vf_coef * vf_loss - entropy_coef * masked_mean(entropy, mask)
"""

from __future__ import annotations

import torch

from .gae import masked_mean, masked_var

__all__ = ["policy_loss", "value_loss", "explained_variance"]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate objective, eqn. 7 of Schulman et al. 2017 (PPO), as a loss to minimise.

        ratio = exp(logp - logp_old)
        loss  = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

    Args:
        logprobs: ``(B, T)`` log-probabilities of the taken tokens under the current policy.
        old_logprobs: ``(B, T)`` the same under the policy that generated the rollout.
        advantages: ``(B, T)`` advantage estimates (constants).
        mask: ``(B, T)`` 1 on response tokens.
        cliprange: epsilon.

    Returns:
        ``(loss, stats)``: the scalar loss and detached ``clipfrac`` (share of tokens where the
        clipped term is the larger one), ``approx_kl`` (0.5 * mean((logp - logp_old)^2), Schulman's
        k2 estimator of KL(old || new)) and ``ratio`` (mean ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss of OpenAI baselines' PPO2 (and "The N implementation details of RLHF").

        v_clip = old_v + clip(v - old_v, -eps_v, eps_v)
        loss   = 0.5 * mean(max((v - R)^2, (v_clip - R)^2))

    Args:
        values: ``(B, T)`` current value predictions.
        old_values: ``(B, T)`` predictions at rollout time.
        returns: ``(B, T)`` GAE value targets.
        mask: ``(B, T)`` 1 on response tokens.
        cliprange_value: eps_v.

    Returns:
        ``(loss, stats)`` with detached ``vf_clipfrac`` (share of tokens where the clipped error is larger).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over masked positions: 1 is a perfect critic, 0 predicts the mean, < 0 worse."""
    var_r = masked_var(returns, mask, unbiased=False)
    var_err = masked_var(returns - values, mask, unbiased=False)
    return 1.0 - var_err / var_r.clamp(min=1e-8)
