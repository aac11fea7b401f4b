"""Reward-model stage: a scalar head on the SFT backbone, trained on ranked responses.

    accelerate launch --config_file configs/accelerate/cpu.yaml -m stages.reward --config configs/tiny.yaml

Reads ``runs/<run>/sft/artifact`` (or ``reward.init_from``) and the ranked responses of
``reward.dataset``; pairwise data trains with TRL's ``RewardTrainer``, K-wise rankings with the grouped
InstructGPT loss (``reward.kwise``). ``reward.objective=dpo`` trains the init model itself with the DPO
loss instead, and its reward is DPO's implicit reward (``pipeline/implicit_reward.py``).
``reward.on_policy_samples`` adds pairs on the init model's own samples ranked by the task checker
(``on_policy_pairs.jsonl`` in the stage folder). Writes ``runs/<run>/reward/artifact/``: the classifier
(``AutoModelForSequenceClassification``, num_labels=1) + tokenizer (objective=dpo: the trained causal LM,
its frozen reference in ``reference/`` and ``implicit_reward.json``), ``reward_stats.json`` (reward mean/std
on SFT-policy samples of training prompts, for PPO) and ``eval_rewards.json`` (held-out rewards of each
prompt's best and worst response). Resumes from the newest complete Trainer checkpoint; done: skipped.

On held-out records with a task checker (the generated default data) the manifest also holds
``pair_accuracy_by_kind`` and ``best_of_k`` (``reward.best_of_k``): the SFT model's greedy, sampled and
pass@k accuracy, and the accuracy of the sample the new reward model prefers. When that pick is not above
the greedy answers, PPO against this reward model has no gain the reward model can see (the PPO stage warns).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import RewardConfig

from pipeline.agreement import pair_accuracy_by_kind
from pipeline.data.preferences import PreferenceData, PreferenceGroup, load_preferences
from pipeline.data.records import BadRecord
from pipeline.data.tasks import write_jsonl
from pipeline.evaluate import has_checker
from pipeline.hf_trainer import (  # the Trainer plumbing SFT and reward share
    CheckpointMarker,
    checkpoint_step,
    context_length,
    cpu_without_deepspeed,
    deepspeed_on_cpu_state,
    latest_complete_checkpoint,
    remove_incomplete_checkpoints,
)
from pipeline.implicit_reward import (
    DPOCollator,
    DPORewardTrainer,
    add_reference_logprobs,
    dpo_rows,
    save_implicit_reward,
)
from pipeline.reward import (
    MetricsCallback,
    StopOnSignal,
    build_reward_trainer,
    encode_groups,
    evaluate_rankings,
    grouped_rows,
    load_reward_model,
    on_policy_groups,
    pairwise_rows,
    policy_best_of_k,
    policy_reward_stats,
    reward_stats,
    score_texts,
)
from pipeline.rl.rollout import disable_dropout
from pipeline.runs import StageError, atomic_write_json
from pipeline.stage import StageContext, StageResult, is_main_process, run_stage
from pipeline.tokenizer import ensure_chat_tokens

log = logging.getLogger("stages.reward")


def _load_data(ctx: StageContext) -> PreferenceData:
    rc = ctx.cfg.reward
    try:
        data = load_preferences(rc.dataset, ctx.cfg.data.tasks, ctx.cfg.run.seed)
    except (BadRecord, FileNotFoundError) as e:
        raise StageError(f"reward.dataset: {e}") from None
    if not data.eval:
        raise StageError(
            "reward: no held-out preference records; set reward.dataset.eval_source or reward.dataset.eval_fraction > 0"
        )
    return data


def _training_args(ctx: StageContext) -> RewardConfig:
    import torch

    rc = ctx.cfg.reward
    return RewardConfig(
        output_dir=str(ctx.dir.checkpoints),
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
        seed=ctx.cfg.run.seed,
        data_seed=ctx.cfg.run.seed,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        max_length=None,  # encode_groups drops too-long groups itself
        prediction_loss_only=True,
        report_to="none",  # metrics.jsonl and tb/ come from _callbacks
        use_cpu=cpu_without_deepspeed(),
        dataloader_pin_memory=torch.cuda.is_available(),
        trust_remote_code=rc.trust_remote_code,
        **deepspeed_on_cpu_state(),  # DeepSpeed on CPU processes (CI) needs a gloo state set up first
    )


def _callbacks(ctx: StageContext, stopper: StopOnSignal) -> list[Any]:
    callbacks: list[Any] = [MetricsCallback(ctx.dir.append_metrics), CheckpointMarker(), stopper]
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(str(ctx.dir.tb))))
    return callbacks


def _resume_point(ctx: StageContext) -> str | None:
    """The newest complete checkpoint of a partial stage (incomplete ones, cut off by a kill, are removed)."""
    if ctx.state != "partial":
        return None
    if is_main_process():
        remove_incomplete_checkpoints(ctx.dir.checkpoints)
    ckpt = latest_complete_checkpoint(ctx.dir.checkpoints)
    if is_main_process():
        ctx.dir.truncate_metrics_after(checkpoint_step(ckpt) if ckpt else 0)
    log.info("reward: resuming from %s", ckpt or "the start (no complete checkpoint)")
    return str(ckpt) if ckpt else None


def _stats_prompts(groups: list[PreferenceGroup], n: int, seed: int) -> list[str]:
    """``n`` training prompts (user messages) for the normalisation samples, cycling when there are fewer."""
    prompts = list(dict.fromkeys(g.prompt for g in groups if isinstance(g.prompt, str)))
    random.Random(seed).shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(n)] if prompts else []


def _normalisation(
    ctx: StageContext, policy: Callable[[], Any], rm: Any, tok: Any, groups: list[PreferenceGroup]
) -> dict:
    rc, seed = ctx.cfg.reward, ctx.cfg.run.seed
    prompts = _stats_prompts(groups, rc.norm_samples, seed)
    if not prompts:  # only multi-turn prompts (e.g. HH): the policy's samples cannot be drawn the same way
        log.warning("reward: no single-message training prompts; reward_stats come from the training responses")
        flat = [(g.prompt, r) for g in groups for r in g.responses][: rc.norm_samples]
        rewards = score_texts(rm, tok, [p for p, _ in flat], [r for _, r in flat], rc.batch_size)
        return {**reward_stats(rewards), "source": "train_responses"}
    stats = policy_reward_stats(policy(), rm, tok, prompts, rc.norm_max_new_tokens, rc.batch_size, seed)
    return {**stats, "source": "sft_samples"}


def _init_tokenizer(ctx: StageContext) -> Any:
    """The init model's tokenizer with the project's chat tokens and template (a no-op for its own tokenizer)."""
    tok = AutoTokenizer.from_pretrained(_init_dir(ctx), trust_remote_code=ctx.cfg.reward.trust_remote_code)
    ensure_chat_tokens(tok)
    return tok


def _init_lm(ctx: StageContext, tok: Any) -> Any:
    """The init (SFT) model as a causal LM, its embeddings grown to ``tok`` when tokens were added."""
    lm = AutoModelForCausalLM.from_pretrained(_init_dir(ctx), trust_remote_code=ctx.cfg.reward.trust_remote_code)
    if lm.get_input_embeddings().num_embeddings < len(tok):
        lm.resize_token_embeddings(len(tok))
    return lm


def _load_policy(ctx: StageContext, rm: Any, tok: Any) -> Any:
    """The SFT model the reward model starts from, as the policy PPO will start from."""
    return _init_lm(ctx, tok).to(next(rm.parameters()).device).eval()


def _best_of_k(
    ctx: StageContext, policy: Callable[[], Any], rm: Any, tok: Any, groups: list[PreferenceGroup]
) -> dict[str, dict[str, Any]] | None:
    """:func:`pipeline.reward.policy_best_of_k` of the SFT policy on held-out prompts that have a checker: the
    first ``reward.best_of_k_prompts`` distinct prompts of the held-out groups, greedy and ``reward.best_of_k``
    samples (temperature 1, seeded by ``run.seed``) of up to ``reward.norm_max_new_tokens`` tokens each."""
    rc = ctx.cfg.reward
    records: dict[str, dict[str, Any]] = {}
    for g in groups:
        if isinstance(g.prompt, str) and has_checker(g.meta):
            records.setdefault(g.prompt, {"prompt": g.prompt, "task": g.meta["task"], "answer": g.meta["answer"]})
    recs = list(records.values())[: rc.best_of_k_prompts]
    if not recs or not rc.best_of_k:
        return None
    return policy_best_of_k(
        policy(), rm, tok, recs, rc.best_of_k, rc.norm_max_new_tokens, rc.batch_size, ctx.cfg.run.seed
    )


ON_POLICY_FILE = "on_policy_pairs.jsonl"


def _on_policy(ctx: StageContext, groups: list[PreferenceGroup]) -> list[PreferenceGroup]:
    """``reward.on_policy_samples``: pairs on the init model's own samples of the training prompts, ranked by
    the task checker. Drawn once by the main process into ``<stage>/on_policy_pairs.jsonl`` (other processes
    wait for it), so every process and every resume trains on the same pairs."""
    rc = ctx.cfg.reward
    path = ctx.dir.root / ON_POLICY_FILE
    if not path.is_file() and is_main_process():
        tok = _init_tokenizer(ctx)
        policy = _init_lm(ctx, tok).to(_device()).eval()
        new = on_policy_groups(policy, tok, groups, rc.on_policy_samples, rc.on_policy_pairs,
                               rc.norm_max_new_tokens, max(rc.batch_size, 64), ctx.cfg.run.seed)  # fmt: skip
        write_jsonl(
            ({"prompt": g.prompt, "responses": g.responses, "scores": g.scores, "meta": g.meta} for g in new), path
        )
        log.info("reward: %d on-policy pairs from %d samples per prompt -> %s", len(new), rc.on_policy_samples, path)
    deadline = time.monotonic() + 3600
    while not path.is_file():  # another process is drawing them
        if time.monotonic() > deadline:
            raise StageError(f"reward: {path} did not appear within an hour (the main process drew the samples)")
        time.sleep(0.5)
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        r = json.loads(line)
        out.append(PreferenceGroup(r["prompt"], r["responses"], [0, 1], scores=r["scores"],
                                   location=f"{path}:{i}", meta=r["meta"]))  # fmt: skip
    if not out:
        log.warning("reward: reward.on_policy_samples=%d gave no pairs (no training prompt has a task checker, "
                    "or every sample was right)", rc.on_policy_samples)  # fmt: skip
    return out


def _device() -> Any:
    """This process's GPU when there is one (for the passes made outside the Trainer), else the CPU."""
    import os

    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"


