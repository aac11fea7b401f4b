"""PPO: align the SFT policy against the reward model (our own PPO on accelerate / DeepSpeed).

    accelerate launch --config_file configs/accelerate/cpu.yaml -m stages.ppo --config configs/tiny.yaml
    make ppo [LAUNCH=ddp|zero2|zero3] [ARGS="ppo.steps=50 ppo.kl_coef=0.1"]

Reads runs/<run>/sft/artifact (or ``ppo.policy_from``) and runs/<run>/reward/artifact (or ``ppo.reward_from``),
writes runs/<run>/ppo/artifact (the aligned causal LM + tokenizer + generation_config), metrics.jsonl,
curves.png, eval_answers.jsonl (greedy SFT and PPO answers to the held-out prompts with their reward-model
scores; the manifest's ``rm_vs_checker`` compares those scores with the task checker, see
``pipeline/analysis/agreement.py``) and checkpoints/step_N (policy and value model, or the policy alone under ``ppo.advantage=group``; optimizer, scheduler, RNGs, KL controller, prompt cursor).
A killed run started again resumes from the newest complete checkpoint; a finished one does nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from pipeline.analysis.best_of_k import best_of_k_reading
from pipeline.analysis.controls import controls_verdict, gate_warning, reward_gate
from pipeline.analysis.diagnostics import ppo_diagnostics
from pipeline.config import PPOStageConfig, ReportConfig
from pipeline.data.prompts import load_prompts
from pipeline.data.tasks import write_jsonl
from pipeline.lm import context_length
from pipeline.model_source import check_model_sources
from pipeline.plots import plot_stage
from pipeline.reward import CheckerScorer, RewardScorer
from pipeline.rl.components import (
    PPOModels,
    load_models,
    load_reward_stats,
    render_prompts,
    save_policy,
)
from pipeline.rl.evaluation import evaluate_dpo_policy, evaluate_held_out
from pipeline.rl.trainer import PPOTrainer
from pipeline.runs import StageError
from pipeline.stage import StageContext, StageResult, run_stage
from pipeline.training import make_accelerator

log = logging.getLogger("stages.ppo")


def _reward_manifest(reward_from: str | Path) -> dict[str, Any]:
    """The reward stage's manifest beside ``reward_from``; {} for a reward model made elsewhere (e.g. the Hub)."""
    manifest = Path(reward_from).parent / "manifest.json"
    try:
        return json.loads(manifest.read_text()) if manifest.is_file() else {}
    except (OSError, ValueError):
        return {}


def _warn_if_gate_failed(reward_manifest: dict[str, Any], bar: ReportConfig) -> None:
    """Say up front when the reward stage's gate before PPO fails: its best-of-k check judged with this run's
    ``report.gate_*`` thresholds (``pipeline.analysis.controls.reward_gate``). PPO still runs."""
    bok = reward_manifest.get("best_of_k")
    gate = reward_gate(bok, bar.gate_min_best_of_k_gain, bar.gate_min_right_wrong_auc)
    if gate is not None and not gate["passed"]:
        log.warning("ppo: %s %s", gate_warning(gate), best_of_k_reading(bok["tasks"]["all"], bok["k"]))


def _dpo_control(
    cfg: PPOStageConfig, m: PPOModels, scorer: RewardScorer, held: list[dict[str, Any]], device: Any
) -> dict[str, Any]:
    """With a DPO (implicit) reward model: its DPO-trained LM answering PPO's held-out prompts greedily (a control;
    call on the main process only, after training) and, when PPO trains against it, ``kl_coef_over_dpo_beta``."""
    implicit: Any = m.scorer  # an ImplicitReward: .model (the DPO policy), .tokenizer, .beta
    if implicit.kind != "implicit":
        return {}
    if scorer is not implicit:  # ppo.reward=checker: the trainer never placed the reward model
        implicit.place(device)
    out = evaluate_dpo_policy(implicit, held, cfg.max_new_tokens, cfg.rollout_batch_size)
    log.info("ppo: the DPO policy's checker accuracy on the same held-out prompts: %s %s",
             out["dpo_policy_checker_accuracy"], out["dpo_policy_checker_accuracy_ci95"])  # fmt: skip
    if scorer is implicit:
        ratio = out["kl_coef_over_dpo_beta"] = cfg.kl_coef / implicit.beta
        log.info(
            "ppo: kl_coef / dpo_beta = %.3g. PPO maximises beta*log(pi_dpo/pi_ref) - kl_coef*log(pi/pi_ref), "
            "whose optimum is pi_ref * (pi_dpo/pi_ref)^(beta/kl_coef) (pi_ref the SFT model, DPO's reference too): "
            "at 1 it is the DPO policy itself and the return is -beta * KL(pi || pi_dpo), so with group advantages PPO is "
            "on-policy distillation toward the DPO policy; below 1 it sharpens past it, above 1 it stays between "
            "the SFT and DPO policies%s",
            ratio,
            " (ppo.adaptive_kl: the ratio is of the initial kl_coef)" if cfg.adaptive_kl else "",
        )
    return out


