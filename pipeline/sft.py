"""Supervised fine-tuning on chat Q&A with TRL's ``SFTTrainer``: model, trainer options, training, artifact.

The stage (``stages/sft.py``) reads as a sequence of calls into this module and its two neighbours,
``pipeline.sft_data`` (tokenised examples with assistant-only labels) and ``pipeline.sft_eval`` (checker accuracy
on held-out prompts):

    model, tok = load_model_and_tokenizer(init_dir, trust_remote_code=False, external=False)
    train, stats = tokenize_examples(tok, records, max_length, too_long="drop")
    trainer = build_trainer(model, tok, train, val, cfg, stage_dir, seed, held_out, max_length)
    out = run_training(trainer, resume_point(stage_dir, state))

Design notes (departures from a plain ``SFTTrainer(model, dataset)``):

- **Labels are built before the trainer** (``pipeline.sft_data``); TRL still packs (``packing``), collates, and
  computes the loss.
- **Checkpoints** are the Trainer's own ``checkpoint-N`` folders, but the Trainer writes straight into
  them (weights, optimizer, scheduler, every rank's RNG file, ``trainer_state.json``) with no atomic
  rename. A checkpoint counts as complete only once ``pipeline.training.CheckpointMarker`` has written
  ``COMPLETE`` into it, after all ranks finished saving (a barrier in ``on_save``). A folder without it (a kill
  mid-write) is never resumed from, and is removed before training restarts (``pipeline.training.resume_point``).
- **SIGTERM/SIGINT** during training: the current step ends, a checkpoint is saved, and ``run_training`` raises
  ``pipeline.training.Interrupted`` (exit code 128+signal), like every stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from pipeline.config import ConfigError, SFTStageConfig
from pipeline.runs import StageDir
from pipeline.sft_eval import CheckerEvalCallback
from pipeline.tokenizer import ensure_chat_tokens
from pipeline.training import (
    CheckpointMarker,
    Interrupted,
    MetricsCallback,
    StopSignal,
    check_trained,
    clean_hf_artifact,
    context_length,
    trainer_device_args,
    without_tied_copies,
)

__all__ = [
    "load_model_and_tokenizer",
    "set_chat_generation_config",
    "resolve_max_length",
    "build_sft_config",
    "build_trainer",
    "run_training",
    "final_evaluation",
    "save_artifact",
    "RESERVED_TRAINER_ARGS",
    "METRIC_KEYS",
]

log = logging.getLogger(__name__)

METRIC_KEYS: dict[str, str] = {
    "loss": "train/loss",
    "eval_loss": "val/loss",
    "learning_rate": "train/lr",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "mean_token_accuracy": "train/token_accuracy",
    "eval_mean_token_accuracy": "val/token_accuracy",
}
"""The Trainer's log keys -> ``metrics.jsonl`` names (``pipeline.training.MetricsCallback``)."""

# SFTConfig fields that the typed SFTStageConfig fields (or this module) set: naming them in
# ``sft.trainer_args`` is an error that says which key to use instead.
RESERVED_TRAINER_ARGS: dict[str, str] = {
    "learning_rate": "sft.lr",
    "num_train_epochs": "sft.epochs",
    "max_steps": "sft.max_steps",
    "per_device_train_batch_size": "sft.batch_size",
    "gradient_accumulation_steps": "sft.grad_accum",
    "lr_scheduler_type": "sft.lr_scheduler",
    "warmup_steps": "sft.warmup_ratio",
    "weight_decay": "sft.weight_decay",
    "gradient_checkpointing": "sft.gradient_checkpointing",
    "activation_checkpointing": "sft.gradient_checkpointing",
    "report_to": "nothing: metrics.jsonl and tb/ are always written",
    "eval_steps": "sft.eval_steps",
    "eval_strategy": "sft.eval_steps",
    "save_steps": "sft.save_steps",
    "save_strategy": "sft.save_steps",
    "save_total_limit": "sft.save_total_limit",
    "logging_steps": "sft.logging_steps",
    "max_length": "sft.max_length",
    "truncation_mode": "sft.too_long",
    "packing": "sft.packing",
    "assistant_only_loss": "sft.assistant_only_loss",
    "completion_only_loss": "sft.assistant_only_loss",
    "seed": "run.seed",
    "output_dir": "the run folder (run.root/run.name)",
    "resume_from_checkpoint": "the run folder (a partial stage resumes by itself)",
    "trust_remote_code": "sft.trust_remote_code",
    "bf16": "sft.dtype",
    "fp16": "sft.dtype",
}