def _dpo_trainer(ctx: StageContext, data: PreferenceData, stopper: StopOnSignal) -> tuple[Any, ...]:
    """The init model as a causal LM, its DPO rows (reference log-probs precomputed by a frozen copy of it) and a
    :class:`DPORewardTrainer`. Groups with a sequence over the context are left out whole, as in
    ``encode_groups``. Returns (trainer, reference, training rows, dropped groups, kept train / held-out groups)."""
    rc = ctx.cfg.reward
    tokenizer = _init_tokenizer(ctx)
    model = _init_lm(ctx, tokenizer)
    disable_dropout(model)  # the reference log-probs are dropout-free
    reference = copy.deepcopy(model).eval()  # the very weights (and any resized rows) training starts from
    max_length = rc.max_length or context_length(model)
    train_rows, train = dpo_rows(tokenizer, data.train, max_length)
    eval_rows, held = dpo_rows(tokenizer, data.eval, max_length)
    dropped = {"train": len(data.train) - len(train), "eval": len(data.eval) - len(held)}
    if not train or not held:
        raise StageError(f"reward: every training or held-out group is longer than max_length={max_length} tokens")
    add_reference_logprobs(
        reference.to(_device()), train_rows + eval_rows, tokenizer.pad_token_id, max(rc.batch_size, 32)
    )
    reference.to("cpu")
    from datasets import Dataset

    args = _training_args(ctx)
    trainer = DPORewardTrainer(
        model=model,
        args=args,
        data_collator=DPOCollator(tokenizer.pad_token_id),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows and args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=_callbacks(ctx, stopper),
        beta=rc.dpo_beta,
        nll_weight=rc.dpo_nll_weight,
    )
    return trainer, reference, len(train_rows), dropped, train, held


