"""Supervised fine-tuning on chat Q&A with TRL's ``SFTTrainer``: data prep, trainer, resume, evaluation.

The stage (``stages/sft.py``) reads as a sequence of calls into this module:

    model, tok = load_model_and_tokenizer(init_dir, trust_remote_code=False, external=False)
    train, stats = tokenize_examples(tok, records, max_length, too_long="drop")
    trainer = build_trainer(model, tok, train, val, cfg, stage_dir, seed, held_out, max_length)
    trainer.train(resume_from_checkpoint=latest_complete_checkpoint(stage_dir.checkpoints))

Design notes (departures from a plain ``SFTTrainer(model, dataset)``):

- **Labels are built here, once,** from the chat template's ``{% generation %}`` markers
  (``apply_chat_template(..., return_assistant_tokens_mask=True)``, the same call TRL makes for
  ``assistant_only_loss``), and the trainer gets an already tokenized ``input_ids``/``labels`` dataset.
  Doing it here lets the truncate/drop counts be exact and the mask be tested directly; TRL still
  packs (``packing``), collates, and computes the loss. Every non-assistant token has label -100;
  every assistant token, including its closing ``<|end|>``, keeps its id.
- **Too-long examples** are cut to ``max_length`` (keeping the start) or dropped, as the config says,
  and counted; a truncated example left with no assistant token is dropped and counted too.
- **Checkpoints** are the Trainer's own ``checkpoint-N`` folders, but the Trainer writes straight into
  them (weights, optimizer, scheduler, every rank's RNG file, ``trainer_state.json``) with no atomic
  rename. A checkpoint counts as complete only once :class:`CheckpointMarker` has written ``COMPLETE``
  into it, after all ranks finished saving (a barrier in ``on_save``). A folder without it (a kill
  mid-write) is never resumed from, and is removed before training restarts.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from pipeline.config import ConfigError, SFTStageConfig
from pipeline.data.chat import last_user_prompt
from pipeline.evaluate import checker_accuracy, generate_responses, has_checker
from pipeline.hf_trainer import (
    CheckpointMarker,
    cpu_without_deepspeed,
    deepspeed_on_cpu_state,
)
from pipeline.runs import StageDir, StageError

__all__ = [
    "LengthStats",
    "AnswerEval",
    "tokenize_chat",
    "tokenize_examples",
    "load_model_and_tokenizer",
    "resolve_max_length",
    "build_sft_config",
    "build_trainer",
    "run_training",
    "evaluate_answers",
    "final_evaluation",
    "held_out_records",
    "save_artifact",
    "RESERVED_TRAINER_ARGS",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

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


# ----------------------------------------------------------------------------- data


@dataclass
class LengthStats:
    """What tokenisation did to the examples of one split."""

    n_in: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    """Longer than max_length and cut to it (too_long=truncate)."""
    n_dropped_too_long: int = 0
    """Longer than max_length and dropped (too_long=drop)."""
    n_dropped_no_target: int = 0
    """Left with no assistant token after truncation (nothing to learn), dropped."""
    n_target_tokens: int = 0
    """Tokens that count in the loss, over the kept examples."""


def tokenize_chat(
    tokenizer: Any, messages: list[dict[str, str]], assistant_only: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids and loss labels of one conversation.

    With ``assistant_only`` the labels keep the ids of the tokens the chat template renders inside
    ``{% generation %}...{% endgeneration %}`` (the assistant's content and its ``<|end|>``) and are -100
    elsewhere; otherwise every token is a target.

    >>> # ids    <|user|> hi <|end|> <|assistant|> yo <|end|>
    >>> # labels   -100 -100  -100      -100       yo <|end|>

    Raises:
        ValueError: ``assistant_only`` and the template marks no assistant token (no generation markers).
    """
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
    )
    ids = list(out["input_ids"])
    if not assistant_only:
        return ids, list(ids)
    mask = out["assistant_masks"]
    if not any(mask):
        raise ValueError(
            "the chat template marks no assistant tokens: it needs {% generation %}...{% endgeneration %} around "
            "assistant turns (see pipeline.tokenizer.CHAT_TEMPLATE), or set sft.assistant_only_loss=false"
        )
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def tokenize_examples(
    tokenizer: Any,
    records: list[dict[str, Any]],
    max_length: int,
    too_long: str = "drop",
    assistant_only: bool = True,
) -> tuple[list[dict[str, list[int]]], LengthStats]:
    """Tokenise normalised records into ``{"input_ids", "labels"}`` examples of at most ``max_length`` tokens.

    Args:
        tokenizer: tokenizer with the chat template.
        records: records with ``messages`` (see ``pipeline.data.chat``).
        max_length: context length in tokens.
        too_long: ``truncate`` (keep the first ``max_length`` tokens) or ``drop``.
        assistant_only: loss on assistant tokens only.

    Returns:
        The examples and the counts of what was truncated or dropped.
    """
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")
    stats = LengthStats(n_in=len(records))
    examples = []
    for rec in records:
        ids, labels = tokenize_chat(tokenizer, rec["messages"], assistant_only)
        if len(ids) > max_length:
            if too_long == "drop":
                stats.n_dropped_too_long += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            stats.n_truncated += 1
            if all(t == IGNORE_INDEX for t in labels):
                stats.n_dropped_no_target += 1
                continue
        stats.n_target_tokens += sum(t != IGNORE_INDEX for t in labels)
        examples.append({"input_ids": ids, "labels": labels})
    stats.n_kept = len(examples)
    if stats.n_dropped_too_long or stats.n_truncated:
        log.info(
            "sft: %d of %d examples longer than %d tokens (%d truncated, %d dropped, %d left without a target)",
            stats.n_dropped_too_long + stats.n_truncated,
            stats.n_in,
            max_length,
            stats.n_truncated,
            stats.n_dropped_too_long,
            stats.n_dropped_no_target,
        )
    return examples, stats


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
        from pipeline.tokenizer import ensure_chat_tokens

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
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
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
        use_cpu=cpu_without_deepspeed(),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
        trust_remote_code=cfg.trust_remote_code,
    )
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (old name deprecated)
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in valid else "gradient_checkpointing"
    args[ckpt_key] = cfg.gradient_checkpointing
    args = {k: v for k, v in args.items() if k in valid}  # tolerate fields a TRL/transformers version lacks
    args.update(deepspeed_on_cpu_state())
    args.update(cfg.trainer_args)
    return SFTConfig(**args)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsCallback(TrainerCallback):
    """Trainer logs -> ``metrics.jsonl`` (``train/loss``, ``val/loss``, ``train/lr``...) on the main
    process; a non-finite training loss stops the stage with an error naming the step."""

    _KEYS = {
        "loss": "train/loss",
        "eval_loss": "val/loss",
        "learning_rate": "train/lr",
        "grad_norm": "train/grad_norm",
        "epoch": "train/epoch",
        "mean_token_accuracy": "train/token_accuracy",
        "eval_mean_token_accuracy": "val/token_accuracy",
    }

    def __init__(self, stage_dir: StageDir) -> None:
        self.stage_dir = stage_dir

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        logs = logs or {}
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise StageError(
                f"sft: training loss is {loss} at step {state.global_step} (checked every sft.logging_steps); "
                f"stopping. The last good checkpoint stays in {self.stage_dir.checkpoints}"
            )
        record = {self._KEYS[k]: v for k, v in logs.items() if k in self._KEYS}
        if set(record) - {"train/epoch"} and state.is_world_process_zero:
            self.stage_dir.append_metrics({"step": state.global_step, **record})


