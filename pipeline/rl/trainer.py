"""The PPO loop on accelerate (one process, DDP, DeepSpeed ZeRO-2/3): rollouts, advantages, updates, checkpoints.

The recipe is InstructGPT's (Ouyang et al. 2022) with the choices of "The N implementation details of
RLHF with PPO" (Huang et al. 2022/2024):

- policy initialised from the SFT model, value model from the reward model (a separate network whose
  score head is applied at every position), frozen reference (the SFT model) and frozen reward model;
- rollouts: left-padded prompts, KV-cache sampling from the full distribution (temperature only), stop at
  end-of-turn; the reward model scores prompt+response at the response's last token, standardised with its
  saved statistics (:mod:`pipeline.rl.scores`: optional clipping, ``missing_eos_penalty`` without ``<|end|>``);
- optionally a critic warm-up (OpenRLHF): the first ``critic_warmup_steps`` steps train only the value model;
- per-token KL penalty against the reference, fixed or adaptive (Ziegler et al. 2019);
- GAE, advantage whitening, clipped policy and value losses, optional entropy bonus, several epochs of
  shuffled minibatches, gradient clipping, a learning-rate schedule; dropout is disabled;
- or, with ``ppo.advantage=group``, no critic: several samples per prompt, each response's advantage its
  return minus the mean of the prompt's other samples (RLOO, Ahmadian et al. 2024; GRPO's group baseline
  without its standard-deviation scaling), under the same clipped objective.

Departures (each deliberate):

- Policy and value model are wrapped in one module (:class:`~pipeline.rl.rollout.PolicyAndValue`) with one
  AdamW and two parameter groups, so DDP and DeepSpeed see a single engine.
- The old log-probs and the logged entropy are the sampling distribution's, taken from the decode loop's logits
  (as TRL's PPO does), where the lean loop samples (a GPT-2 policy) and the policy trains in float32 without mixed
  precision; in the first minibatch the ratio is then 1 up to float rounding (the decode step's matrix shapes
  differ from the training forward's). Otherwise (other architectures, bf16 weights or autocast, where the decode
  loop's precision would differ from the training forward's) a forward pass after generation computes them, and
  that ratio is exactly 1.
- Under several processes each process whitens its own advantages (as TRL does); the adaptive KL
  controller and every logged statistic use the mean over all processes.
- Speed: GPT-2's tanh-GELU runs as ``x * sigmoid(2u)`` with a hand-written backward on a CPU in float32
  (:class:`pipeline.lm.TanhGELU`; the same function, float rounding aside); the logged entropy is the sampling
  policy's, computed once per rollout (the PPO epochs compute it only when an entropy bonus is trained); a GPT-2
  policy, value, reference and reward model run their forward through their own modules
  (:func:`pipeline.lm.gpt2_hidden_states`: Hugging Face's result up to float rounding), with the last block
  computing only the rows from the last prompt token on, and only the response positions go through the LM head;
  each minibatch is trimmed to its own longest prompt and response; a GPT-2 policy samples through a lean
  KV-cache loop that draws each token by inverse CDF from one uniform number per row
  (:func:`pipeline.lm.sample_responses`: the same distribution as Hugging Face ``generate``'s ``multinomial``,
  other tokens from the same seed) and returns the old log-probs with them.

Usage::

    trainer = PPOTrainer(cfg.ppo, accelerator, policy, value_model, ref_model, load_scorer(reward_dir),
                         stop_ids=[end_id, eos_id], pad_id=pad_id, reward_stats={"mean": 0.1, "std": 1.2})
    trainer.fit(prompt_ids, stage_dir)          # resumes from stage_dir's latest checkpoint if asked
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import generator_state, load_checkpoint, save_checkpoint, set_generator_state
from pipeline.config import PPOStageConfig
from pipeline.lm import Samples, disable_dropout, fuse_activations, left_pad, response_logprobs, sample_responses
from pipeline.reward.scorer import RewardScorer
from pipeline.runs import StageDir, StageError
from pipeline.training import Interrupted, StopSignal

from .engine import build_optimizer, frozen_placement, gathered_policy, is_deepspeed, restart_untouched_adam_state
from .gae import compute_gae, group_advantages, masked_mean, masked_var, masked_whiten
from .kl import compute_rewards, make_kl_controller, sequence_returns
from .losses import explained_variance, policy_loss, value_loss
from .rollout import PolicyAndValue, Rollout
from .scores import final_scores, reward_normalisation

__all__ = ["PPOTrainer"]

log = logging.getLogger(__name__)


def sampling_matches_training(mixed_precision: str, policy: nn.Module) -> bool:
    """Whether the decode loop computes the policy's log-probs as the training forward does: it runs the policy's
    modules outside the engine's autocast, so only a float32 policy without mixed precision qualifies."""
    return mixed_precision == "no" and all(p.dtype == torch.float32 for p in policy.parameters())


