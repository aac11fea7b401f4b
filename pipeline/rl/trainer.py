"""The PPO loop on accelerate (one process, DDP, DeepSpeed ZeRO-2/3): rollouts, advantages, updates, checkpoints.

The recipe is InstructGPT's (Ouyang et al. 2022) with the choices of "The N implementation details of
RLHF with PPO" (Huang et al. 2022/2024):

- policy initialised from the SFT model, value model from the reward model (a separate network whose
  score head is applied at every position), frozen reference (the SFT model) and frozen reward model;
- rollouts: left-padded prompts, KV-cache sampling (temperature, top-k/top-p), stop at end-of-turn;
  the reward model scores prompt+response at the response's last token, centred with its saved
  statistics; a response that never ends loses ``missing_eos_penalty``;
- per-token KL penalty against the reference, fixed or adaptive (Ziegler et al. 2019);
- GAE, advantage whitening, clipped policy and value losses, optional entropy bonus, several epochs of
  shuffled minibatches, gradient clipping, a learning-rate schedule; dropout is disabled;
- or, with ``ppo.advantage=group``, no critic: several samples per prompt, each response's advantage its
  return minus the mean of the prompt's other samples (RLOO, Ahmadian et al. 2024; GRPO's group baseline
  without its standard-deviation scaling), under the same clipped objective.

Departures (each deliberate):

- Policy and value model are wrapped in one module (:class:`~pipeline.rl.rollout.PolicyAndValue`) with one
  AdamW and two parameter groups, so DDP and DeepSpeed see a single engine.
- The old log-probs are recomputed by a forward pass after generation (not taken from the sampling
  logits): in the first minibatch of the first epoch the ratio is exactly 1.
- Under several processes each process whitens its own advantages (as TRL does); the adaptive KL
  controller and every logged statistic use the mean over all processes.
- Speed: GPT-2's Python ``gelu_new`` is swapped for torch's fused tanh-GELU (same function, float rounding
  aside); the entropy is a graph-free statistic unless an entropy bonus is trained; only the response
  positions go through the LM head; each minibatch is trimmed to its own longest prompt and response.

Usage::

    trainer = PPOTrainer(cfg.ppo, accelerator, policy, value_model, ref_model, reward_model,
                         stop_ids=[end_id, eos_id], pad_id=pad_id, reward_stats={"mean": 0.1, "std": 1.2})
    trainer.fit(prompt_ids, stage_dir)          # resumes from stage_dir's latest checkpoint if asked
"""

from __future__ import annotations

import logging
import math
import random
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import generator_state, load_checkpoint, save_checkpoint, set_generator_state
from pipeline.config import PPOStageConfig
from pipeline.runs import StageDir, StageError

from .gae import compute_gae, group_advantages, masked_mean, masked_var, masked_whiten
from .kl import compute_rewards, make_kl_controller
from .losses import explained_variance, policy_loss, value_loss
from .rollout import (
    PolicyAndValue,
    Rollout,
    disable_dropout,
    ensure_end_token,
    fuse_activations,
    generate,
    left_pad,
    response_logprobs,
    sequence_scores,
)

__all__ = ["PPOTrainer", "ScoreFn", "PPOInterrupted", "frozen_placement"]

log = logging.getLogger(__name__)

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(query_ids, query_mask, response_ids, response_mask) -> (B,) raw scores: a programmatic reward."""


class PPOInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at ``step``."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum} after step {step}; checkpoint saved, run again to resume")
        self.step = step
        self.signum = signum


def _is_zero3(accelerator: Any) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def _is_deepspeed(accelerator: Any) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def frozen_placement(cfg: PPOStageConfig, device: torch.device) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype the frozen models run: ``ppo.frozen_device`` (``auto``: ``device``, the training
    device) and ``ppo.reference_dtype``."""
    frozen = torch.device("cpu") if cfg.frozen_device == "cpu" else device
    return frozen, torch.bfloat16 if cfg.reference_dtype == "bfloat16" else torch.float32


