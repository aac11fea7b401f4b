"""Config sections of the two fine-tuning stages on the transformers/TRL trainers: ``sft:`` and ``reward:``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .data import DatasetSpec
from .schema import ConfigError

__all__ = ["SFTStageConfig", "RewardStageConfig", "LR_SCHEDULERS"]

LR_SCHEDULERS: tuple[str, ...] = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
"""transformers' scheduler names (``transformers.SchedulerType``; a test keeps the two equal), checked at load time
so that a typo stops the run before pretraining, not when SFT starts."""
_SCHEDULERS_WITH_KWARGS = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
"""Schedulers that need ``lr_scheduler_kwargs`` (a minimum learning rate, or the decay steps)."""


def _scheduler_problem(section: str, name: str, trainer_args: dict[str, Any] | None) -> str | None:
    if name not in LR_SCHEDULERS:
        return f"{section}.lr_scheduler={name!r} is not a transformers scheduler; valid: {', '.join(LR_SCHEDULERS)}"
    if name in _SCHEDULERS_WITH_KWARGS and not (trainer_args or {}).get("lr_scheduler_kwargs"):
        where = (
            f"{section}.trainer_args.lr_scheduler_kwargs"
            if trainer_args is not None
            else f"lr_scheduler_kwargs, which {section} has no key for; use another scheduler"
        )
        return f"{section}.lr_scheduler={name} needs its arguments (a minimum lr or the decay steps) in {where}"
    return None


@dataclass(frozen=True)
class SFTStageConfig:
    """Supervised fine-tuning (TRL ``SFTTrainer``) on chat Q&A; see ``pipeline/sft.py``."""

    init_from: str = ""
    """'' = the pretrain artifact of this run; else an HF causal LM dir or Hub name."""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    max_length: int = 0
    """0 = the model's context length."""
    too_long: Literal["truncate", "drop"] = "drop"
    """Examples longer than max_length: keep their first max_length tokens, or drop them (both counted)."""
    packing: bool = False
    """Pack several examples per sequence (TRL best-fit decreasing; ``trainer_args.packing_strategy``)."""
    assistant_only_loss: bool = True
    """Loss on the assistant tokens only (the chat template's {% generation %} spans, <|end|> included)."""
    lr: float = 5e-4
    lr_scheduler: str = "cosine"
    """Any transformers scheduler name (linear, cosine, constant_with_warmup, ...)."""
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 3.0
    max_steps: int = -1
    """-1: run ``epochs``; else stop after this many optimizer steps."""
    batch_size: int = 32
    """Micro-batch per process (examples); also the generation batch of the held-out evaluation."""
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 mixed precision on GPUs that support it, float32 otherwise."""
    eval_steps: int = 0
    """0: evaluate at the end only; N: also val loss + checker accuracy every N steps."""
    save_steps: int = 100
    save_total_limit: int = 2
    """Checkpoints kept (0: all). At least 2, so a complete one survives a kill during the next save."""
    logging_steps: int = 10
    max_new_tokens: int = 32
    """Generation length for the held-out checker evaluation."""
    n_eval_prompts: int = 200
    n_samples: int = 5
    """Sample answers recorded in metrics and the report."""
    trust_remote_code: bool = False
    trainer_args: dict[str, Any] = field(default_factory=dict)
    """Any other TRL SFTConfig / TrainingArguments option (e.g. ``{packing_strategy: wrapped, adam_beta2: 0.95}``);
    unknown names are rejected, and options the keys above own must be set there."""

    def __post_init__(self) -> None:
        problems = []
        for k in ("batch_size", "grad_accum", "save_steps", "logging_steps", "max_new_tokens"):
            if getattr(self, k) < 1:
                problems.append(f"sft.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("max_length", "eval_steps", "n_eval_prompts", "n_samples"):
            if getattr(self, k) < 0:
                problems.append(f"sft.{k} must be >= 0, got {getattr(self, k)}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"sft.max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            problems.append(f"sft.epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            problems.append(f"sft.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"sft.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            problems.append(f"sft.weight_decay must be >= 0, got {self.weight_decay}")
        sched = _scheduler_problem(
            "sft", self.lr_scheduler, self.trainer_args if isinstance(self.trainer_args, dict) else {}
        )
        if sched:
            problems.append(sched)
        if self.save_total_limit == 1 or self.save_total_limit < 0:
            problems.append(f"sft.save_total_limit must be 0 (keep all) or >= 2, got {self.save_total_limit}")
        if not isinstance(self.trainer_args, dict):
            problems.append(f"sft.trainer_args must be a mapping of SFTConfig options, got {self.trainer_args!r}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class RewardStageConfig:
    init_from: str = ""
    """'' = the SFT artifact of this run; else an HF model dir or Hub name."""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    objective: Literal["bradley_terry", "dpo"] = "bradley_terry"
    """bradley_terry: a scalar head on the backbone (``AutoModelForSequenceClassification``), the usual reward
    model; dpo: the init model trained with the DPO loss on the same pairs, whose reward is DPO's implicit
    reward ``dpo_beta * log pi(y|x) / pi_ref(y|x)`` against the frozen init model (``pipeline/reward/implicit.py``;
    with ``ppo.advantage=gae`` PPO's value model then starts from the policy with a new scalar head). Every
    comparison is one DPO pair (``kwise`` does not apply)."""
    dpo_beta: float = 0.1
    """DPO's beta (objective=dpo): the scale of the implicit reward and the strength of the pull to the reference."""
    dpo_nll_weight: float = 0.0
    """objective=dpo: add this times the chosen responses' mean token NLL to the DPO loss (RPO, Pang et al. 2024;
    TRL's ``rpo_alpha``), over the comparisons whose chosen response is its group's best (all of them for pairs).
    Plain DPO lowers the chosen responses' likelihood too, so every token's implicit reward drifts negative and a
    shorter answer (a prefix of the right one, or none) often scores higher; the NLL term keeps the best
    responses' tokens above the reference."""
    on_policy_samples: int = 0
    """Add pairs ranked by the task checker on the init (SFT) model's own samples: this many samples per
    training prompt that has a checker, each wrong one paired with a right response (InstructGPT ranked model
    samples). 0: the dataset's pairs only."""
    on_policy_pairs: int = 4
    """At most this many on-policy pairs per prompt."""
    kwise: Literal["grouped", "pairs"] = "grouped"
    """grouped: all C(K,2) pairs of a prompt in one batch, weighted 1/C(K,2) (InstructGPT);
    pairs: expand to independent shuffled pairs."""
    margin: bool = False
    """Subtract a margin in the Bradley-Terry loss (Llama 2): a pairwise record's ``margin`` field, or the
    score difference of a K-wise record with ``scores`` (0 when neither is given)."""
    max_length: int = 0
    lr: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 2.0
    max_steps: int = -1
    batch_size: int = 16
    """Per process: prompts (each with its K responses) when kwise=grouped, pairs otherwise."""
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    eval_steps: int = 0
    """0: evaluate at the end only."""
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 10
    norm_samples: int = 256
    """Number of SFT-policy samples on training prompts used for the reward mean/std."""
    norm_max_new_tokens: int = 32
    """Sample length cap of the normalisation samples and of the best-of-k check."""
    best_of_k: int = 8
    """Samples per held-out prompt for the best-of-k check (held-out records with a task checker only;
    0 skips it): greedy, pass@k and the reward model's best-of-k accuracy of the SFT policy, in the
    manifest's ``best_of_k`` and the run report. Not above greedy: PPO has no gain the reward model sees."""
    best_of_k_prompts: int = 200
    """Distinct held-out prompts of the best-of-k check (the first ones of the held-out set)."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        problems = []
        for k in ("best_of_k", "best_of_k_prompts", "on_policy_samples"):
            if getattr(self, k) < 0:
                problems.append(f"reward.{k} must be >= 0, got {getattr(self, k)}")
        if self.dpo_beta <= 0:
            problems.append(f"reward.dpo_beta must be > 0, got {self.dpo_beta}")
        if not (math.isfinite(self.dpo_nll_weight) and self.dpo_nll_weight >= 0):
            problems.append(f"reward.dpo_nll_weight must be a number >= 0, got {self.dpo_nll_weight}")
        elif self.objective != "dpo" and self.dpo_nll_weight:
            problems.append(
                f"reward.dpo_nll_weight={self.dpo_nll_weight} applies to reward.objective=dpo only (got "
                f"{self.objective}); set reward.dpo_nll_weight=0"
            )
        if self.objective == "dpo" and self.margin:
            problems.append("reward.margin applies to objective=bradley_terry only; set reward.margin=false for dpo")
        for k in (
            "on_policy_pairs",
            "batch_size",
            "grad_accum",
            "save_steps",
            "save_total_limit",
            "logging_steps",
            "norm_samples",
            "norm_max_new_tokens",
        ):
            if getattr(self, k) < 1:
                problems.append(f"reward.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("max_length", "eval_steps"):
            if getattr(self, k) < 0:
                problems.append(f"reward.{k} must be >= 0, got {getattr(self, k)}")
        if self.lr <= 0:
            problems.append(f"reward.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"reward.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            problems.append(f"reward.weight_decay must be >= 0, got {self.weight_decay}")
        sched = _scheduler_problem("reward", self.lr_scheduler, None)
        if sched:
            problems.append(sched)
        if self.max_steps < 1 and self.max_steps != -1:
            problems.append(f"reward.max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            problems.append(f"reward.epochs must be > 0, got {self.epochs}")
        if problems:
            raise ConfigError("; ".join(problems))