class PPOTrainer:
    """PPO for a Hugging Face causal LM against a reward model (any :class:`~pipeline.reward.scorer.RewardScorer`).

    Args:
        cfg: the ``ppo`` config section.
        accelerator: an ``accelerate.Accelerator`` (not yet used to prepare anything).
        policy: causal LM to train (initialised from SFT).
        value_model: sequence-classification model to train as the critic (initialised from the reward model);
            None with ``advantage: group``, which needs none.
        ref_model: frozen causal LM (the SFT model).
        scorer: the frozen reward model: a scalar head, DPO's implicit reward, the task checker or a function.
        stop_ids: token ids that end a response (``<|end|>`` first).
        pad_id: padding id.
        reward_stats: ``{"mean", "std"}`` of the reward model's scores on SFT samples (reward_stats.json); they
            normalise the scorer's rewards when it asks for it (``scorer.normalised``) and the value model's outputs.
        seed: seeds the minibatch shuffles.
    """

    def __init__(
        self,
        cfg: PPOStageConfig,
        accelerator: Any,
        policy: nn.Module,
        value_model: nn.Module | None,
        ref_model: nn.Module,
        scorer: RewardScorer,
        stop_ids: list[int],
        pad_id: int,
        reward_stats: dict[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        if (value_model is None) != (cfg.advantage == "group"):
            need = "no value_model" if cfg.advantage == "group" else "a value_model"
            raise ValueError(f"PPOTrainer: advantage={cfg.advantage!r} needs {need}")
        self.cfg = cfg
        self.accelerator = accelerator
        self.stop_ids = list(stop_ids)
        self.pad_id = int(pad_id)
        self.reward_stats = reward_stats or {"mean": 0.0, "std": 1.0}
        self.device = accelerator.device
        for m in (policy, value_model, ref_model):
            if m is not None:
                disable_dropout(m)
                fuse_activations(m)
        frozen_device, dtype = frozen_placement(cfg, self.device)
        self.ref_model = self._freeze(ref_model, frozen_device, dtype)
        scorer.prepare_for_rl()
        scorer.place(frozen_device, dtype)
        self.scorer = scorer

        # the value model (initialised from the reward model) is put on the normalised scale, also when the
        # scorer's own rewards are left as they are (implicit rewards, the checker)
        shift, scale = reward_normalisation(cfg.reward_norm, self.reward_stats)
        self.reward_shift, self.reward_scale = (shift, scale) if scorer.normalised else (0.0, 1.0)
        model = PolicyAndValue(policy, value_model, shift, scale)
        self.updates_per_step = cfg.ppo_epochs * math.ceil(cfg.rollout_batch_size / cfg.minibatch_size)
        optimizer, scheduler = build_optimizer(cfg, accelerator, policy, value_model, cfg.steps * self.updates_per_step)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self._clipped = list(self.model.parameters())  # walked once, not at every minibatch's clipping
        self.sampled_logprobs = sampling_matches_training(accelerator.mixed_precision, policy)
        """Whether the sampling's log-probs serve as the old log-probs (else a forward pass recomputes them)."""
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.step = 0
        self.cursor = 0
        self.prior_wall_time_s = 0.0
        self.resumed_wall_time_s = 0.0
        """Wall time of the run before the checkpoint this one resumed from."""
        self.minibatch_stats: list[dict[str, float]] = []
        """Per-minibatch statistics of the last update, in order (the first has ratio 1)."""

    @staticmethod
    def _freeze(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
        model.requires_grad_(False)
        model.eval()
        return model.to(device=device, dtype=dtype)

    def sample(self, policy: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor) -> Samples:
        """Responses sampled with the rollout settings (``ppo.temperature``; top-k/top-p are refused by the config),
        with their sampling log-probs and entropies where the lean decode loop sampled them and they serve as the
        old log-probs (:attr:`sampled_logprobs`)."""
        c = self.cfg
        return sample_responses(policy, query_ids, query_mask, c.max_new_tokens, self.stop_ids, self.pad_id,
                                temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                with_logprobs=self.sampled_logprobs)  # fmt: skip

    def ref_logprobs(self, *rollout: torch.Tensor) -> torch.Tensor:
        """Log-probs ``(B, T)`` (float32, on the training device) of responses under the frozen reference."""
        dev = next(self.ref_model.parameters()).device
        lp = response_logprobs(self.ref_model, *(t.to(dev) for t in rollout), temperature=self.cfg.temperature)
        return lp.float().to(self.device)

    @property
    def unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    def _generation_model(self) -> AbstractContextManager[nn.Module]:
        """The policy ready for ``generate`` (under ZeRO-3 its shards are gathered once for the whole rollout)."""
        return gathered_policy(self.model, self.unwrapped.policy, self.accelerator)

    # ------------------------------------------------------------------ rollout

    def _chunks(self, n: int) -> list[slice]:
        size = self.cfg.forward_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    @torch.no_grad()
    def score(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Raw scores ``(B,)`` of prompt+response by the scorer (a model scorer appends ``<|end|>`` where missing)."""
        return self.scorer.score_ids(query_ids, query_mask, response_ids, response_mask).float().to(self.device)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """The reward model's score normalised with its saved statistics (``ppo.reward_norm``)."""
        return (raw - self.reward_shift) / self.reward_scale

    @torch.no_grad()
    def rollout(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> Rollout:
        """Generate responses to ``(B, P)`` left-padded prompts and score them (log-probs, values, rewards)."""
        c = self.cfg
        query_ids, query_mask = query_ids.to(self.device), query_mask.to(self.device)
        with self._generation_model() as policy:
            samples = self.sample(policy, query_ids, query_mask)
        response_ids, response_mask, ended = samples.ids, samples.mask, samples.ended
        # the old log-probs and the entropy statistic come with the samples where the lean loop drew them and the
        # policy trains as it samples (sampled_logprobs); else a forward pass of the policy computes them
        recompute = samples.logprobs is None
        parts: dict[str, list[torch.Tensor]] = {"lp": [], "v": [], "ent": [], "ref": [], "raw": []}
        for sl in self._chunks(len(query_ids)):
            q, qm, r, rm = query_ids[sl], query_mask[sl], response_ids[sl], response_mask[sl]
            lp, v, ent = self.model(q, qm, r, rm, temperature=c.temperature, with_entropy=True, with_policy=recompute)
            if recompute:
                parts["lp"].append(lp)
                parts["ent"].append(ent)
            parts["v"].append(v)
            parts["ref"].append(self.ref_logprobs(q, qm, r, rm))
            parts["raw"].append(self.score(q, qm, r, rm))
        if not recompute:
            assert samples.logprobs is not None and samples.entropy is not None
            parts["lp"], parts["ent"] = [samples.logprobs], [samples.entropy]
        mask = response_mask.float()
        raw = torch.cat(parts["raw"])
        scores = final_scores(self.normalise(raw), ended, c.reward_clip, c.missing_eos_penalty)
        return Rollout(
            query_ids=query_ids,
            query_mask=query_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            logprobs=torch.cat(parts["lp"]).float() * mask,
            ref_logprobs=torch.cat(parts["ref"]) * mask,
            values=torch.cat(parts["v"]).float() * mask,
            raw_scores=raw,
            scores=scores,
            ended=ended,
            entropy=torch.cat(parts["ent"]).float() * mask,
        )

    # ------------------------------------------------------------------ update

    def _minibatch_step(self, mb: Rollout) -> dict[str, float]:
        c = self.cfg
        mask = mb.response_mask
        logprobs, values, entropy = self.model(
            mb.query_ids,
            mb.query_mask,
            mb.response_ids,
            mb.response_mask,
            temperature=c.temperature,
            with_entropy=c.entropy_coef != 0,
        )
        assert logprobs is not None and mb.advantages is not None and mb.returns is not None
        pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mask, c.cliprange)
        # critic warm-up: the policy's terms times 0 keep every policy parameter in the graph (DDP reduces, and
        # DeepSpeed's hooks expect, a gradient for each) with zero gradients, which leave AdamW's zero moments
        # and, without weight decay, the weights exactly as they were; lr=0 instead would fill its moments
        warm = self.step < c.critic_warmup_steps
        loss = 0.0 * pg_loss if warm else pg_loss
        parts = {"policy_loss": pg_loss, **pg_stats}
        if c.advantage != "group":  # group advantages have no critic
            vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mask, c.cliprange_value)
            loss = loss + c.vf_coef * vf_loss
            parts.update(value_loss=vf_loss, **vf_stats)
        if c.entropy_coef:
            assert entropy is not None
            loss = loss - (0.0 if warm else c.entropy_coef) * masked_mean(entropy, mask)
        if not torch.isfinite(loss):
            losses = ", ".join(f"{k} {parts[k].item()}" for k in ("policy_loss", "value_loss") if k in parts)
            raise StageError(
                f"ppo: non-finite loss at step {self.step + 1} ({losses}); "
                "the last good checkpoint is kept. Lower ppo.lr or check the reward model's scores."
            )
        self.accelerator.backward(loss)
        if c.grad_clip > 0 and not is_deepspeed(self.accelerator):  # DeepSpeed clips inside its step
            self.accelerator.unscale_gradients()
            torch.nn.utils.clip_grad_norm_(self._clipped, c.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: v.item() for k, v in parts.items()}

    def update(self, ro: Rollout) -> dict[str, float]:
        """Advantages for one rollout, then ``ppo_epochs`` passes of shuffled minibatches; returns mean statistics."""
        c = self.cfg
        mask = ro.response_mask
        rewards, kl = compute_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, mask, self.kl_ctl.value)
        if c.advantage == "group":
            advantages, returns = group_advantages(
                sequence_returns(ro.scores, kl, mask, self.kl_ctl.value), mask, c.samples_per_prompt
            )
        else:
            advantages, returns = compute_gae(rewards, ro.values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            # group advantages are already centred per prompt; a token-weighted mean shift would give tied groups
            # a non-zero advantage that favours their length, so they are only rescaled
            if c.advantage == "group":
                advantages = advantages * torch.rsqrt(masked_var(advantages, mask) + 1e-8)
            else:
                advantages = masked_whiten(advantages, mask)
        ro.advantages, ro.returns = advantages, returns
        self.model.train()
        self.minibatch_stats = []
        n = len(ro)
        for _ in range(c.ppo_epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, c.minibatch_size):
                mb = ro.select(order[start : start + c.minibatch_size].to(ro.query_ids.device))
                self.minibatch_stats.append(self._minibatch_step(mb))
        stats = {
            k: sum(s[k] for s in self.minibatch_stats) / len(self.minibatch_stats) for k in self.minibatch_stats[0]
        }
        seq_kl = kl.sum(1)
        stats.update(
            entropy=masked_mean(ro.entropy, mask).item() if ro.entropy is not None else float("nan"),
            kl=seq_kl.mean().item(),
            non_score_reward=(-self.kl_ctl.value * seq_kl).mean().item(),
            advantage_mean=masked_mean(advantages, mask).item(),
            return_mean=masked_mean(returns, mask).item(),
        )
        if c.advantage != "group":  # the critic's statistics
            stats.update(
                explained_variance=explained_variance(ro.values, returns, mask).item(),
                value_mean=masked_mean(ro.values, mask).item(),
            )
        return stats

    # ------------------------------------------------------------------ one step

    def _prompt_batch(self, prompts: list[list[int]], order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        G, rank, world = self.cfg.samples_per_prompt, self.accelerator.process_index, self.accelerator.num_processes
        n = self.cfg.prompts_per_step  # distinct prompts per process, each sampled G times in a row
        start = self.cursor + rank * n
        batch = [prompts[order[(start + i) % len(order)]] for i in range(n) for _ in range(G)]
        self.cursor += n * world
        return left_pad(batch, self.pad_id, self.device)

    def _reduce(self, stats: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return stats
        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(keys, t.tolist()))

    def train_step(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> dict[str, float]:
        """One PPO step (rollout + update) on this process's prompts; returns metrics averaged over processes."""
        t0 = time.perf_counter()
        if self.step == self.cfg.critic_warmup_steps > 0:  # the warm-up is over: the policy's Adam starts afresh
            restart_untouched_adam_state(self.optimizer)
        ro = self.rollout(query_ids, query_mask)
        t_rollout = time.perf_counter() - t0
        kl_coef = self.kl_ctl.value
        stats = self.update(ro)
        n_tokens = ro.response_mask.sum().item()
        stats.update(
            reward_raw=ro.raw_scores.mean().item(),
            reward=self.normalise(ro.raw_scores).mean().item(),
            score=ro.scores.mean().item(),
            response_length=ro.response_mask.sum(1).float().mean().item(),
            ended=ro.ended.float().mean().item(),
            kl_coef=kl_coef,
            lr=self.scheduler.get_last_lr()[0],
            rollout_tokens=n_tokens,
            rollout_time_s=t_rollout,
        )
        stats = self._reduce(stats)
        world = self.accelerator.num_processes
        stats["rollout_tokens_per_s"] = stats.pop("rollout_tokens") * world / max(stats.pop("rollout_time_s"), 1e-9)
        self.kl_ctl.update(stats["kl"], self.cfg.rollout_batch_size * world)
        self.step += 1
        stats["step_time_s"] = time.perf_counter() - t0
        stats["prompts_per_s"] = self.cfg.prompts_per_step * world / stats["step_time_s"]
        return stats

    # ------------------------------------------------------------------ the loop

    def fit(
        self,
        prompts: list[list[int]],
        stage_dir: StageDir | None = None,
        resume: bool = False,
        on_eval: Callable[[int], dict[str, float]] | None = None,
    ) -> list[dict[str, float]]:
        """Run PPO to ``cfg.steps``; checkpoints, metrics.jsonl and SIGTERM/SIGINT handling when ``stage_dir`` is given.

        Args:
            prompts: chat-rendered prompt token ids (already cut to ``max_prompt_length``).
            stage_dir: the ppo stage folder (None: no checkpoints or metrics file).
            resume: continue from the latest checkpoint in ``stage_dir``.
            on_eval: called as ``on_eval(step)`` every ``eval_interval`` steps; its metrics are logged.

        Returns:
            The metrics of each step run by this call.

        Raises:
            Interrupted: a signal arrived; a checkpoint was saved first.
        """
        c = self.cfg
        if not prompts:
            raise StageError("ppo: no training prompts")
        if resume and stage_dir is not None and stage_dir.latest_checkpoint() is not None:
            self.load(stage_dir.latest_checkpoint())
            self.resumed_wall_time_s = self.prior_wall_time_s
            if self.accelerator.is_main_process:
                stage_dir.truncate_metrics_after(self.step)
        order = list(range(len(prompts)))
        random.Random(self.seed).shuffle(order)
        history: list[dict[str, float]] = []
        t_start = time.time()
        with StopSignal() as stop:
            while self.step < c.steps:
                q, qm = self._prompt_batch(prompts, order)
                stats = self.train_step(q, qm)
                record = {"step": self.step, **{f"ppo/{k}": v for k, v in stats.items()}}
                if on_eval is not None and c.eval_interval and self.step % c.eval_interval == 0 and self.step < c.steps:
                    record.update(on_eval(self.step))
                history.append(record)
                if stage_dir is not None and self.accelerator.is_main_process:
                    stage_dir.append_metrics(record)
                if self.step % c.log_interval == 0:
                    log.info(
                        "step %d/%d reward %.3f kl %.3f entropy %.3f len %.1f ended %.2f pg %.4f%s %.1f prompts/s",
                        self.step,
                        c.steps,
                        stats["reward"],
                        stats["kl"],
                        stats["entropy"],
                        stats["response_length"],
                        stats["ended"],
                        stats["policy_loss"],
                        f" vf {stats['value_loss']:.4f}" if "value_loss" in stats else "",
                        stats["prompts_per_s"],
                    )
                self.prior_wall_time_s += time.time() - t_start
                t_start = time.time()
                interrupted = stop.any_process(self.accelerator)
                if stage_dir is not None and (self.step % c.ckpt_interval == 0 or interrupted or self.step == c.steps):
                    self.save(stage_dir)
                if interrupted:
                    where = stage_dir.checkpoints if stage_dir is not None else "(no stage folder)"
                    raise Interrupted("ppo", self.step, interrupted, where)
        return history

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The loop's own state (everything the accelerator does not save)."""
        return {
            "step": self.step,
            "cursor": self.cursor,
            "kl_controller": self.kl_ctl.state_dict(),
            "generator": generator_state(self.generator),
            "wall_time_s": self.prior_wall_time_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.cursor = int(state["cursor"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        set_generator_state(self.generator, state["generator"])
        self.prior_wall_time_s = float(state.get("wall_time_s", 0.0))

    def save(self, stage_dir: StageDir) -> Path:
        """Checkpoint the trained model(s), optimizer, scheduler, RNGs and loop state (call on every process)."""
        return save_checkpoint(self.accelerator, stage_dir, self.step, self.cfg.keep_checkpoints, self.state_dict())

    def load(self, path: Path) -> None:
        self.load_state_dict(load_checkpoint(self.accelerator, path))

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full weights (gathered under ZeRO-3; empty on other processes); call on every process."""
        full = self.accelerator.get_state_dict(self.model)
        if full is None:  # ZeRO-3 consolidates on the main process only
            return {}
        return {k[len("policy.") :]: v for k, v in full.items() if k.startswith("policy.")}
