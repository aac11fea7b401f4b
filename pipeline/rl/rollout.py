"""Rollouts: batched generation from left-padded prompts and scoring of prompt+response tokens.

Shapes (``B`` prompts, ``P`` the longest prompt, ``T`` the longest response of the batch):

    query_ids      (B, P)  left-padded prompt ids           query_mask    (B, P)  1 on prompt tokens
    response_ids   (B, T)  sampled ids, pad after the end    response_mask (B, T)  1 up to and including
                                                                                    the first stop token

Scoring runs the concatenation ``[query | response]`` of width ``P + T`` with position ids that
follow the attention mask (``cumsum(mask) - 1``), so a response's log-probs and values do not
depend on how much left padding its batch mates forced on it. Response token ``t`` is predicted at
position ``P - 1 + t``; its value is the value of that state (the state in which it was chosen).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from pipeline.lm import entropy_from_logits, logprobs_from_logits, response_logits
from pipeline.reward.scalar import token_scores

__all__ = ["Rollout", "PolicyAndValue"]


@dataclass
class Rollout:
    """One batch of experience. Tensors on one device; ``B`` rows throughout."""

    query_ids: torch.Tensor
    """(B, P) prompt ids, left-padded with the pad id."""
    query_mask: torch.Tensor
    """(B, P) 1 on prompt tokens, 0 on left padding."""
    response_ids: torch.Tensor
    """(B, T) generated ids; after the first stop token only the pad id."""
    response_mask: torch.Tensor
    """(B, T) 1 on response tokens up to and including the first stop token."""
    logprobs: torch.Tensor
    """(B, T) log-probs of the response tokens under the policy that sampled them (0 on padding)."""
    ref_logprobs: torch.Tensor
    """(B, T) the same under the frozen reference."""
    values: torch.Tensor
    """(B, T) value estimates of the state before each response token."""
    raw_scores: torch.Tensor
    """(B,) reward-model score of prompt+response."""
    scores: torch.Tensor
    """(B,) the score PPO maximises: normalised (optionally clipped) reward minus the penalty for not ending
    (:func:`pipeline.rl.scores.final_scores`)."""
    ended: torch.Tensor
    """(B,) bool: the response ended with the end-of-turn token (not another stop token, nor the length limit)."""
    entropy: torch.Tensor | None = None
    """(B, T) entropy of the sampling policy's next-token distribution at each response position (a statistic)."""
    advantages: torch.Tensor | None = None
    """(B, T) GAE advantages (whitened when configured), set by the trainer before the PPO epochs."""
    returns: torch.Tensor | None = None
    """(B, T) value targets, set with ``advantages``."""

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, index: torch.Tensor) -> Rollout:
        """Rows ``index``, with columns that are padding in every selected row trimmed away."""
        sub = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in fields(self)}
        keep_q = sub["query_mask"].any(0).nonzero()
        q0 = int(keep_q[0]) if len(keep_q) else sub["query_mask"].shape[1] - 1
        t1 = max(int(sub["response_mask"].sum(1).max()), 1)
        for name in ("query_ids", "query_mask"):
            sub[name] = sub[name][:, q0:]
        for name in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values", "entropy", "advantages",
                     "returns"):  # fmt: skip
            if sub[name] is not None:
                sub[name] = sub[name][:, :t1]
        return Rollout(**sub)


class PolicyAndValue(nn.Module):
    """The trained pair as one module, so DDP and DeepSpeed see a single engine with one optimizer.

    accelerate prepares several DeepSpeed models only with one config per model; one module with two
    parameter groups (policy lr, value lr) keeps every backend on the same code path.

    ``value_shift``/``value_scale`` put the value model's outputs on the rewards' scale: a value model
    initialised from the reward model predicts raw scores, while PPO's rewards are the scores normalised
    with the reward statistics, so its values are ``(head - shift) / scale`` (OpenRLHF's critic does the
    same). Without it the first updates' advantages are dominated by the offset (value loss ~ mean^2).
    Without a value model (``ppo.advantage=group``) the values are zeros and only the policy trains.
    """

    def __init__(
        self, policy: nn.Module, value_model: nn.Module | None, value_shift: float = 0.0, value_scale: float = 1.0
    ) -> None:
        super().__init__()
        if not value_scale > 0:
            raise ValueError(f"value_scale must be > 0, got {value_scale}")
        self.policy = policy
        self.value_model = value_model
        self.value_shift = float(value_shift)
        self.value_scale = float(value_scale)

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        temperature: float = 1.0,
        with_entropy: bool = False,
        with_policy: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Log-probs ``(B, T)``, values ``(B, T)`` and, when ``with_entropy``, entropies ``(B, T)`` of the responses
        (else None). The entropy is differentiable when gradients are on (an entropy bonus is trained); the rollout
        takes it from the sampling distribution (or computes it once here under ``torch.no_grad()``), so the PPO
        epochs need no ``(B, T, V)`` softmax. ``with_policy=False``: values only (log-probs and entropy None).
        """
        logprobs = entropy = None
        if with_policy:
            logits = response_logits(self.policy, query_ids, query_mask, response_ids, response_mask, temperature)
            logprobs = logprobs_from_logits(logits, response_ids)
            entropy = entropy_from_logits(logits) if with_entropy else None
        if self.value_model is None:  # no critic: zero values, outside the graph
            return logprobs, torch.zeros(response_ids.shape, device=response_ids.device), entropy
        P, T = query_ids.shape[1], response_ids.shape[1]
        values = token_scores(self.value_model, query_ids, query_mask, response_ids, response_mask, start=P - 1)
        values = values[:, :T]  # the value of the state before each response token
        if self.value_shift != 0.0 or self.value_scale != 1.0:
            values = (values - self.value_shift) / self.value_scale
        return logprobs, values, entropy
