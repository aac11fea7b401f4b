"""Supervised fine-tuning of the pretrained model on chat Q&A (TRL SFTTrainer, assistant-only loss).

    accelerate launch --config_file configs/accelerate/cpu.yaml -m stages.sft --config configs/tiny.yaml
    make sft [LAUNCH=ddp|zero2|zero3] [ARGS="sft.lr=1e-4 sft.max_steps=200"]

Reads runs/<run>/pretrain/artifact (or the model ``sft.init_from`` names), writes runs/<run>/sft/artifact
(a causal LM + tokenizer with the chat template + generation_config stopping at <|end|>). Checkpoints are
the Trainer's runs/<run>/sft/checkpoints/checkpoint-N; a killed run started again resumes from the newest
complete one, a finished one does nothing.
"""

from __future__ import annotations

import logging

from transformers import set_seed

from pipeline.analysis.checker import has_checker
from pipeline.data.conversations import load_sft_data
from pipeline.model_source import check_model_sources
from pipeline.runs import StageError
from pipeline.sft import build_trainer as _build_trainer
from pipeline.sft import (
    final_evaluation,
    load_model_and_tokenizer,
    resolve_max_length,
    run_training,
    save_artifact,
)
from pipeline.sft_data import tokenize_examples
from pipeline.sft_eval import evaluate_answers, held_out_records
from pipeline.stage import StageContext, StageResult, run_stage
from pipeline.training import resume_point

log = logging.getLogger("stages.sft")


def _body(ctx: StageContext) -> StageResult:
    cfg, seed = ctx.cfg.sft, ctx.cfg.run.seed
    check_model_sources(ctx.cfg, "sft")  # a missing or broken sft.init_from, named, before any work
    set_seed(seed)
    source = cfg.init_from or ctx.upstream("pretrain").artifact
    model, tok = load_model_and_tokenizer(source, cfg.trust_remote_code, external=bool(cfg.init_from))
    max_length = resolve_max_length(cfg, model)

    try:
        data = load_sft_data(cfg.dataset, ctx.cfg.data.tasks, seed)
    except (ValueError, FileNotFoundError) as e:  # BadRecord is a ValueError naming file, line and field
        raise StageError(f"sft.dataset: {e}") from None
    train, train_stats = tokenize_examples(tok, data.train, max_length, cfg.too_long, cfg.assistant_only_loss)
    val, val_stats = tokenize_examples(tok, data.held_out, max_length, cfg.too_long, cfg.assistant_only_loss)
    if not train:
        raise StageError(f"sft: no training example fits sft.max_length={max_length} (too_long={cfg.too_long})")
    held = held_out_records(data.held_out, cfg.n_eval_prompts)
    before = evaluate_answers(model, tok, held, cfg)
    log.info("sft: input model checker accuracy on %d held-out prompts: %s", len(held), before.accuracy)

    resume = resume_point(ctx.dir, ctx.state)
    trainer = _build_trainer(model, tok, train, val, cfg, ctx.dir, seed, held, max_length)
    out = run_training(trainer, resume)  # a stop signal raises Interrupted after a checkpoint
    final = final_evaluation(trainer, bool(val))
    after = (
        trainer.checker.last if trainer.checker.last is not None else evaluate_answers(trainer.model, tok, held, cfg)
    )
    save_artifact(trainer, tok, ctx.dir.artifact)

    metrics = {
        "train_loss": _final_train_loss(trainer, out.training_loss),
        "val_loss": final.get("eval_loss"),
        "checker_accuracy": after.accuracy,
        "checker_accuracy_ci95": after.ci95,
        "pretrain_checker_accuracy": before.accuracy,
        "pretrain_checker_accuracy_ci95": before.ci95,
        "steps": trainer.state.global_step,
        "n_train": train_stats.n_kept,
        "n_eval": val_stats.n_kept,
        "n_checker_prompts": sum(has_checker(r) for r in held),
        "n_truncated": train_stats.n_truncated + val_stats.n_truncated,
        "n_dropped": sum(s.n_dropped_too_long + s.n_dropped_no_target for s in (train_stats, val_stats)),
        "n_skipped_records": data.skipped,
    }
    extra = {
        "samples": after.samples,
        "pretrain_samples": before.samples,
        "data": {
            "source": data.source,
            "skipped_bad_records": data.skipped,
            "train": vars(train_stats),
            "eval": vars(val_stats),
            "max_length": max_length,
        },
        "resumed_from": str(resume) if resume else None,
        "input_model": str(source),
    }
    log.info("sft: checker accuracy %s -> %s, val loss %s", before.accuracy, after.accuracy, metrics["val_loss"])
    return StageResult(metrics=metrics, extra=extra)


def _final_train_loss(trainer, fallback: float) -> float:
    """The last logged training loss (the Trainer's own figure averages over the whole run)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return float(losses[-1]) if losses else float(fallback)


def main(argv: list[str] | None = None) -> int:
    return run_stage("sft", argv, _body)


if __name__ == "__main__":
    raise SystemExit(main())
