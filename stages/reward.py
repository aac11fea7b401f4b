"""Reward-model stage: a reward model initialised from the SFT model, trained on ranked responses.

    accelerate launch --config_file configs/accelerate/cpu.yaml -m stages.reward --config configs/tiny.yaml

Reads ``runs/<run>/sft/artifact`` (or ``reward.init_from``) and the ranked responses of ``reward.dataset``.
``reward.objective=bradley_terry`` trains a scalar head (pairs with TRL's ``RewardTrainer``, K-wise rankings with
InstructGPT's grouped loss, ``reward.kwise``); ``reward.objective=dpo`` trains the init model itself with the DPO
loss, and its reward is DPO's implicit reward (``pipeline/reward/``). ``reward.on_policy_samples`` adds pairs on the
init model's own samples ranked by the task checker (``on_policy_pairs.jsonl`` in the stage folder).

Writes ``runs/<run>/reward/artifact/``: the reward model (a classifier, num_labels=1; or the DPO-trained causal LM,
its frozen reference in ``reference/`` and ``implicit_reward.json``) + tokenizer, ``reward_stats.json`` (reward
mean/std on SFT-policy samples of training prompts, for PPO) and ``eval_rewards.json`` (held-out rewards of each
prompt's best and worst response). The manifest also holds ``pair_accuracy_by_kind``, ``best_of_k`` (its ``all`` row
gives ``greedy_accuracy``, ``best_of_8_accuracy`` and ``right_wrong_auc`` in ``metrics``) and the ``gate`` before
PPO (``pipeline/analysis/``). Resumes from the newest complete Trainer checkpoint; done: skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from transformers import set_seed
from transformers.integrations import TensorBoardCallback

from pipeline.analysis.controls import reward_check
from pipeline.analysis.diagnostics import reward_diagnostics
from pipeline.data.preferences import PreferenceData, load_preferences
from pipeline.data.records import BadRecord
from pipeline.model_source import check_model_sources
from pipeline.reward import build, load_scorer
from pipeline.reward.build import RewardRun, init_lm
from pipeline.reward.evaluation import evaluate_rankings, normalisation_stats, stage_metrics
from pipeline.reward.on_policy import ON_POLICY_FILE, draw_on_policy_pairs, on_policy_groups
from pipeline.runs import StageError, atomic_write_json
from pipeline.stage import StageContext, StageResult, run_stage
from pipeline.training import CheckpointMarker, Interrupted, MetricsCallback, StopSignal, is_main_process, resume_point

log = logging.getLogger("stages.reward")

METRIC_KEYS = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
               "accuracy": "train/accuracy", "margin": "train/margin", "chosen_nll": "train/chosen_nll",
               "eval_loss": "val/loss", "eval_accuracy": "rm/accuracy", "eval_margin": "val/margin"}  # fmt: skip


def _init_dir(ctx: StageContext) -> str:
    return ctx.cfg.reward.init_from or str(ctx.upstream("sft").artifact)


def _load_data(ctx: StageContext) -> tuple[PreferenceData, int]:
    """The preference groups, with the on-policy pairs (``reward.on_policy_samples``) added to the training set, and
    the number of those pairs."""
    rc, seed = ctx.cfg.reward, ctx.cfg.run.seed
    try:
        data = load_preferences(rc.dataset, ctx.cfg.data.tasks, seed)
    except (BadRecord, FileNotFoundError) as e:
        raise StageError(f"reward.dataset: {e}") from None
    if not data.held_out:
        raise StageError("reward: no held-out preference records; set reward.dataset.eval_source or "
                         "reward.dataset.eval_fraction > 0")  # fmt: skip
    if not rc.on_policy_samples:
        return data, 0

    def sample() -> list[Any]:
        tok = build.init_tokenizer(_init_dir(ctx), rc.trust_remote_code)
        policy = init_lm(_init_dir(ctx), tok, rc.trust_remote_code).to(build.process_device()).eval()
        return on_policy_groups(policy, tok, data.train, rc.on_policy_samples, rc.on_policy_pairs,
                                rc.norm_max_new_tokens, max(rc.batch_size, 64), seed)  # fmt: skip

    extra = draw_on_policy_pairs(ctx.dir.root / ON_POLICY_FILE, is_main_process(), sample)
    return dataclasses.replace(data, train=data.train + extra), len(extra)


def _callbacks(ctx: StageContext, stop: StopSignal) -> list[Any]:
    callbacks: list[Any] = [MetricsCallback(ctx.dir.append_metrics, METRIC_KEYS, "reward"), CheckpointMarker(), stop]
    if is_main_process():
        callbacks.append(TensorBoardCallback(SummaryWriter(str(ctx.dir.tb))))
    return callbacks


def _train(ctx: StageContext, data: PreferenceData) -> tuple[RewardRun, float]:
    """Train (or resume) on every process and save the artifact; returns the run and the last training loss."""
    rc = ctx.cfg.reward
    set_seed(ctx.cfg.run.seed)  # a new score head is drawn from torch's RNG
    stop = StopSignal()
    run = build.build_run(_init_dir(ctx), rc, data.train, data.held_out, ctx.dir.checkpoints, ctx.cfg.run.seed,
                          _callbacks(ctx, stop))  # fmt: skip
    with stop:
        output = run.trainer.train(resume_from_checkpoint=resume_point(ctx.dir, ctx.state))
    if stop.signum:
        raise Interrupted("reward", run.trainer.state.global_step, stop.signum, ctx.dir.checkpoints)
    build.save_artifact(run, ctx.dir.artifact, rc, is_main_process())
    losses = [m["train/loss"] for m in ctx.dir.read_metrics() if "train/loss" in m]
    return run, losses[-1] if losses else output.training_loss


def _evaluate(
    ctx: StageContext, run: RewardRun, data: PreferenceData, n_on_policy: int, train_loss: float
) -> StageResult:
    """Held-out ranking metrics, normalisation statistics and diagnostics of the artifact, loaded as a user would."""
    rc, seed = ctx.cfg.reward, ctx.cfg.run.seed
    scorer = load_scorer(ctx.dir.artifact, rc.trust_remote_code)
    scorer.place(run.trainer.args.device)
    ev = evaluate_rankings(scorer, run.held_out, rc.batch_size, rc.margin)
    tok = scorer.tokenizer
    policy = functools.cache(
        lambda: init_lm(_init_dir(ctx), tok, rc.trust_remote_code).to(run.trainer.args.device).eval()
    )
    stats = normalisation_stats(policy, scorer, tok, run.train, rc.norm_samples, rc.norm_max_new_tokens,
                                rc.batch_size, seed)  # fmt: skip
    diagnostics = reward_diagnostics(scorer, policy, tok, run.held_out, ev.group_rewards, rc.best_of_k,
                                     rc.best_of_k_prompts, rc.norm_max_new_tokens, rc.batch_size, seed)  # fmt: skip
    atomic_write_json(ctx.dir.artifact / "reward_stats.json", stats)
    rewards = {"chosen": [round(x, 5) for x in ev.chosen], "rejected": [round(x, 5) for x in ev.rejected]}
    atomic_write_json(ctx.dir.artifact / "eval_rewards.json", rewards)
    metrics, final = stage_metrics(ev, stats, train_loss, run.trainer.state.global_step)
    bar = ctx.cfg.report  # the gate before PPO (the reward model's best of k vs greedy): pipeline/analysis/controls.py
    check, gate = reward_check(diagnostics["best_of_k"], bar.gate_min_best_of_k_gain, bar.gate_min_right_wrong_auc)
    metrics.update(check)
    ctx.dir.append_metrics(final)
    log.info("reward: held-out pair accuracy %.3f (%d pairs), reward mean/std %.3f/%.3f",
             ev.pair_accuracy, ev.n_pairs, stats["mean"], stats["std"])  # fmt: skip
    counts = {"train_groups": len(run.train), "train_rows": run.n_rows, "on_policy_pairs": n_on_policy,
              "dropped_too_long": run.dropped, "skipped_bad_records": data.skipped_by_split,
              "skipped_examples": data.skipped_examples, "eval_groups": ev.n_groups, "eval_pairs": ev.n_pairs}  # fmt: skip
    extra = {"init_from": _init_dir(ctx), "loss": build.loss_description(rc, run.grouped), "data": counts,
             "reward_stats": stats, "eval_rewards": rewards, **diagnostics, "gate": gate}  # fmt: skip
    return StageResult(metrics=metrics, extra=extra)


def _body(ctx: StageContext) -> StageResult:
    check_model_sources(ctx.cfg, "reward")  # a missing or broken reward.init_from, named, before any work
    data, n_on_policy = _load_data(ctx)
    run, train_loss = _train(ctx, data)
    if not is_main_process():
        return StageResult(metrics={})
    return _evaluate(ctx, run, data, n_on_policy, train_loss)


def main(argv: list[str] | None = None) -> int:
    return run_stage("reward", argv, _body)


if __name__ == "__main__":
    raise SystemExit(main())
