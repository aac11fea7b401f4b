"""Config section of the PPO stage (``ppo:``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .data import DatasetSpec
from .schema import ConfigError

__all__ = ["PPOStageConfig"]


@dataclass(frozen=True)
class PPOStageConfig:
    """PPO (pipeline.rl). Defaults follow "The N implementation details of RLHF with PPO" (Huang et al.)
    and TRL's PPOConfig unless a field says otherwise."""

    policy_from: str = ""
    """'' = the SFT artifact of this run; else an HF causal LM dir (policy and frozen reference)."""
    reward_from: str = ""
    """'' = the reward artifact of this run; else an HF sequence classifier dir (value model and frozen reward model)."""
    reward: Literal["model", "checker"] = "model"
    """What PPO maximises. model: the reward model (RLHF). checker: the generated tasks' partial-credit score
    (``pipeline.data.tasks.score_answer``, in [0, 1]) instead, a verifiable reward: an oracle ablation that
    separates what the reward model limits from what PPO limits. Needs prompts with ``task``/``answer``; the
    value model still starts from the reward model, and held-out scores are then checker scores."""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    max_prompt_length: int = 64
    """Chat-rendered prompt tokens kept (the last ones) per prompt."""
    max_new_tokens: int = 32
    """Response length limit; a response that reaches it without <|end|> gets ``missing_eos_penalty``."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed from logits / temperature (the sampling distribution)."""
    top_k: int = 0
    """0: off."""
    top_p: float = 1.0
    rollout_batch_size: int = 64
    """Responses per PPO step (per process): ``rollout_batch_size / samples_per_prompt`` prompts."""
    samples_per_prompt: int = 1
    """Responses sampled for each prompt of a step (consecutive rows of the rollout)."""
    advantage: Literal["gae", "group"] = "gae"
    """gae: GAE with the value model (InstructGPT). group: a response's return (score minus its summed KL
    penalty) minus the mean return of the prompt's other samples (RLOO, Ahmadian et al. 2024), the same for
    all its tokens; needs ``samples_per_prompt`` >= 2. There is then no value model: no critic to load, train
    or checkpoint."""
    minibatch_size: int = 16
    """Sequences per optimizer step (per process); rollout_batch_size / minibatch_size steps per epoch."""
    ppo_epochs: int = 4
    """Passes over each rollout (InstructGPT/TRL: 4)."""
    steps: int = 100
    """PPO steps (rollout + update)."""
    lr: float = 1e-5
    """Policy learning rate (AdamW, no weight decay)."""
    value_lr: float = 0.0
    """0: same as lr."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    """In PPO steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip of policy + value (0: off)."""
    gamma: float = 1.0
    """GAE discount (1: no discount within a response)."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """PPO ratio clip epsilon (Schulman et al. 2017)."""
    cliprange_value: float = 0.2
    """Value clip around the rollout-time value."""
    vf_coef: float = 0.1
    """Weight of the value loss in the joint loss."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0: entropy is only logged)."""
    kl_coef: float = 0.05
    """Initial per-token KL penalty beta (fixed unless adaptive_kl)."""
    adaptive_kl: bool = False
    """Adapt beta toward kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target per-sequence KL of the adaptive controller (Ziegler et al.: 6 nats)."""
    kl_horizon: int = 10000
    """Samples over which the adaptive controller corrects its error (Ziegler et al.: 10000)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the rollout's response tokens (group advantages, already
    centred per prompt, are only scaled to std 1)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response that never produces the end-of-turn token."""
    reference_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the frozen reference and reward models (bf16 halves their memory; an implicit reward model's
    two LMs too)."""
    frozen_device: Literal["auto", "cpu"] = "auto"
    """auto: the frozen models live on the training device; cpu: offloaded to CPU memory and run there."""
    reward_norm: Literal["center", "standardize", "none"] = "center"
    """How the reward model's raw score is normalised with its reward_stats.json: score - mean
    (InstructGPT: the SFT policy's rewards have mean 0), (score - mean) / std, or left raw. An implicit (DPO)
    reward is used raw (its scale is reward.dpo_beta; group advantages cancel a shift); standardize is then an
    error."""
    forward_batch_size: int = 0
    """Sequences per no-grad scoring forward during rollouts (0: the whole rollout batch at once)."""
    adam_eps: float = 1e-5
    """Adam epsilon ("The N implementation details of RLHF with PPO": 1e-5, not torch's 1e-8)."""
    eval_interval: int = 25
    """Held-out evaluation every this many steps (0: at the end only)."""
    n_eval_prompts: int = 200
    n_samples: int = 5
    """Sample answers (policy and SFT model) recorded in the manifest and the report."""
    ckpt_interval: int = 25
    keep_checkpoints: int = 2
    log_interval: int = 1
    trust_remote_code: bool = False

    @property
    def prompts_per_step(self) -> int:
        """Distinct prompts per PPO step (per process): ``rollout_batch_size / samples_per_prompt``."""
        return self.rollout_batch_size // self.samples_per_prompt

    def __post_init__(self) -> None:
        problems = []
        for k in (
            "max_prompt_length",
            "max_new_tokens",
            "rollout_batch_size",
            "minibatch_size",
            "ppo_epochs",
            "samples_per_prompt",
            "steps",
            "ckpt_interval",
            "keep_checkpoints",
            "log_interval",
            "kl_horizon",
        ):
            if getattr(self, k) < 1:
                problems.append(f"ppo.{k} must be >= 1, got {getattr(self, k)}")
        if self.minibatch_size > self.rollout_batch_size:
            problems.append(
                f"ppo.minibatch_size={self.minibatch_size} exceeds ppo.rollout_batch_size={self.rollout_batch_size}"
            )
        if self.samples_per_prompt >= 1 and self.rollout_batch_size % self.samples_per_prompt:
            problems.append(
                f"ppo.samples_per_prompt={self.samples_per_prompt} must divide "
                f"ppo.rollout_batch_size={self.rollout_batch_size}"
            )
        if self.advantage == "group" and self.samples_per_prompt < 2:
            problems.append(
                f"ppo.advantage=group needs ppo.samples_per_prompt >= 2 (a baseline from the other samples), "
                f"got {self.samples_per_prompt}"
            )
        if self.temperature <= 0:
            problems.append(f"ppo.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"ppo.top_p must be in (0, 1], got {self.top_p}")
        if self.lr <= 0 or self.value_lr < 0:
            problems.append(f"ppo.lr must be > 0 and ppo.value_lr >= 0 (lr={self.lr}, value_lr={self.value_lr})")
        for k in ("gamma", "lam"):
            if not 0 <= getattr(self, k) <= 1:
                problems.append(f"ppo.{k} must be in [0, 1], got {getattr(self, k)}")
        if self.cliprange <= 0 or self.cliprange_value <= 0:
            problems.append("ppo.cliprange and ppo.cliprange_value must be > 0")
        if self.kl_coef < 0 or (self.adaptive_kl and self.kl_target <= 0):
            problems.append(
                f"ppo.kl_coef must be >= 0 and ppo.kl_target > 0 (kl_coef={self.kl_coef}, kl_target={self.kl_target})"
            )
        if self.forward_batch_size < 0 or self.eval_interval < 0 or self.n_eval_prompts < 0:
            problems.append("ppo.forward_batch_size, ppo.eval_interval and ppo.n_eval_prompts must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))
