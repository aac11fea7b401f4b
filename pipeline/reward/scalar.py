"""The classic reward model: a scalar head on a causal LM backbone (InstructGPT; Ouyang et al. 2022).

:func:`load_reward_model` turns a causal LM dir (the SFT artifact, or any HF model) into
``AutoModelForSequenceClassification`` with ``num_labels=1`` and ``config.pad_token_id`` set (the head reads
the last non-pad token); a reward model dir loads as it is. :class:`ScalarReward` wraps it as a
:class:`~pipeline.reward.scorer.RewardScorer`: text is scored right-padded, PPO's token ids with the head applied
at the response's last token (the end-of-turn token, appended where generation stopped without one).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl.trainer.reward_trainer import suppress_seqcls_warning

from pipeline.lm import (
    concat_inputs,
    context_length,
    disable_dropout,
    ensure_end_token,
    eval_mode,
    fuse_activations,
    gpt2_hidden_states,
    lean_forward_applies,
    right_pad,
    stop_token_ids,
)
from pipeline.tokenizer import ensure_chat_tokens

from .scorer import encode_for_reward

__all__ = ["ScalarReward", "load_reward_model", "token_scores", "sequence_scores"]

log = logging.getLogger(__name__)


def load_reward_model(model_dir: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A scalar-head sequence classifier on the backbone in ``model_dir``, and its tokenizer.

    A causal LM dir gets a new, randomly initialised ``score`` head (seed torch first for a reproducible
    one); a reward model dir loads as is. The tokenizer is given the project's chat tokens, template and pad
    token (``pipeline.tokenizer.ensure_chat_tokens``, as SFT does for external models), so the reward model
    scores the same chat format the policy writes; the embeddings grow when tokens were added.

    Returns:
        (model in float32 with ``num_labels == 1`` and ``config.pad_token_id`` set, tokenizer).
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    ensure_chat_tokens(tokenizer)  # a no-op for the pipeline's own tokenizer
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


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
    start: int = 0,
) -> torch.Tensor:
    """The sequence-classification head applied at positions ``start:`` of ``[query | response]``: ``(B, P + T -
    start)`` float32 (PPO's value model reads the positions from the last prompt token on, the reward model the
    last token). A plain GPT-2 backbone runs only those rows in its last block (:func:`gpt2_hidden_states`)."""
    backbone, head = _backbone_and_head(model)
    input_ids, attention_mask, position_ids = concat_inputs(query_ids, query_mask, response_ids, response_mask)
    if lean_forward_applies(backbone):
        hidden = gpt2_hidden_states(backbone, input_ids, attention_mask, position_ids, start=start)
    else:
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[:, start:]
    return head(hidden).squeeze(-1).float()


def sequence_scores(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Reward-model score ``(B,)`` of each prompt+response: the head at the response's last token."""
    P = query_ids.shape[1]
    scores = token_scores(model, query_ids, query_mask, response_ids, response_mask, start=P - 1)
    last = 1 + (response_mask.long().sum(-1) - 1).clamp(min=0)  # position P + len - 1, counted from P - 1
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)


class ScalarReward:
    """A :class:`~pipeline.reward.scorer.RewardScorer` around a one-label sequence classifier.

    Args:
        model: the classifier (a DDP wrapper is unwrapped).
        tokenizer: its tokenizer, with a chat template (only :meth:`score_texts` needs it).
        stop_ids: ids that end a response, the end-of-turn token first (appended by :meth:`score_ids` where missing).
        pad_id: the padding id of PPO's responses.
    """

    kind = "scalar"
    normalised = True
    trains_critic = True

    def __init__(self, model: Any, tokenizer: Any = None, stop_ids: list[int] | None = None,
                 pad_id: int | None = None) -> None:  # fmt: skip
        self.model = getattr(model, "module", model)
        self.tokenizer = tokenizer
        if stop_ids is None and tokenizer is not None:
            stop_ids = stop_token_ids(tokenizer)
        self.stop_ids = list(stop_ids or [])
        pad = self.model.config.pad_token_id if pad_id is None else pad_id
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    @classmethod
    def load(cls, model_dir: str, trust_remote_code: bool = False, stop_ids: list[int] | None = None,
             pad_id: int | None = None) -> ScalarReward:  # fmt: skip
        """:func:`load_reward_model` wrapped as a scorer."""
        model, tokenizer = load_reward_model(model_dir, trust_remote_code)
        return cls(model, tokenizer, stop_ids, pad_id)

    def place(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        self.model.to(device=device, dtype=dtype)

    def prepare_for_rl(self) -> None:
        """No dropout, the fastest tanh-GELU (:func:`pipeline.lm.fuse_activations`), no gradients, eval mode."""
        disable_dropout(self.model)
        fuse_activations(self.model)
        self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def score_texts(self, prompts: list[Any], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """Rewards ``(N,)`` (float32, CPU) of (prompt, response) pairs, formatted by
        :func:`~pipeline.reward.scorer.format_for_reward`.

        Sequences are right-padded (the head reads the last non-pad token); one longer than the model's
        context keeps its last tokens, with a warning. The model's train/eval mode is restored.
        """
        model, tokenizer = self.model, self.tokenizer
        if len(prompts) != len(responses):
            raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return torch.zeros(0)
        encoded = [encode_for_reward(tokenizer, p, r) for p, r in zip(prompts, responses)]
        ctx = context_length(model)
        if ctx is not None and any(len(e) > ctx for e in encoded):
            log.warning("score_texts: %d sequences longer than %d tokens keep their last %d",
                        sum(len(e) > ctx for e in encoded), ctx, ctx)  # fmt: skip
            encoded = [e[-ctx:] for e in encoded]
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
        device = next(model.parameters()).device
        out = []
        with eval_mode(model):
            for start in range(0, len(encoded), batch_size):
                ids, mask = right_pad(encoded[start : start + batch_size], pad_id)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                out.append(logits[:, 0].float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def score_ids(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Rewards ``(B,)`` (float32, on the model's device) in PPO's rollout layout; a response that did not end
        gets the end-of-turn token first, as the reward model's training text had it."""
        ids, mask = ensure_end_token(response_ids, response_mask, self.stop_ids, self.pad_id)
        dev = next(self.model.parameters()).device
        t = [x.to(dev) for x in (query_ids, query_mask, ids, mask)]
        return sequence_scores(self.model, *t).float()
