"""The PPO trainer's engine: one AdamW over the policy and value model, a learning-rate schedule counted in optimizer
updates, DeepSpeed's batch keys, the ZeRO-3 gathering of the policy for generation, and where the frozen models run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler
from trl.models.utils import add_hooks, remove_hooks

from pipeline.config import PPOStageConfig
from pipeline.training import is_zero3

__all__ = ["is_deepspeed", "frozen_placement", "build_optimizer", "gathered_policy", "restart_untouched_adam_state"]


def is_deepspeed(accelerator: Any) -> bool:
    """Whether the accelerator runs DeepSpeed (it then steps, clips and shards on its own)."""
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def frozen_placement(cfg: PPOStageConfig, device: torch.device) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype the frozen models run: ``ppo.frozen_device`` (``auto``: ``device``, the training
    device) and ``ppo.reference_dtype``."""
    frozen = torch.device("cpu") if cfg.frozen_device == "cpu" else device
    return frozen, torch.bfloat16 if cfg.reference_dtype == "bfloat16" else torch.float32


@contextmanager
def gathered_policy(engine: nn.Module, policy: nn.Module, accelerator: Any) -> Iterator[nn.Module]:
    """``policy`` (a part of the prepared ``engine``) ready for ``generate``: under ZeRO-3 its shards are gathered
    once for the whole rollout, and ZeRO's per-module fetch hooks are taken off meanwhile, or every decoding step
    would gather (and release) every layer again."""
    if not is_zero3(accelerator):
        yield policy
        return
    import deepspeed  # an optional dependency, needed only under ZeRO-3

    with deepspeed.zero.GatheredParameters(list(policy.parameters())):
        remove_hooks(engine)
        try:
            yield policy
        finally:
            add_hooks(engine)


def build_optimizer(
    cfg: PPOStageConfig, accelerator: Any, policy: nn.Module, value_model: nn.Module | None, total_updates: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with two parameter groups (policy at ``ppo.lr``, value model at ``ppo.value_lr`` or ``ppo.lr``) and its
    scheduler over ``total_updates`` optimizer updates. Under DeepSpeed, its "auto" batch keys are filled here (our
    loop has no dataloader for accelerate to read them from), before ``accelerator.prepare``."""
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
        **({} if is_deepspeed(accelerator) else {"fused": True}),
    )
    if is_deepspeed(accelerator):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.minibatch_size
        ds["gradient_accumulation_steps"] = 1
        ds["gradient_clipping"] = cfg.grad_clip
        ds["train_batch_size"] = cfg.minibatch_size * accelerator.num_processes
    return optimizer, _make_scheduler(cfg, optimizer, total_updates, _scheduler_steps_per_update(accelerator))


def _scheduler_steps_per_update(accelerator: Any) -> int:
    """How many times ``accelerator.prepare``'s scheduler wrapper steps the schedule per optimizer update: once per
    process (accelerate assumes a schedule sized for one process reading the whole dataset; ours counts each
    process's own updates, so it is stretched by the same factor), once with ``split_batches``."""
    if getattr(accelerator, "split_batches", False) or not getattr(accelerator, "step_scheduler_with_optimizer", True):
        return 1
    return accelerator.num_processes


def _make_scheduler(cfg: PPOStageConfig, optimizer: torch.optim.Optimizer, total: int, per_update: int = 1) -> Any:
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_scheduler]
    warmup = cfg.warmup_steps * (total // max(cfg.steps, 1))  # warmup_steps counts PPO steps
    return get_scheduler(name, optimizer, num_warmup_steps=warmup * per_update, num_training_steps=total * per_update)


def restart_untouched_adam_state(optimizer: Any) -> int:
    """Reset Adam's step count of every state tensor whose moments are exactly zero (it never had a gradient).

    The critic warm-up (``ppo.critic_warmup_steps``) gives the policy zero gradients: Adam's moments stay exactly 0
    and the weights unchanged, but its step count advances, and a stale count would inflate the policy's first
    real updates (a bias correction ``1 - beta2^t`` near 1 over a second moment that has barely started). After
    the warm-up the policy's state is thus restarted, as if it had never been stepped (OpenRLHF, whose frozen
    actor is never stepped). Matching zero moments instead of named parameters works on every backend: torch
    keeps one state per parameter, DeepSpeed one per flat (ZeRO-3: sub-group) partition of each parameter group.

    Args:
        optimizer: the prepared optimizer (accelerate's and DeepSpeed's wrappers are looked through).

    Returns:
        The number of state entries restarted (on this process).
    """
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate's AcceleratedOptimizer, DeepSpeed's ZeRO optimizer
        inner = inner.optimizer
    n = 0
    for state in inner.state.values():
        m, v = state.get("exp_avg"), state.get("exp_avg_sq")
        if m is None or v is None or bool(m.any()) or bool(v.any()):
            continue
        state["step"] = state["step"].zero_() if torch.is_tensor(state["step"]) else 0
        n += 1
    return n