# ----------------------------------------------------------------------------- model


def load_model_and_tokenizer(
    path: str | Path, trust_remote_code: bool = False, external: bool = False
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer; make sure the tokenizer speaks the project's chat format.

    An external model (``external=True``: ``sft.init_from``) gets the project's special tokens, chat
    template and pad token through ``pipeline.tokenizer.ensure_chat_tokens``; when tokens were added
    the embeddings are resized. Generation stops at ``<|end|>`` or ``<|endoftext|>``.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code, dtype=torch.float32)
    if external or "{% generation %}" not in (tokenizer.chat_template or ""):
        added = ensure_chat_tokens(tokenizer)
        if added or len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
            log.info("sft: added %d chat tokens to %s, embeddings resized to %d", added, path, len(tokenizer))
    set_chat_generation_config(model, tokenizer)
    return model, tokenizer


def set_chat_generation_config(model: Any, tokenizer: Any) -> None:
    """generation_config: eos = [<|end|>, <|endoftext|>] (those present), pad = the tokenizer's pad."""
    vocab = tokenizer.get_vocab()
    eos = [vocab[t] for t in ("<|end|>", "<|endoftext|>") if t in vocab] or [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[-1]
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.generation_config.pad_token_id


def resolve_max_length(cfg: SFTStageConfig, model: Any) -> int:
    """``sft.max_length``, or the model's context length when it is 0.

    Raises:
        ConfigError: ``sft.max_length`` exceeds the model's context.
    """
    ctx = context_length(model)
    if cfg.max_length and ctx and cfg.max_length > ctx:
        raise ConfigError(f"sft.max_length={cfg.max_length} exceeds the model's context length {ctx}")
    if not cfg.max_length and not ctx:
        raise ConfigError("sft.max_length=0 but the model config names no context length; set sft.max_length")
    return int(cfg.max_length or ctx)


# ----------------------------------------------------------------------------- trainer


def _use_bf16(dtype: str) -> bool:
    if dtype == "bfloat16":
        return True
    return dtype == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def build_sft_config(cfg: SFTStageConfig, output_dir: str | Path, max_length: int, seed: int, has_eval: bool) -> Any:
    """The TRL ``SFTConfig`` for this stage: typed fields first, then ``sft.trainer_args``.

    Raises:
        ConfigError: a ``sft.trainer_args`` key that SFTConfig does not have (with the closest name), or
            one that a typed ``sft.*`` key owns.
    """
    from trl import SFTConfig

    valid = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    for key in cfg.trainer_args:
        if key in RESERVED_TRAINER_ARGS:
            raise ConfigError(f"sft.trainer_args.{key}: set {RESERVED_TRAINER_ARGS[key]} instead")
        if key not in valid:
            hint = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            raise ConfigError(
                f"unknown config key 'sft.trainer_args.{key}' (not an SFTConfig/TrainingArguments option)"
                + (f"; did you mean 'sft.trainer_args.{hint[0]}'?" if hint else "")
            )
    periodic_eval = has_eval and cfg.eval_steps > 0
    args: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=cfg.eval_steps if periodic_eval else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit or None,
        max_length=max_length,
        packing=cfg.packing,
        # Labels come pre-built from the template's generation markers (tokenize_examples); TRL's own
        # masking options would need the raw messages.
        assistant_only_loss=False,
        completion_only_loss=False,
        seed=seed,
        data_seed=seed,
        bf16=_use_bf16(cfg.dtype),
        report_to=[],  # TensorBoard is added by build_trainer, pointed at <stage>/tb
        save_safetensors=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
        trust_remote_code=cfg.trust_remote_code,
    )
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (old name deprecated)
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in valid else "gradient_checkpointing"
    args[ckpt_key] = cfg.gradient_checkpointing
    args = {k: v for k, v in args.items() if k in valid}  # tolerate fields a TRL/transformers version lacks
    args.update(trainer_device_args())
    args.update(cfg.trainer_args)
    return SFTConfig(**args)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def build_trainer(
    model: Any,
    tokenizer: Any,
    train: list[dict[str, list[int]]],
    val: list[dict[str, list[int]]],
    cfg: SFTStageConfig,
    stage_dir: StageDir,
    seed: int,
    held_out: list[dict[str, Any]],
    max_length: int,
) -> Any:
    """An ``SFTTrainer`` on pre-tokenised examples, checkpointing into ``stage_dir.checkpoints``,
    logging to ``stage_dir`` (metrics.jsonl, tb/), checking answers on ``held_out`` at each evaluation."""
    from datasets import Dataset
    from trl import SFTTrainer

    args = build_sft_config(cfg, stage_dir.checkpoints, max_length, seed, has_eval=bool(val))
    checker = CheckerEvalCallback(tokenizer, held_out, cfg, stage_dir.append_metrics)
    stopper = StopSignal()
    metrics = MetricsCallback(stage_dir.append_metrics, METRIC_KEYS, "sft")
    callbacks: list[TrainerCallback] = [metrics, CheckpointMarker(), checker, stopper]
    if _has_tensorboard():
        from transformers.integrations import TensorBoardCallback

        tb = TensorBoardCallback()  # writes on the main process only, lazily
        tb.logging_dir = str(stage_dir.tb)
        callbacks.append(tb)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(val) if val else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    checker.trainer = trainer
    trainer.stage_dir = stage_dir
    trainer.checker = checker
    trainer.stopper = stopper
    return trainer


