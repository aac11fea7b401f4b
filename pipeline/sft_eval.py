"""SFT evaluation: greedy answers to held-out prompts, judged by the tasks' checker, before, during and after
fine-tuning (``checker_accuracy``, with its 95% Wilson interval).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

from pipeline.analysis.checker import checker_accuracy_ci, has_checker
from pipeline.config import SFTStageConfig
from pipeline.data.conversations import last_user_prompt
from pipeline.data.tasks import check_answer
from pipeline.lm import generate_responses
from pipeline.training import is_zero3

__all__ = ["AnswerEval", "evaluate_answers", "held_out_records", "CheckerEvalCallback"]


@dataclass
class AnswerEval:
    accuracy: float | None
    """Checker accuracy over the held-out records that have a checker (None when none has)."""
    n: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    """A few {prompt, response, expected, correct} for the manifest and the report."""
    ci95: list[float] | None = None
    """The 95% Wilson interval [low, high] of ``accuracy`` (None when it is None)."""
    n_checked: int = 0
    """Records with a checker: the ``n`` of ``accuracy`` and ``ci95``."""


def evaluate_answers(model: Any, tokenizer: Any, records: list[dict[str, Any]], cfg: SFTStageConfig) -> AnswerEval:
    """Greedy answers to the held-out prompts, judged by the tasks' checker; plus a few samples."""
    if not records:
        return AnswerEval(None, 0, [])
    kwargs: dict[str, Any] = {}
    if is_zero3():
        kwargs["synced_gpus"] = True  # every rank must take part in each forward of a sharded model
    prompts = [last_user_prompt(r) for r in records]
    responses = generate_responses(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size, **kwargs)
    accuracy, ci95, n_checked = checker_accuracy_ci(records, responses)
    samples = []
    for rec, prompt, resp in list(zip(records, prompts, responses))[: cfg.n_samples]:
        expected = rec.get("answer") if has_checker(rec) else rec["messages"][-1]["content"]
        correct = bool(check_answer(rec, resp)) if has_checker(rec) else None
        samples.append({"prompt": prompt, "response": resp, "expected": expected, "correct": correct})
    return AnswerEval(accuracy, len(records), samples, ci95, n_checked)


def held_out_records(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first ``n`` held-out records, those with a checker first (so accuracy uses as many as possible)."""
    ranked = [r for r in records if has_checker(r)] + [r for r in records if not has_checker(r)]
    return ranked[:n]


class CheckerEvalCallback(TrainerCallback):
    """After each evaluation, answer the held-out prompts and add ``checker_accuracy`` to the logs."""

    def __init__(
        self,
        tokenizer: Any,
        records: list[dict[str, Any]],
        cfg: SFTStageConfig,
        sink: Callable[[dict[str, Any]], None],
    ) -> None:
        self.tokenizer, self.records, self.cfg, self.sink = tokenizer, records, cfg, sink
        self.last: AnswerEval | None = None
        self.trainer: Any = None

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not self.records or self.trainer is None:
            return
        self.last = evaluate_answers(self.trainer.model, self.tokenizer, self.records, self.cfg)
        if self.last.accuracy is not None and metrics is not None:
            metrics["eval_checker_accuracy"] = self.last.accuracy
            if state.is_world_process_zero:
                self.sink({"step": state.global_step, "sft/checker_accuracy": self.last.accuracy})