class PPOTrainer:
    """PPO for a Hugging Face causal LM against a reward model (or a programmatic ``score_fn``).

    Args:
        cfg: the ``ppo`` config section.
        accelerator: an ``accelerate.Accelerator`` (not yet used to prepare anything).
        policy: causal LM to train (initialised from SFT).
        value_model: sequence-classification model to train as the critic (initialised from the reward model);
            None with ``advantage: group``, which needs none.
        ref_model: frozen causal LM (the SFT model).
        reward_model: frozen sequence-classification model, or None when ``score_fn`` is given.
        stop_ids: token ids that end a response (``<|end|>`` first).
        pad_id: padding id.
        reward_stats: ``{"mean", "std"}`` of the reward model's scores on SFT samples (reward_stats.json).
        score_fn: replaces the reward model (tests and programmatic rewards).
        seed: seeds the minibatch shuffles.
    """

    def __init__(
        self,
        cfg: PPOStageConfig,
        accelerator: Any,
        policy: nn.Module,
        value_model: nn.Module | None,
        ref_model: nn.Module,
        reward_model: nn.Module | None,
        stop_ids: list[int],
        pad_id: int,
        reward_stats: dict[str, float] | None = None,
        score_fn: ScoreFn | None = None,
        seed: int = 0,
    ) -> None:
        if reward_model is None and score_fn is None:
            raise ValueError("PPOTrainer needs a reward_model or a score_fn")
        if (value_model is None) != (cfg.advantage == "group"):
            need = "no value_model" if cfg.advantage == "group" else "a value_model"
            raise ValueError(f"PPOTrainer: advantage={cfg.advantage!r} needs {need}")
        self.cfg = cfg
        self.accelerator = accelerator
        self.stop_ids = list(stop_ids)
        self.pad_id = int(pad_id)
        self.reward_stats = reward_stats or {"mean": 0.0, "std": 1.0}
        self.score_fn = score_fn
        self.device = accelerator.device
        for m in (policy, value_model, ref_model, reward_model):
            if m is not None:
                disable_dropout(m)
                fuse_activations(m)
        frozen_device, dtype = frozen_placement(cfg, self.device)
        self.ref_model = self._freeze(ref_model, frozen_device, dtype)
        self.reward_model = self._freeze(reward_model, frozen_device, dtype) if reward_model is not None else None

        # (score - shift) / scale: the reward model's score normalised with its saved statistics. The value
        # model (initialised from the reward model) is put on the same scale, also under a score_fn, whose
        # rewards are left as they are
        shift, scale = 0.0, 1.0
        if cfg.reward_norm != "none":
            shift = float(self.reward_stats["mean"])
            if cfg.reward_norm == "standardize":
                scale = max(float(self.reward_stats.get("std", 1.0)), 1e-8)
        self.reward_shift, self.reward_scale = (shift, scale) if score_fn is None else (0.0, 1.0)
        model = PolicyAndValue(policy, value_model, shift, scale)
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr}]
        if value_model is not None:
            groups.append(
                {"params": [p for p in value_model.parameters() if p.requires_grad], "lr": cfg.value_lr or cfg.lr}
            )
        optimizer = torch.optim.AdamW(
            groups,
            eps=cfg.adam_eps,
            weight_decay=0.0,
            # one fused kernel for all tensors (DeepSpeed steps its own flat partitions, so it gets the plain one)
            **({} if _is_deepspeed(accelerator) else {"fused": True}),
        )
        self.updates_per_step = cfg.ppo_epochs * math.ceil(cfg.rollout_batch_size / cfg.minibatch_size)
        scheduler = _make_scheduler(cfg, optimizer, cfg.steps * self.updates_per_step)
        if _is_deepspeed(accelerator):
            # our loop has no dataloader: DeepSpeed's "auto" batch keys are set here, before prepare
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = cfg.minibatch_size
            ds["gradient_accumulation_steps"] = 1
            ds["gradient_clipping"] = cfg.grad_clip
            ds["train_batch_size"] = cfg.minibatch_size * accelerator.num_processes
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
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

    # ------------------------------------------------------------------ models

    @staticmethod
    def _freeze(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
        model.requires_grad_(False)
        model.eval()
        return model.to(device=device, dtype=dtype)

    def _frozen_call(self, fn: Callable[..., torch.Tensor], model: nn.Module, *tensors: torch.Tensor) -> torch.Tensor:
        dev = next(model.parameters()).device
        return fn(model, *(t.to(dev) for t in tensors)).float().to(self.device)

    @property
    def unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    @contextmanager
    def _generation_model(self) -> Any:
        """The policy ready for ``generate``: under ZeRO-3 its shards are gathered once for the whole rollout."""
        if _is_zero3(self.accelerator):
            import deepspeed
            from trl.models.utils import add_hooks, remove_hooks

            policy = self.unwrapped.policy
            # one all-gather of the policy's shards per rollout; ZeRO's per-module fetch hooks are
            # taken off meanwhile, or every decoding step would gather (and release) every layer again
            with deepspeed.zero.GatheredParameters(list(policy.parameters())):
                remove_hooks(self.model)
                try:
                    yield policy
                finally:
                    add_hooks(self.model)
        else:
            yield self.unwrapped.policy

    # ------------------------------------------------------------------ rollout

    def _chunks(self, n: int) -> list[slice]:
        size = self.cfg.forward_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    @torch.no_grad()
    def score(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Raw scores ``(B,)`` of prompt+response(+``<|end|>`` when it is missing) by the reward model (or ``score_fn``)."""
        if self.score_fn is not None:
            return self.score_fn(query_ids, query_mask, response_ids, response_mask).float().to(self.device)
        assert self.reward_model is not None
        ids, mask = ensure_end_token(response_ids, response_mask, self.stop_ids, self.pad_id)
        return self._frozen_call(sequence_scores, self.reward_model, query_ids, query_mask, ids, mask)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """The reward model's score normalised with its saved statistics (``ppo.reward_norm``)."""
        return (raw - self.reward_shift) / self.reward_scale

    @torch.no_grad()
    def rollout(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> Rollout:
        """Generate responses to ``(B, P)`` left-padded prompts and score them (log-probs, values, rewards)."""
        c = self.cfg
        query_ids, query_mask = query_ids.to(self.device), query_mask.to(self.device)
        with self._generation_model() as policy:
            response_ids, response_mask, ended = generate(
                policy,
                query_ids,
                query_mask,
                c.max_new_tokens,
                self.stop_ids,
                self.pad_id,
                do_sample=True,
                temperature=c.temperature,
                top_k=c.top_k,
                top_p=c.top_p,
            )
        parts: dict[str, list[torch.Tensor]] = {"lp": [], "v": [], "ref": [], "raw": []}
        for sl in self._chunks(len(query_ids)):
            q, qm, r, rm = query_ids[sl], query_mask[sl], response_ids[sl], response_mask[sl]
            lp, v, _ = self.model(q, qm, r, rm, temperature=c.temperature)
            parts["lp"].append(lp)
            parts["v"].append(v)
            parts["ref"].append(
                self._frozen_call(
                    lambda m, *t: response_logprobs(m, *t, temperature=c.temperature), self.ref_model, q, qm, r, rm
                )
            )
            parts["raw"].append(self.score(q, qm, r, rm))
        mask = response_mask.float()
        raw = torch.cat(parts["raw"])
        scores = self.normalise(raw) - c.missing_eos_penalty * (~ended).float()
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
        assert mb.advantages is not None and mb.returns is not None and entropy is not None
        pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mask, c.cliprange)
        ent = masked_mean(entropy, mask)
        loss = pg_loss
        parts = {"policy_loss": pg_loss, "entropy": ent, **pg_stats}
        if c.advantage != "group":  # group advantages have no critic
            vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mask, c.cliprange_value)
            loss = loss + c.vf_coef * vf_loss
            parts.update(value_loss=vf_loss, **vf_stats)
        if c.entropy_coef:
            loss = loss - c.entropy_coef * ent
        if not torch.isfinite(loss):
            losses = ", ".join(f"{k} {parts[k].item()}" for k in ("policy_loss", "value_loss") if k in parts)
            raise StageError(
                f"ppo: non-finite loss at step {self.step + 1} ({losses}); "
                "the last good checkpoint is kept. Lower ppo.lr or check the reward model's scores."
            )
        self.accelerator.backward(loss)
        if c.grad_clip > 0 and not _is_deepspeed(self.accelerator):  # DeepSpeed clips inside its step
            self.accelerator.unscale_gradients()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip, foreach=True)
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
            advantages, returns = group_advantages(ro.scores, kl, mask, self.kl_ctl.value, c.samples_per_prompt)
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
            PPOInterrupted: a signal arrived; a checkpoint was saved first.
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
        with _signal_flag() as stop:
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
                interrupted = self._any_process(stop.get("signum", 0))
                if stage_dir is not None and (self.step % c.ckpt_interval == 0 or interrupted or self.step == c.steps):
                    self.save(stage_dir)
                if interrupted:
                    raise PPOInterrupted(self.step, int(interrupted))
        return history

    def _any_process(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor([value], device=self.device)
        return int(self.accelerator.reduce(t, reduction="sum").item())

    # ------------------------------------------------------------------ held-out evaluation

    @torch.no_grad()
    def evaluate(self, prompts: list[list[int]]) -> list[dict[str, Any]]:
        """Greedy answers of the policy and of the reference (SFT) model to this process's held-out prompts,
        both scored, and the KL of sampled policy responses against the reference.

        Under ZeRO-3 every process must pass the same number of prompts (forwards are collective).

        Returns:
            Per prompt: ``policy_ids``/``sft_ids`` (response token ids, stop token excluded),
            ``policy_score``/``sft_score`` (raw scores), ``kl`` (sum over the sampled response's tokens)
            and ``policy_ended``.
        """
        c = self.cfg
        out: list[dict[str, Any]] = []
        ref_dev = next(self.ref_model.parameters()).device
        for start in range(0, len(prompts), c.rollout_batch_size):
            q, qm = left_pad(prompts[start : start + c.rollout_batch_size], self.pad_id, self.device)
            with self._generation_model() as policy:
                r, rm, ended = generate(policy, q, qm, c.max_new_tokens, self.stop_ids, self.pad_id, do_sample=False)
                rs, rms, _ = generate(
                    policy,
                    q,
                    qm,
                    c.max_new_tokens,
                    self.stop_ids,
                    self.pad_id,
                    do_sample=True,
                    temperature=c.temperature,
                    top_k=c.top_k,
                    top_p=c.top_p,
                )
            r0, rm0, _ = generate(
                self.ref_model,
                q.to(ref_dev),
                qm.to(ref_dev),
                c.max_new_tokens,
                self.stop_ids,
                self.pad_id,
                do_sample=False,
            )
            r0, rm0 = r0.to(self.device), rm0.to(self.device)
            lp, _, _ = self.model(q, qm, rs, rms, temperature=c.temperature)
            ref_lp = self._frozen_call(
                lambda m, *t: response_logprobs(m, *t, temperature=c.temperature), self.ref_model, q, qm, rs, rms
            )
            kl = ((lp.float() - ref_lp) * rms).sum(1)
            scores, sft_scores = self.score(q, qm, r, rm), self.score(q, qm, r0, rm0)
            for i in range(len(q)):
                out.append(
                    {
                        "policy_ids": _answer_ids(r[i], rm[i], self.stop_ids),
                        "sft_ids": _answer_ids(r0[i], rm0[i], self.stop_ids),
                        "policy_score": scores[i].item(),
                        "sft_score": sft_scores[i].item(),
                        "kl": kl[i].item(),
                        "policy_ended": bool(ended[i]),
                    }
                )
        return out

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


def _answer_ids(ids: torch.Tensor, mask: torch.Tensor, stop_ids: list[int]) -> list[int]:
    return [t for t in ids[mask.bool()].tolist() if t not in stop_ids]


@contextmanager
def _signal_flag() -> Any:
    """Record SIGTERM/SIGINT in a dict instead of dying, so the loop can checkpoint first."""
    flag: dict[str, int] = {}

    def handler(signum: int, frame: Any) -> None:
        flag["signum"] = signum
        log.warning("signal %d received: saving a checkpoint after this step", signum)

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: no handlers
        old = {}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _make_scheduler(cfg: PPOStageConfig, optimizer: torch.optim.Optimizer, total: int) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_scheduler]
    warmup = cfg.warmup_steps * (total // max(cfg.steps, 1))  # warmup_steps counts PPO steps
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
