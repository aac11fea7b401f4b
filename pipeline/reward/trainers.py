"""The reward stage's trainers: Hugging Face ``Trainer`` subclasses for each objective.

- pairs, scalar head: TRL's ``RewardTrainer`` unchanged (Bradley-Terry, optional margin);
- K-wise rankings, scalar head: :class:`GroupedRewardTrainer`, a ``RewardTrainer`` whose loss is
  :func:`~pipeline.reward.losses.grouped_bradley_terry_loss`: the K responses of a prompt are scored once, all
  C(K,2) comparisons are taken in the same batch and weighted 1/C(K,2), so each prompt counts once (InstructGPT,
  Ouyang et al. 2022, eqn. 1). Shuffling the C(K,2) pairs as independent examples overfits (same paper, sec. 3.5);
- ``reward.objective=dpo``: :class:`DPORewardTrainer`, the DPO loss on precomputed reference log-probs, plus RPO's
  NLL term on the best responses.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from pipeline.lm import sequence_logprobs, sequence_mask

from .data import GroupedPreferenceCollator
from .losses import chosen_nll, dpo_loss, grouped_bradley_terry_loss

__all__ = ["GroupedRewardTrainer", "build_reward_trainer", "DPORewardTrainer"]


class GroupedRewardTrainer(RewardTrainer):
    """``RewardTrainer`` on prompt groups (rows of :func:`grouped_rows`, batches of
    :class:`GroupedPreferenceCollator`), with :func:`grouped_bradley_terry_loss` as its loss.
    ``per_device_train_batch_size`` counts prompts; each step scores B x K sequences."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset  # rows come tokenised and length-filtered by encode_groups

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "winners", "losers", "weights", "margins"]

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1)
        w, lo, weights = inputs["winners"], inputs["losers"], inputs["weights"]
        loss = grouped_bradley_terry_loss(rewards, w, lo, weights, inputs.get("margins"))
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            diff = rewards[w] - rewards[lo]
            acc = self.accelerator.gather_for_metrics((weights * (diff > 0).float()).sum()).mean().item()
            self._metrics[mode]["accuracy"].append(acc)
            self._metrics[mode]["margin"].append((weights * diff).sum().item())
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
        return (loss, outputs) if return_outputs else loss


def build_reward_trainer(
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    args: RewardConfig,
    grouped: bool,
    callbacks: list[TrainerCallback] | None = None,
) -> RewardTrainer:
    """A ``GroupedRewardTrainer`` (``grouped``) or TRL's ``RewardTrainer`` on pre-tokenised rows."""
    train = Dataset.from_list(train_rows)
    evaluation = Dataset.from_list(eval_rows) if eval_rows and args.eval_strategy != "no" else None
    if grouped:
        collator = GroupedPreferenceCollator(tokenizer.pad_token_id)
        cls: type[RewardTrainer] = GroupedRewardTrainer
    else:
        collator = DataCollatorForPreference(tokenizer.pad_token_id)
        cls = RewardTrainer
    return cls(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


class DPORewardTrainer(Trainer):
    """``transformers.Trainer`` with :func:`dpo_loss` on :class:`DPOCollator` batches (precomputed reference
    log-probs), plus ``nll_weight`` times :func:`chosen_nll` in training (RPO; Pang et al. 2024). Logs the pair
    accuracy and margin of the implicit reward and the chosen responses' NLL with the loss; held-out batches
    give the DPO loss alone, the quantity the stage's final evaluation reports as ``val/loss``."""

    def __init__(self, *args: Any, beta: float, nll_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta, self.nll_weight = beta, nll_weight
        self._dpo_metrics: dict[str, list[float]] = {"accuracy": [], "margin": [], "chosen_nll": []}

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "chosen_start", "rejected_ids", "rejected_start",
                                       "ref_chosen", "ref_rejected", "chosen_best"]  # fmt: skip

    def _terms(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(DPO loss, margins, chosen NLL) of a batch."""
        logps = sequence_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["starts"])
        loss, margin = dpo_loss(logps, inputs["ref_logps"], self.beta)
        lengths = sequence_mask(inputs["attention_mask"], inputs["starts"]).sum(1)
        return loss, margin, chosen_nll(logps, lengths, inputs["chosen_best"])

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        loss, margin, nll = self._terms(model, inputs)
        if self.nll_weight:
            loss = loss + self.nll_weight * nll
        if model.training:
            m = margin.detach()
            self._dpo_metrics["accuracy"].append(float((m > 0).float().mean()))
            self._dpo_metrics["margin"].append(float(m.mean()))
            self._dpo_metrics["chosen_nll"].append(float(nll.detach()))
        return (loss, {"margin": margin}) if return_outputs else loss

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        """The DPO loss of a held-out batch (the base class would call the model without its inputs' meaning)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self._terms(model, inputs)[0]
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for k, v in self._dpo_metrics.items():
                if v:
                    logs[k] = sum(v) / len(v)
                v.clear()
        super().log(logs, *args, **kwargs)
