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
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from .kl import last_token_index
from .losses import entropy_from_logits, logprobs_from_logits

__all__ = [
    "Rollout",
    "PolicyAndValue",
    "left_pad",
    "truncate_after_stop",
    "concat_inputs",
    "ensure_end_token",
    "generate",
    "response_logprobs",
    "token_scores",
    "sequence_scores",
    "disable_dropout",
    "fuse_activations",
]


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
    """(B,) the score PPO maximises: normalised reward minus the penalty for not ending."""
    ended: torch.Tensor
    """(B,) bool: the response produced a stop token."""
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
        for name in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values", "advantages", "returns"):
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs ``(B, T)``, values ``(B, T)`` and entropies ``(B, T)`` of the responses.

        The entropy is differentiable when ``with_entropy`` (an entropy bonus is trained), a detached
        statistic when gradients are on otherwise, and None under ``torch.no_grad()``.
        """
        logits = _response_logits(self.policy, query_ids, query_mask, response_ids, response_mask, temperature)
        logprobs = logprobs_from_logits(logits, response_ids)
        entropy = None
        if with_entropy:
            entropy = entropy_from_logits(logits)
        elif torch.is_grad_enabled():  # a statistic only: no (B, T, V) softmax in the backward pass
            with torch.no_grad():
                entropy = entropy_from_logits(logits)
        if self.value_model is None:  # no critic: zero values, outside the graph
            return logprobs, torch.zeros_like(logprobs, requires_grad=False), entropy
        values = token_scores(self.value_model, query_ids, query_mask, response_ids, response_mask)
        if self.value_shift != 0.0 or self.value_scale != 1.0:
            values = (values - self.value_shift) / self.value_scale
        P, T = query_ids.shape[1], response_ids.shape[1]
        return logprobs, values[:, P - 1 : P - 1 + T], entropy


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: PPO's ratio must be 1 before the first update."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def fuse_activations(model: nn.Module) -> int:
    """Swap GPT-2's Python tanh-GELU (``gelu_new``: 5 elementwise kernels and their backward) for torch's
    fused ``gelu(approximate="tanh")``: the same function up to float rounding, ~20% of a tiny model's PPO step.

    Returns:
        The number of activation modules replaced (the saved config is untouched).
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                n += 1
    return n


def left_pad(
    seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids, mask)`` of shape ``(B, max_len)``.

    >>> left_pad([[5, 6], [7]], pad_id=0)
    (tensor([[5, 6],
            [0, 7]]), tensor([[1, 1],
            [0, 1]]))
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def truncate_after_stop(
    response_ids: torch.Tensor, stop_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token.

    Returns:
        ``(ids, mask, ended)``: ids with everything after the first stop token set to ``pad_id``;
        ``(B, T)`` mask, 1 up to and including that stop token (all ones when there is none);
        ``(B,)`` bool, whether a stop token occurred.

    >>> truncate_after_stop(torch.tensor([[4, 9, 4, 4], [4, 4, 4, 4]]), stop_ids=[9], pad_id=0)
    (tensor([[4, 9, 0, 0],
            [4, 4, 4, 4]]), tensor([[1, 1, 0, 0],
            [1, 1, 1, 1]]), tensor([ True, False]))
    """
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))
    # stops strictly before position t: a token is kept while no stop came before it
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    mask = (stops_before == 0).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return ids, mask, is_stop.any(dim=1)


def ensure_end_token(
    response_ids: torch.Tensor, response_mask: torch.Tensor, stop_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the end-of-turn token (``stop_ids[0]``) to every response that did not produce a stop token,
    so the reward model scores text in the format it was trained on (prompt + response + ``<|end|>``).

    Returns:
        ``(ids, mask)`` of width ``T + 1``.

    >>> ensure_end_token(torch.tensor([[4, 9, 0], [4, 4, 4]]), torch.tensor([[1, 1, 0], [1, 1, 1]]), [9], 0)
    (tensor([[4, 9, 0, 0],
            [4, 4, 4, 9]]), tensor([[1, 1, 0, 0],
            [1, 1, 1, 1]]))
    """
    B = response_ids.shape[0]
    ids = torch.cat([response_ids, response_ids.new_full((B, 1), pad_id)], dim=1)
    mask = torch.cat([response_mask, response_mask.new_zeros((B, 1))], dim=1)
    lengths = response_mask.long().sum(1)
    last = ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    ended = torch.isin(last, torch.tensor(stop_ids, device=ids.device)) & (lengths > 0)
    rows = (~ended).nonzero().squeeze(1)
    ids[rows, lengths[rows]] = stop_ids[0]
    mask[rows, lengths[rows]] = 1
    return ids, mask


def concat_inputs(
    query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of ``[query | response]``, each ``(B, P + T)``.

    Position ids count real tokens only, so left padding does not shift a sequence's positions.
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _response_logits(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Logits ``(B, T, V)`` (float32, divided by the sampling temperature) that predict each response token."""
    input_ids, attention_mask, position_ids = concat_inputs(query_ids, query_mask, response_ids, response_mask)
    T = response_ids.shape[1]
    # only the T positions that predict response tokens go through the LM head: (B, T + 1, V) -> (B, T, V)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=T + 1,
        use_cache=False,
    )
    return out.logits[:, :-1].float() / temperature


def response_logprobs(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs ``(B, T)`` of the response tokens under a causal LM, 0 on padding."""
    logits = _response_logits(model, query_ids, query_mask, response_ids, response_mask, temperature)
    lp = logprobs_from_logits(logits, response_ids)
    return lp * response_mask


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = getattr(model, "score", None)
    if backbone is None or head is None:
        raise TypeError(
            f"{type(model).__name__}: a reward/value model needs a backbone (base_model_prefix) and a `score` head, "
            "as AutoModelForSequenceClassification models have"
        )
    return backbone, head


def token_scores(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """The sequence-classification head applied at every position of ``[query | response]``: ``(B, P + T)`` float32."""
    backbone, head = _backbone_and_head(model)
    input_ids, attention_mask, position_ids = concat_inputs(query_ids, query_mask, response_ids, response_mask)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return head(hidden).squeeze(-1).float()


def sequence_scores(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Reward-model score ``(B,)`` of each prompt+response: the head at the response's last token."""
    scores = token_scores(model, query_ids, query_mask, response_ids, response_mask)
    last = query_ids.shape[1] + last_token_index(response_mask)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def generate(
    policy: Any,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or greedily decode) responses with the KV cache; see :func:`truncate_after_stop`.

    Args:
        policy: a Hugging Face causal LM (already gathered under ZeRO-3).
        query_ids, query_mask: ``(B, P)`` left-padded prompts.
        max_new_tokens: response length limit.
        stop_ids: ids that end a response (``<|end|>``, ``<|endoftext|>``).
        pad_id: id written after the end of a response.
        do_sample, temperature, top_k, top_p: sampling settings (greedy when ``do_sample`` is False).

    Returns:
        ``(response_ids, response_mask, ended)``, ``(B, T)``, ``(B, T)``, ``(B,)`` with ``T <= max_new_tokens``.
    """
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=top_k if do_sample else None,
        top_p=top_p if do_sample else None,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )
    was_training = policy.training
    policy.eval()
    try:
        out = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen)
    finally:
        policy.train(was_training)
    return truncate_after_stop(out[:, query_ids.shape[1] :], stop_ids, pad_id)
