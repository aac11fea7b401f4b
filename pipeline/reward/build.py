"""Setting up the reward stage's training: its ``TrainingArguments``, the init model, the rows and the trainer.

``reward.objective`` picks the kind (a config choice, read here once):

- ``bradley_terry``: a new scalar head on the init (SFT) model, trained on pairs with TRL's ``RewardTrainer`` or on
  K-wise rankings with :class:`~pipeline.reward.trainers.GroupedRewardTrainer` (``reward.kwise``);
- ``dpo``: the init model itself, trained with the DPO loss against a frozen copy of it (the reference, whose
  log-probs are computed once here).

:func:`build_run` returns a :class:`RewardRun`; :func:`save_artifact` completes the artifact after training.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import RewardConfig

from pipeline.config import RewardStageConfig
from pipeline.data.preferences import PreferenceGroup
from pipeline.lm import context_length, disable_dropout
from pipeline.runs import StageError
from pipeline.tokenizer import ensure_chat_tokens
from pipeline.training import check_trained, clean_hf_artifact, trainer_device_args

from .data import DPOCollator, add_reference_logprobs, dpo_rows, encode_groups, grouped_rows, pairwise_rows
from .implicit import save_implicit_reward
from .scalar import load_reward_model
from .trainers import DPORewardTrainer, build_reward_trainer

__all__ = ["RewardRun", "training_args", "init_tokenizer", "init_lm", "process_device", "build_run", "save_artifact",
           "loss_description"]  # fmt: skip


@dataclass
class RewardRun:
    """What training needs, and what the evaluation after it needs to know about the data."""

    trainer: Trainer
    tokenizer: Any
    grouped: bool
    """K-wise groups trained with the grouped loss (scalar head only)."""
    n_rows: int
    dropped: dict[str, int]
    """Groups left out for being longer than the context, per split."""
    train: list[PreferenceGroup]
    held_out: list[PreferenceGroup]
    reference: Any = None
    """The frozen DPO reference (``objective=dpo``), saved into the artifact."""


def training_args(rc: RewardStageConfig, output_dir: Path, seed: int) -> RewardConfig:
    """The ``reward`` section as TRL's ``RewardConfig`` (used by every objective)."""
    return RewardConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=rc.batch_size,
        per_device_eval_batch_size=rc.batch_size,
        gradient_accumulation_steps=rc.grad_accum,
        learning_rate=rc.lr,
        lr_scheduler_type=rc.lr_scheduler,
        warmup_steps=rc.warmup_ratio,  # a float below 1 is a share of the total steps
        weight_decay=rc.weight_decay,
        num_train_epochs=rc.epochs,
        max_steps=rc.max_steps,
        activation_checkpointing=rc.gradient_checkpointing,
        eval_strategy="steps" if rc.eval_steps else "no",
        eval_steps=rc.eval_steps or None,
        save_strategy="steps",
        save_steps=rc.save_steps,
        save_total_limit=rc.save_total_limit,
        logging_steps=rc.logging_steps,
        seed=seed,
        data_seed=seed,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        max_length=None,  # encode_groups / dpo_rows drop too-long groups themselves
        prediction_loss_only=True,
        report_to="none",  # metrics.jsonl and tb/ come from the stage's callbacks
        dataloader_pin_memory=torch.cuda.is_available(),
        trust_remote_code=rc.trust_remote_code,
        **trainer_device_args(),
    )


def init_tokenizer(init_dir: str, trust_remote_code: bool = False) -> Any:
    """The init model's tokenizer with the project's chat tokens and template (a no-op for its own tokenizer)."""
    tok = AutoTokenizer.from_pretrained(init_dir, trust_remote_code=trust_remote_code)
    ensure_chat_tokens(tok)
    return tok


def init_lm(init_dir: str, tok: Any, trust_remote_code: bool = False) -> Any:
    """The init (SFT) model as a causal LM, its embeddings grown to ``tok`` when tokens were added."""
    lm = AutoModelForCausalLM.from_pretrained(init_dir, trust_remote_code=trust_remote_code)
    if lm.get_input_embeddings().num_embeddings < len(tok):
        lm.resize_token_embeddings(len(tok))
    return lm