@dataclass
class _Trained:
    """What training hands to the evaluation on the main process."""

    step: int
    device: Any
    grouped: bool
    train_loss: float
    train: list[PreferenceGroup]
    eval: list[PreferenceGroup]
    data: dict[str, Any]


def _train(ctx: StageContext) -> _Trained:
    """Train (or resume) on every process and save the artifact; returns what the evaluation needs."""
    cfg, rc = ctx.cfg, ctx.cfg.reward
    data = _load_data(ctx)
    n_on_policy = 0
    if rc.on_policy_samples:
        extra = _on_policy(ctx, data.train)
        n_on_policy = len(extra)
        data = dataclasses.replace(data, train=data.train + extra)
    set_seed(cfg.run.seed)  # the new score head is drawn from torch's RNG
    stopper = StopOnSignal()
    grouped = False
    if rc.objective == "dpo":
        trainer, reference, n_rows, dropped, train_groups, eval_groups = _dpo_trainer(ctx, data, stopper)
        tokenizer = trainer.processing_class
    else:
        model, tokenizer = load_reward_model(_init_dir(ctx), rc.trust_remote_code)
        max_length = rc.max_length or context_length(model)
        train_enc, dropped_train = encode_groups(tokenizer, data.train, max_length)
        eval_enc, dropped_eval = encode_groups(tokenizer, data.eval, max_length)
        if not train_enc or not eval_enc:
            raise StageError(f"reward: every training or held-out group is longer than max_length={max_length} tokens")
        grouped = rc.kwise == "grouped" and any(len(g.responses) > 2 for g, _ in train_enc)
        to_rows = grouped_rows if grouped else pairwise_rows
        train_rows = to_rows(train_enc, rc.margin)
        trainer = build_reward_trainer(
            model, tokenizer, train_rows, to_rows(eval_enc, rc.margin), _training_args(ctx), grouped,
            _callbacks(ctx, stopper),
        )  # fmt: skip
        n_rows, dropped = len(train_rows), {"train": dropped_train, "eval": dropped_eval}
        train_groups, eval_groups = [g for g, _ in train_enc], [g for g, _ in eval_enc]
    with stopper:
        output = trainer.train(resume_from_checkpoint=_resume_point(ctx))
    if stopper.stopped_by:
        raise StageError(
            f"reward: stopped by {stopper.stopped_by} at step {trainer.state.global_step}; a checkpoint was saved "
            f"in {ctx.dir.checkpoints}. Run the stage again to resume."
        )
    trainer.save_model(str(ctx.dir.artifact))  # every process: ZeRO-3 gathers the shards
    trainer.accelerator.wait_for_everyone()
    unset_hf_deepspeed_config()  # training is over: later loads are plain models, not ZeRO-3 partitions
    if is_main_process():
        # like the other model artifacts: no pickled TrainingArguments, the chat template in tokenizer_config.json
        for name in ("training_args.bin", "chat_template.jinja"):
            (ctx.dir.artifact / name).unlink(missing_ok=True)
        tokenizer.save_pretrained(str(ctx.dir.artifact), save_jinja_files=False)
        if rc.objective == "dpo":
            save_implicit_reward(ctx.dir.artifact, reference, rc.dpo_beta, tokenizer)
    counts = {
        "train_groups": len(train_groups),
        "train_rows": n_rows,
        "on_policy_pairs": n_on_policy,
        "dropped_too_long": dropped,
        "skipped_bad_records": data.skipped,
        "skipped_examples": data.skipped_examples,
    }
    train_losses = [m["train/loss"] for m in ctx.dir.read_metrics() if "train/loss" in m]
    return _Trained(
        step=trainer.state.global_step,
        device=trainer.args.device,
        grouped=grouped,
        train_loss=train_losses[-1] if train_losses else output.training_loss,
        train=train_groups,
        eval=eval_groups,
        data=counts,
    )