def _body(ctx: StageContext) -> StageResult:
    cfg, seed = ctx.cfg.ppo, ctx.cfg.run.seed
    check_model_sources(ctx.cfg, "ppo")  # a missing or broken ppo.policy_from/reward_from, named, before any work
    policy_from = cfg.policy_from or ctx.upstream("sft").artifact
    reward_from = cfg.reward_from or ctx.upstream("reward").artifact
    # loaded before the Accelerator exists, so ZeRO-3 does not partition them at load time: the frozen
    # reference and reward model stay whole, and prepare() shards only the trained policy (and value model)
    m = load_models(policy_from, reward_from, cfg.trust_remote_code, critic=cfg.advantage != "group")
    accelerator = make_accelerator()
    set_seed(seed, device_specific=True)  # each process samples its own responses
    ctx_len = context_length(m.policy)
    if ctx_len is not None and cfg.max_prompt_length + cfg.max_new_tokens > ctx_len:
        raise StageError(
            f"ppo.max_prompt_length + ppo.max_new_tokens = {cfg.max_prompt_length} + {cfg.max_new_tokens} "
            f"exceeds the policy's context of {ctx_len} tokens"
        )
    try:
        data = load_prompts(cfg.dataset, ctx.cfg.data.tasks, seed)
    except (ValueError, FileNotFoundError) as e:  # BadRecord names file, line/row and field
        raise StageError(f"ppo.dataset: {e}") from None
    train_ids = render_prompts(m.tokenizer, data.train, cfg.max_prompt_length)
    held = data.held_out[: cfg.n_eval_prompts]
    held_ids = render_prompts(m.tokenizer, held, cfg.max_prompt_length)

    reward_manifest = _reward_manifest(reward_from)
    if cfg.reward == "model" and accelerator.is_main_process:
        _warn_if_gate_failed(reward_manifest, ctx.cfg.report)
    scorer: RewardScorer = m.scorer
    if cfg.reward == "checker":  # the oracle ablation: PPO against the task checker instead of the reward model
        scorer = CheckerScorer(m.tokenizer, train_ids + held_ids, data.train + held)
    if not scorer.normalised and cfg.reward_norm != "none" and accelerator.is_main_process:
        # the reward stage's statistics describe a scalar head; an implicit reward's scale is reward.dpo_beta
        log.info("ppo.reward_norm=%s normalises a scalar reward model only: the %s scorer's rewards are used as "
                 "they are", cfg.reward_norm, scorer.kind)  # fmt: skip
    trainer = PPOTrainer(
        cfg,
        accelerator,
        m.policy,
        m.value_model,
        m.ref_model,
        scorer,
        m.stop_ids,
        m.pad_id,
        reward_stats=load_reward_stats(reward_from),
        seed=seed,
    )

    def on_eval(step: int) -> dict[str, float]:
        metrics, _ = evaluate_held_out(trainer, m.tokenizer, held, held_ids)
        return {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}

    trainer.fit(train_ids, ctx.dir, resume=ctx.state == "partial", on_eval=on_eval)  # Interrupted on a signal

    final, answers = evaluate_held_out(trainer, m.tokenizer, held, held_ids)
    save_policy(trainer, m.tokenizer, m.stop_ids, m.pad_id, ctx.dir.artifact)
    # with ppo.reward=checker the scores are the checker's own: nothing to compare
    agreement = ppo_diagnostics(answers, final.get("kl"), cfg.kl_target) if cfg.reward != "checker" else None
    if accelerator.is_main_process:
        ctx.dir.append_metrics(
            {"step": trainer.step, **{f"eval/{k}": v for k, v in final.items() if isinstance(v, (int, float))}}
        )
        write_jsonl(answers, ctx.dir.root / "eval_answers.jsonl")
    history = ctx.dir.read_metrics()
    if accelerator.is_main_process:
        plot_stage("ppo", history, ctx.dir.root / "curves.png")
    last = next((r for r in reversed(history) if "ppo/reward" in r), {})
    # after training and the final evaluation, so PPO's own numbers are those of a run without this control
    dpo = (
        _dpo_control(cfg, m, scorer, held[: final.get("n_eval", 0)], trainer.device)
        if accelerator.is_main_process
        else {}
    )
    metrics = {
        **final,
        **dpo,
        "steps": trainer.step,
        "train_reward": last.get("ppo/reward"),
        "train_kl": last.get("ppo/kl"),
        "prompts_per_s": last.get("ppo/prompts_per_s"),
        "rollout_tokens_per_s": last.get("ppo/rollout_tokens_per_s"),
    }
    log.info(
        "ppo: held-out reward %.3f (SFT %.3f), KL %.3f, checker accuracy %s (SFT %s)",
        final.get("reward_mean", float("nan")),
        final.get("sft_reward_mean", float("nan")),
        final.get("kl", float("nan")),
        final.get("checker_accuracy"),
        final.get("sft_checker_accuracy"),
    )
    verdict = controls_verdict(metrics, reward_manifest.get("metrics"))
    log.info("ppo: controls: %s", verdict["text"])
    extra = {
        "samples": answers[: cfg.n_samples],
        "eval_answers": str(ctx.dir.root / "eval_answers.jsonl"),
        "rm_vs_checker": agreement,
        "data": {
            "source": data.source,
            "n_train": len(data.train),
            "n_eval": len(held),
            "skipped_bad_records": data.skipped,
        },
        "reward": cfg.reward,
        "policy_from": str(policy_from),
        "reward_from": str(reward_from),
        "curves": str(ctx.dir.root / "curves.png"),
        "controls": verdict,
    }
    accelerator.wait_for_everyone()
    return StageResult(metrics=metrics, extra=extra, prior_wall_time_s=trainer.resumed_wall_time_s)


def main(argv: list[str] | None = None) -> int:
    return run_stage("ppo", argv, _body)


if __name__ == "__main__":
    raise SystemExit(main())
