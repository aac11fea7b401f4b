"""What a reward model is to the rest of the pipeline: one :class:`RewardScorer` protocol, and how to load one.

Three kinds implement it:

- :class:`~pipeline.reward.scalar.ScalarReward`: a scalar head on a causal LM backbone
  (``AutoModelForSequenceClassification``, ``num_labels=1``), trained with the Bradley-Terry loss
  (``reward.objective=bradley_terry``, the classic InstructGPT reward model);
- :class:`~pipeline.reward.implicit.ImplicitReward`: DPO's implicit reward ``beta * log pi(y|x) / pi_ref(y|x)``
  of a causal LM trained with the DPO loss (``reward.objective=dpo``);
- :class:`~pipeline.reward.checker.CheckerScorer`: the task checker itself (``ppo.reward=checker``, the oracle).

Each scores text (:meth:`RewardScorer.score_texts`: the reward stage's evaluation, best-of-k, the report) and
token ids in PPO's rollout layout (:meth:`RewardScorer.score_ids`). Both paths score the same text: the prompt as a
user turn and the response as an assistant turn, rendered by the tokenizer's chat template
(:func:`format_for_reward`).

    scorer = load_scorer("runs/tiny/reward/artifact")            # whichever kind the folder holds
    rewards = scorer.score_texts(["2+2?"], ["4"])                 # (1,) float32
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["RewardScorer", "ProgrammaticReward", "format_for_reward", "encode_for_reward", "encode_prompt_response"]


@runtime_checkable
class RewardScorer(Protocol):
    """A frozen judge of (prompt, response) pairs.

    Attributes:
        kind: ``"scalar"``, ``"implicit"`` or ``"checker"`` (written into manifests).
        normalised: whether PPO centres/standardises this scorer's rewards with the reward stage's statistics
            (``reward_stats.json``; the scalar head's offset is arbitrary). Implicit rewards and the checker's
            scores are used as they are.
        trains_critic: whether the scorer's network can start PPO's value model (a scalar head can).
    """

    kind: str
    normalised: bool
    trains_critic: bool

    def score_texts(self, prompts: list[Any], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """Rewards ``(N,)`` (float32, CPU) of prompts (user-message strings or chat-message lists) and responses."""
        ...

    def score_ids(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Rewards ``(B,)`` (float32) of left-padded prompts ``(B, P)`` and right-padded responses ``(B, T)``, the
        response mask 1 up to and including its stop token (PPO's rollout layout, :mod:`pipeline.rl.rollout`)."""
        ...

    def place(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        """Move the scorer's networks (if any) to ``device`` (and to ``dtype`` when given)."""
        ...

    def prepare_for_rl(self) -> None:
        """Freeze the scorer's networks for PPO, with the speed-ups PPO applies to the networks it runs."""
        ...


def format_for_reward(tokenizer: Any, prompt: str | list[dict[str, str]], response: str) -> str:
    """The text a reward model scores: the prompt (a user message, or a conversation) and the response as
    an assistant turn, rendered with the tokenizer's chat template.

    >>> from types import SimpleNamespace
    >>> tok = SimpleNamespace(chat_template="x", apply_chat_template=lambda m, tokenize: "|".join(
    ...     f"{t['role']}:{t['content']}" for t in m))
    >>> format_for_reward(tok, "2+2?", "4")
    'user:2+2?|assistant:4'

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "format_for_reward: the tokenizer has no chat template (see pipeline.tokenizer.ensure_chat_tokens)"
        )
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)


def encode_for_reward(tokenizer: Any, prompt: str | list[dict[str, str]], response: str) -> list[int]:
    """Token ids of :func:`format_for_reward`'s text."""
    return tokenizer(format_for_reward(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]


def encode_prompt_response(tokenizer: Any, prompt: Any, response: str) -> tuple[list[int], int]:
    """Token ids of the prompt and response as the policy sees them, and where the response starts.

    The prompt is rendered with the generation prompt (as PPO's rollouts are); the full sequence is
    :func:`format_for_reward`'s text, so the response part ends with the template's end-of-turn token.

    Raises:
        ValueError: the template does not render the prompt as a prefix of the conversation.
    """
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    head = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = encode_for_reward(tokenizer, prompt, response)
    if ids[: len(head_ids)] != head_ids:
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + response")
    return ids, len(head_ids)


class ProgrammaticReward:
    """A reward computed by a function of PPO's token ids: ``fn(query_ids, query_mask, response_ids,
    response_mask) -> (B,)`` (a programmatic reward; tests and benchmarks use it). Scores are used as they are.

    Args:
        fn: the reward function, in PPO's rollout layout.
        kind: a name for manifests.
    """

    normalised = False
    trains_critic = False

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 kind: str = "programmatic") -> None:  # fmt: skip
        self.fn, self.kind = fn, kind

    def score_texts(self, prompts: list[Any], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        raise TypeError(f"a {self.kind} reward is a function of token ids: it has no text path (use score_ids)")

    def score_ids(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.fn(query_ids, query_mask, response_ids, response_mask).float()

    def place(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        return None  # a function: nothing to move

    def prepare_for_rl(self) -> None:
        return None