def _init_dir(ctx: StageContext) -> str:
    return ctx.cfg.reward.init_from or str(ctx.upstream("sft").artifact)


def _evaluate(ctx: StageContext, t: _Trained) -> StageResult:
    """Held-out ranking metrics and normalisation statistics of the artifact, loaded as a user loads it."""
    rc = ctx.cfg.reward
    rm, tok = load_reward_model(str(ctx.dir.artifact), rc.trust_remote_code)  # a classifier or an ImplicitReward
    rm = rm.to(t.device)
    ev = evaluate_rankings(rm, tok, t.eval, rc.batch_size, rc.margin)
    by_kind = pair_accuracy_by_kind(t.eval, ev.group_rewards)  # where it disagrees with the task checker
    policy = functools.cache(lambda: _load_policy(ctx, rm, tok))  # loaded once, when first needed
    stats = _normalisation(ctx, policy, rm, tok, t.train)
    bok = _best_of_k(ctx, policy, rm, tok, t.eval)  # can PPO on this reward model gain at all?
    if bok:
        a = bok["all"]
        log.info("reward: SFT policy on %d held-out prompts: greedy %.3f, pass@%d %.3f, reward model's best of %d %.3f",
                 a["n"], a["greedy"], rc.best_of_k, a["pass_at_k"], rc.best_of_k, a["rm_best_of_k"])  # fmt: skip
    atomic_write_json(ctx.dir.artifact / "reward_stats.json", stats)
    rewards = {"chosen": [round(x, 5) for x in ev.chosen], "rejected": [round(x, 5) for x in ev.rejected]}
    atomic_write_json(ctx.dir.artifact / "eval_rewards.json", rewards)
    final = {"step": t.step, "rm/accuracy": ev.pair_accuracy, "val/loss": ev.val_loss}
    metrics = {
        "pair_accuracy": ev.pair_accuracy,
        "val_loss": ev.val_loss,
        "train_loss": t.train_loss,
        "reward_chosen_mean": sum(ev.chosen) / len(ev.chosen),
        "reward_rejected_mean": sum(ev.rejected) / len(ev.rejected),
        "reward_norm_mean": stats["mean"],
        "reward_norm_std": stats["std"],
        "steps": t.step,
    }
    if ev.rank_correlation is not None:
        final["rm/rank_correlation"] = ev.rank_correlation
        metrics.update(rank_correlation=ev.rank_correlation, kendall_tau=ev.kendall_tau)
    ctx.dir.append_metrics(final)
    log.info("reward: held-out pair accuracy %.3f (%d pairs), reward mean/std %.3f/%.3f",
             ev.pair_accuracy, ev.n_pairs, stats["mean"], stats["std"])  # fmt: skip
    extra = {
        "init_from": _init_dir(ctx),
        "loss": (
            f"DPO, implicit reward (beta {rc.dpo_beta})"
            + (f" + {rc.dpo_nll_weight:g} x chosen NLL (RPO)" if rc.dpo_nll_weight else "")
            if rc.objective == "dpo"
            else "grouped (InstructGPT, each prompt weighted once)"
            if t.grouped
            else "pairwise Bradley-Terry (TRL)"
        ),
        "data": {**t.data, "eval_groups": ev.n_groups, "eval_pairs": ev.n_pairs},
        "reward_stats": stats,
        "eval_rewards": rewards,
        "pair_accuracy_by_kind": by_kind,
        "best_of_k": {"k": rc.best_of_k, "tasks": bok} if bok else None,
    }
    return StageResult(metrics=metrics, extra=extra)


def _body(ctx: StageContext) -> StageResult:
    trained = _train(ctx)
    if not is_main_process():
        return StageResult(metrics={})
    return _evaluate(ctx, trained)


def main(argv: list[str] | None = None) -> int:
    return run_stage("reward", argv, _body)


if __name__ == "__main__":
    raise SystemExit(main())
