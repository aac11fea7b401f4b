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
    """Must stay 0 (off): PPO's ratio and KL use log-probs of the full (temperature-scaled) distribution, so
    sampling from a top-k-truncated one would make the behaviour policy differ from the one whose log-probs
    are used. Kept as a key so that setting it is refused with this reason, not as an unknown key."""
    top_p: float = 1.0
    """Must stay 1 (off), for the same reason as ``top_k``."""
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
    """Learning rate of the value model's parameter group (AdamW); 0: the same as ``lr``. Default: one rate
    for policy and value, as lm-human-preferences (Ziegler et al. 2019) and TRL's PPOTrainer, which train both
    with one optimizer; OpenRLHF's example scripts give their separate critic a higher one (9e-6 against 5e-7)."""
    critic_warmup_steps: int = 0
    """The first this many PPO steps train only the value model: the policy's loss term is multiplied by 0
    (its weights stay bit-identical), so a critic initialised from the reward model first learns the policy's
    returns before its advantages move the policy. 0: off (new behaviour is opt-in); OpenRLHF's
    ``--freezing_actor_steps`` (default off). Needs a critic (not ``advantage=group``) and fewer than
    ``steps``; the learning-rate schedule counts these steps too."""
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
    """Weight of the clipped value loss in the joint loss ``policy_loss + vf_coef * value_loss - entropy_coef *
    entropy``. Policy and value model are separate networks here, so it only scales the value model's gradient;
    AdamW is nearly invariant to that scale, so it acts mostly through ``grad_clip`` (which clips the joint
    norm) and ``adam_eps``. Default 0.1: lm-human-preferences (Ziegler et al. 2019) and TRL's PPOConfig."""
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
    """Subtracted from the score of a response that does not end with the end-of-turn token (it reached
    ``max_new_tokens``, or stopped at ``<|endoftext|>``/eos instead), after normalisation and ``reward_clip``:
    with ``reward_norm=standardize`` it is in the reward model's standard deviations on SFT samples. Default
    1.0: TRL's ``missing_eos_penalty`` (subtracted, as here); Huang et al. 2024 ("The N+ implementation
    details of RLHF with PPO") set such a response's score to -1 on a reward normalised the same way."""
    reference_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the frozen reference and reward models (bf16 halves their memory; an implicit reward model's
    two LMs too)."""
    frozen_device: Literal["auto", "cpu"] = "auto"
    """auto: the frozen models live on the training device; cpu: offloaded to CPU memory and run there."""
    reward_norm: Literal["center", "standardize", "none"] = "standardize"
    """How the scalar reward model's raw score is normalised with its reward_stats.json (its scores on SFT
    samples): standardize, (score - mean) / std; center, score - mean (InstructGPT: the SFT policy's rewards
    have mean 0); none, left raw. The value model's outputs get the same shift and scale. Default standardize:
    Ziegler et al. 2019 (lm-human-preferences) normalise the reward model to mean 0 and variance 1 on the
    initial policy's samples; OpenRLHF's and TRL RLOO's ``normalize_reward`` standardise (opt-in). It does not
    apply to an implicit (DPO) reward or the checker, whose rewards are used as they are (the stage logs so)."""
    reward_clip: float = 0.0
    """Clip the normalised score to ``[-reward_clip, reward_clip]`` before ``missing_eos_penalty`` (a guard
    against a learned reward's outliers); 0: off (new behaviour is opt-in). OpenRLHF's
    ``--reward_clip_range`` (default ±10) and TRL RLOO's ``reward_clip_range`` (10, on normalised rewards)."""
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
        if self.top_k != 0 or self.top_p != 1.0:
            problems.append(
                f"ppo.top_k={self.top_k} / ppo.top_p={self.top_p}: PPO samples from the full distribution "
                "(ppo.top_k=0, ppo.top_p=1); its ratio and KL use the full distribution's log-probs, so sampling "
                "from a truncated one would train on a behaviour policy other than the one the log-probs describe. "
                "Use ppo.temperature to sharpen sampling"
            )
        if self.critic_warmup_steps < 0:
            problems.append(f"ppo.critic_warmup_steps must be >= 0, got {self.critic_warmup_steps}")
        elif self.critic_warmup_steps and self.advantage == "group":
            problems.append("ppo.critic_warmup_steps needs a critic; ppo.advantage=group has none (set it to 0)")
        elif self.critic_warmup_steps >= self.steps >= 1:
            problems.append(
                f"ppo.critic_warmup_steps={self.critic_warmup_steps} must be < ppo.steps={self.steps} "
                "(the policy would never train)"
            )
        if self.reward_clip < 0:
            problems.append(f"ppo.reward_clip must be >= 0 (0: off), got {self.reward_clip}")
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