def run_training(trainer: Any, resume: Path | None) -> Any:
    """``trainer.train()``, from checkpoint ``resume`` when given, with SIGTERM/SIGINT handled (and the previous
    handlers restored however training ends).

    Returns:
        The Trainer's ``TrainOutput``.

    Raises:
        Interrupted: a stop signal ended training early; a checkpoint was saved at the step reached.
        StageError: no optimizer step ran, or the weights are not finite (:func:`~pipeline.training.check_trained`:
            checked here, before the final evaluation spends time on a diverged model and before the artifact).
    """
    with trainer.stopper as stop:
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.signum:
        raise Interrupted("sft", trainer.state.global_step, stop.signum, trainer.args.output_dir)
    check_trained("sft", trainer.model, trainer.state.global_step, trainer.args.output_dir)
    return out


# ----------------------------------------------------------------------------- artifact


def save_artifact(trainer: Any, tokenizer: Any, artifact_dir: str | Path) -> None:
    """Save the fine-tuned model (safetensors; gathered under ZeRO-3), tokenizer and generation config.

    Call on every rank: ``Trainer.save_model`` gathers sharded weights collectively and writes on rank 0.
    """
    artifact_dir = Path(artifact_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    set_chat_generation_config(model, tokenizer)
    if trainer.is_deepspeed_enabled:  # gathered as separate tensors: the tied head would be written twice
        state = trainer.accelerator.get_state_dict(trainer.deepspeed)  # every rank takes part
        if trainer.args.should_save:
            model.save_pretrained(str(artifact_dir), state_dict=without_tied_copies(model, state))
    else:
        trainer.save_model(str(artifact_dir))
    if trainer.args.should_save:
        clean_hf_artifact(artifact_dir)
        tokenizer.save_pretrained(str(artifact_dir), save_jinja_files=False)
        model.generation_config.save_pretrained(str(artifact_dir))


def final_evaluation(trainer: Any, has_eval: bool) -> dict[str, Any]:
    """Val loss (and checker accuracy, via :class:`CheckerEvalCallback`) of the trained model, without
    repeating an evaluation the Trainer already ran at the last step (eval_steps dividing max_steps)."""
    if not has_eval:
        return {}
    step = trainer.state.global_step
    done = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step]
    if done and trainer.checker.last is not None:
        return done[-1]
    return trainer.evaluate()
