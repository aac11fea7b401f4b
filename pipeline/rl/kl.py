"""The KL penalty that holds the policy near the frozen reference, and its coefficient controllers.

Per-token reward (Ziegler et al. 2019; InstructGPT eqn. 2):

    r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))        for every response token
    r_T += score                                                   on the last token of the response

``beta`` is fixed (:class:`FixedKLController`) or adapted toward a target KL
(:class:`AdaptiveKLController`, Ziegler et al. 2019 sec. 2.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "kl_per_token",
    "last_token_index",
    "compute_rewards",
    "FixedKLController",
    "AdaptiveKLController",
    "make_kl_controller",
]


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The k1 estimator log pi - log pi_ref of each sampled token, 0 on padding: ``(B, T)``.

    Its expectation under the policy's samples is KL(pi || pi_ref); it is the per-token penalty of
    InstructGPT. It is exactly 0 when the policy equals the reference.
    """
    return torch.where(mask.bool(), logprobs - ref_logprobs, torch.zeros_like(logprobs))


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last unmasked position of each row of a ``(B, T)`` prefix mask: ``(B,)``.

    >>> last_token_index(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    tensor([1, 2])
    """
    return (mask.long().sum(-1) - 1).clamp(min=0)


def compute_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: the KL penalty on every response token plus the score on the last one.

    Args:
        scores: ``(B,)`` sequence-level scores (centred reward-model output minus any penalty).
        logprobs: ``(B, T)`` policy log-probs of the sampled tokens at rollout time.
        ref_logprobs: ``(B, T)`` reference log-probs of the same tokens.
        mask: ``(B, T)`` 1 on response tokens (a prefix of each row).
        kl_coef: beta.

    Returns:
        ``(rewards, kl)``: both ``(B, T)``, 0 on padding; ``kl`` is :func:`kl_per_token`.
    """
    kl = kl_per_token(logprobs, ref_logprobs, mask)
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    return rewards, kl


def sequence_returns(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-response returns ``(B,)`` without a critic: the score minus ``kl_coef`` times the KL summed over the
    response's tokens (the sum of :func:`compute_rewards`' per-token rewards, for group advantages).

    >>> sequence_returns(torch.tensor([1.0]), torch.tensor([[0.5, 0.5, 9.0]]), torch.tensor([[1, 1, 0]]), 0.5)
    tensor([0.5000])
    """
    m = mask.to(kl.dtype)
    return scores.to(kl.dtype) - kl_coef * (kl * m).sum(1)


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019 (sec. 2.2): move beta toward the KL target, proportionally and slowly.

        e       = clip(KL / target - 1, -0.2, 0.2)
        beta   <- beta * (1 + e * n_steps / horizon)

    ``n_steps`` is the number of samples (prompts) in the update, ``horizon`` the samples over which
    the error is corrected.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def make_kl_controller(
    init_coef: float, adaptive: bool, target: float, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """The controller a config asks for."""
    if adaptive:
        return AdaptiveKLController(init_coef, target, horizon)
    return FixedKLController(init_coef)