class GracefulStop(TrainerCallback):
    """SIGTERM/SIGINT during training: finish the current step, save a checkpoint, stop.

    The caller checks :attr:`signum` after ``train()`` returns and exits without finishing the stage
    (no artifact, no manifest), so the next run resumes from that checkpoint. Handlers are installed
    for the duration of training only (and only in the main thread, where Python allows it).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("sft: got signal %d; saving a checkpoint at the end of this step, then stopping", signum)
        self.signum = signum

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back (also after an exception, when on_train_end never runs)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class CheckerEvalCallback(TrainerCallback):
    """After each evaluation, answer the held-out prompts and add ``checker_accuracy`` to the logs."""

    def __init__(self, tokenizer: Any, records: list[dict[str, Any]], cfg: SFTStageConfig) -> None:
        self.tokenizer, self.records, self.cfg = tokenizer, records, cfg
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
                self.trainer.stage_dir.append_metrics(
                    {"step": state.global_step, "sft/checker_accuracy": self.last.accuracy}
                )


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
    checker = CheckerEvalCallback(tokenizer, held_out, cfg)
    stopper = GracefulStop()
    callbacks: list[TrainerCallback] = [MetricsCallback(stage_dir), CheckpointMarker(), checker, stopper]
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
    """``trainer.train()``, from checkpoint ``resume`` when given; signal handlers restored however it ends.

    Returns:
        The Trainer's ``TrainOutput``. Check ``trainer.stopper.signum``: set when SIGTERM/SIGINT stopped
        training early (a checkpoint was saved).
    """
    try:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        trainer.stopper.restore()


# ----------------------------------------------------------------------------- checkpoints


# ----------------------------------------------------------------------------- evaluation


@dataclass
class AnswerEval:
    accuracy: float | None
    """Checker accuracy over the held-out records that have a checker (None when none has)."""
    n: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    """A few {prompt, response, expected, correct} for the manifest and the report."""


def evaluate_answers(model: Any, tokenizer: Any, records: list[dict[str, Any]], cfg: SFTStageConfig) -> AnswerEval:
    """Greedy answers to the held-out prompts, judged by the tasks' checker; plus a few samples."""
    if not records:
        return AnswerEval(None, 0, [])
    from pipeline.data.tasks import check_answer

    kwargs: dict[str, Any] = {}
    if _zero3():
        kwargs["synced_gpus"] = True  # every rank must take part in each forward of a sharded model
    prompts = [last_user_prompt(r) for r in records]
    responses = generate_responses(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size, **kwargs)
    accuracy = checker_accuracy(records, responses)
    samples = []
    for rec, prompt, resp in list(zip(records, prompts, responses))[: cfg.n_samples]:
        expected = rec.get("answer") if has_checker(rec) else rec["messages"][-1]["content"]
        correct = bool(check_answer(rec, resp)) if has_checker(rec) else None
        samples.append({"prompt": prompt, "response": resp, "expected": expected, "correct": correct})
    return AnswerEval(accuracy, len(records), samples)


def _zero3() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def held_out_records(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first ``n`` held-out records, those with a checker first (so accuracy uses as many as possible)."""
    ranked = [r for r in records if has_checker(r)] + [r for r in records if not has_checker(r)]
    return ranked[:n]


# ----------------------------------------------------------------------------- artifact


def save_artifact(trainer: Any, tokenizer: Any, artifact_dir: str | Path) -> None:
    """Save the fine-tuned model (safetensors; gathered under ZeRO-3), tokenizer and generation config.

    Call on every rank: ``Trainer.save_model`` gathers sharded weights collectively and writes on rank 0.
    """
    artifact_dir = Path(artifact_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    set_chat_generation_config(model, tokenizer)
    trainer.save_model(str(artifact_dir))
    if trainer.args.should_save:
        # The Trainer also drops its pickled TrainingArguments and a separate chat_template.jinja here; keep
        # the artifact like the tokenizer stage's (template inside tokenizer_config.json) and pickle-free.
        for name in ("training_args.bin", "chat_template.jinja"):
            (artifact_dir / name).unlink(missing_ok=True)
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
