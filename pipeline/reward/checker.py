"""The task checker as a reward (``ppo.reward=checker``): the oracle ablation of PPO.

:class:`CheckerScorer` scores a response with :func:`pipeline.data.tasks.score_answer`, the task's partial-credit
score in [0, 1], against the record its prompt came from. It needs no network and no normalisation.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.data.task_checks import has_checker, score_answer
from pipeline.runs import StageError

__all__ = ["CheckerScorer"]


class CheckerScorer:
    """A :class:`~pipeline.reward.scorer.RewardScorer` that is the task checker.

    Args:
        tokenizer: decodes responses (special tokens dropped, as in evaluation).
        prompt_ids: rendered prompt ids of every record that may be scored (training and held-out).
        records: the matching records, each with ``task`` and ``answer`` (and ``prompt`` for the text path).

    Raises:
        StageError: a record without ``task``/``answer`` (no checker), named by its id or position.
    """

    kind = "checker"
    normalised = False
    trains_critic = False

    def __init__(self, tokenizer: Any, prompt_ids: list[list[int]], records: list[dict[str, Any]]) -> None:
        for i, rec in enumerate(records):
            if not has_checker(rec):
                raise StageError(
                    f"ppo.reward=checker: prompt record {rec.get('id', i)!r} has no 'task'/'answer' fields, so no "
                    "checker can score it; use the generated tasks (dataset source 'default') or ppo.reward=model"
                )
        self.tokenizer = tokenizer
        self.by_prompt = {tuple(ids): rec for ids, rec in zip(prompt_ids, records)}
        self.by_text = {rec["prompt"]: rec for rec in records if isinstance(rec.get("prompt"), str)}

    def place(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        return None  # a program: nothing to move

    def prepare_for_rl(self) -> None:
        return None

    def score_texts(self, prompts: list[Any], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """Checker scores ``(N,)`` of responses to prompts (user-message strings among the records)."""
        missing = [p for p in prompts if not isinstance(p, str) or p not in self.by_text]
        if missing:
            raise StageError(f"ppo.reward=checker: {len(missing)} prompts are not among the scored records")
        return torch.tensor([score_answer(self.by_text[p], r) for p, r in zip(prompts, responses)], dtype=torch.float32)

    def score_ids(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Checker scores ``(B,)`` of PPO's rollouts, matched to their records by the prompt's token ids."""
        out = []
        for q, qm, r, rm in zip(query_ids, query_mask, response_ids, response_mask):
            key = tuple(q[qm.bool()].tolist())
            if key not in self.by_prompt:
                raise StageError(
                    "ppo.reward=checker: a rollout prompt is not among the scored records (internal error)"
                )
            text = self.tokenizer.decode(r[rm.bool()].tolist(), skip_special_tokens=True)
            out.append(score_answer(self.by_prompt[key], text))
        return torch.tensor(out, dtype=torch.float32)