def process_device() -> torch.device:
    """This process's GPU when there is one (for the passes made outside the Trainer), else the CPU."""
    return (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _too_long(max_length: int | None) -> StageError:
    return StageError(f"reward: every training or held-out group is longer than max_length={max_length} tokens")


def _scalar_run(init_dir: str, rc: RewardStageConfig, train: list[PreferenceGroup], held: list[PreferenceGroup],
                args: Callable[[], RewardConfig], callbacks: list[TrainerCallback]) -> RewardRun:  # fmt: skip
    model, tokenizer = load_reward_model(init_dir, rc.trust_remote_code)
    max_length = rc.max_length or context_length(model)
    train_enc, dropped_train = encode_groups(tokenizer, train, max_length)
    eval_enc, dropped_eval = encode_groups(tokenizer, held, max_length)
    if not train_enc or not eval_enc:
        raise _too_long(max_length)
    grouped = rc.kwise == "grouped" and any(len(g.responses) > 2 for g, _ in train_enc)
    to_rows = grouped_rows if grouped else pairwise_rows
    train_rows = to_rows(train_enc, rc.margin)
    eval_rows = to_rows(eval_enc, rc.margin)
    trainer = build_reward_trainer(model, tokenizer, train_rows, eval_rows, args(), grouped, callbacks)
    return RewardRun(trainer, tokenizer, grouped, len(train_rows), {"train": dropped_train, "eval": dropped_eval},
                     [g for g, _ in train_enc], [g for g, _ in eval_enc])  # fmt: skip


def _dpo_run(init_dir: str, rc: RewardStageConfig, train: list[PreferenceGroup], held: list[PreferenceGroup],
             args: Callable[[], RewardConfig], callbacks: list[TrainerCallback]) -> RewardRun:  # fmt: skip
    tokenizer = init_tokenizer(init_dir, rc.trust_remote_code)
    model = init_lm(init_dir, tokenizer, rc.trust_remote_code)
    disable_dropout(model)  # the reference log-probs are dropout-free
    reference = copy.deepcopy(model).eval()  # the very weights (and any resized rows) training starts from
    max_length = rc.max_length or context_length(model)
    train_rows, kept_train = dpo_rows(tokenizer, train, max_length)
    eval_rows, kept_held = dpo_rows(tokenizer, held, max_length)
    if not kept_train or not kept_held:
        raise _too_long(max_length)
    batch = max(rc.batch_size, 32)
    add_reference_logprobs(reference.to(process_device()), train_rows + eval_rows, tokenizer.pad_token_id, batch)
    reference.to("cpu")
    dpo_args = args()
    trainer = DPORewardTrainer(
        model=model,
        args=dpo_args,
        data_collator=DPOCollator(tokenizer.pad_token_id),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows and dpo_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=callbacks,
        beta=rc.dpo_beta,
        nll_weight=rc.dpo_nll_weight,
    )
    dropped = {"train": len(train) - len(kept_train), "eval": len(held) - len(kept_held)}
    return RewardRun(trainer, tokenizer, False, len(train_rows), dropped, kept_train, kept_held, reference)


def build_run(init_dir: str, rc: RewardStageConfig, train: list[PreferenceGroup], held: list[PreferenceGroup],
              output_dir: Path, seed: int, callbacks: list[TrainerCallback]) -> RewardRun:  # fmt: skip
    """The model, rows and trainer of ``reward.objective`` (seed torch first: a new scalar head is drawn from it).

    The ``TrainingArguments`` are made only once the init model is loaded and, for DPO, the reference log-probs are
    computed: under ZeRO-3 they switch on DeepSpeed's partitioned loading, which the reference pass must not see.

    Raises:
        StageError: every training or held-out group is longer than the context.
    """
    build = _dpo_run if rc.objective == "dpo" else _scalar_run
    return build(init_dir, rc, train, held, lambda: training_args(rc, output_dir, seed), callbacks)


def save_artifact(run: RewardRun, artifact: Path, rc: RewardStageConfig, is_main: bool) -> None:
    """Save the trained model on every process (ZeRO-3 gathers the shards); the main process then removes the
    Trainer's extras, saves the tokenizer and, for ``objective=dpo``, the reference and ``implicit_reward.json``.

    Raises:
        StageError: no optimizer step ran, or the weights are not finite (nothing is saved).
    """
    check_trained("reward", run.trainer.model, run.trainer.state.global_step, run.trainer.args.output_dir)
    run.trainer.save_model(str(artifact))
    run.trainer.accelerator.wait_for_everyone()
    unset_hf_deepspeed_config()  # training is over: later loads are plain models, not ZeRO-3 partitions
    if not is_main:
        return
    clean_hf_artifact(artifact)
    run.tokenizer.save_pretrained(str(artifact), save_jinja_files=False)
    if run.reference is not None:
        save_implicit_reward(artifact, run.reference, rc.dpo_beta, run.tokenizer)


def loss_description(rc: RewardStageConfig, grouped: bool) -> str:
    """The loss as the manifest names it."""
    if rc.objective == "dpo":
        nll = f" + {rc.dpo_nll_weight:g} x chosen NLL (RPO)" if rc.dpo_nll_weight else ""
        return f"DPO, implicit reward (beta {rc.dpo_beta}){nll}"
    return "grouped (InstructGPT, each prompt weighted once)" if grouped else "pairwise Bradley-Terry (TRL)"
