"""PPO for language models (our own implementation on accelerate / DeepSpeed).

- :mod:`pipeline.rl.gae`: masked statistics, whitening, GAE advantages and returns;
- :mod:`pipeline.rl.losses`: clipped policy and value losses, explained variance;
- :mod:`pipeline.rl.kl`: per-token KL penalty, fixed and adaptive KL controllers;
- :mod:`pipeline.rl.scores`: the sequence score from the scorer's raw score (normalisation, clipping, no-end penalty);
- :mod:`pipeline.rl.rollout`: the ``Rollout`` record and the policy + value model as one trained module;
- :mod:`pipeline.rl.engine`: the optimiser and schedule, DeepSpeed settings, ZeRO-3 gathering for generation,
  the restart of the policy's Adam state after a critic warm-up;
- :mod:`pipeline.rl.trainer`: ``PPOTrainer``, the loop with checkpoints and resume (takes one
  :class:`~pipeline.reward.scorer.RewardScorer`);
- :mod:`pipeline.rl.evaluation`: held-out greedy answers of the policy and the SFT model, scored;
- :mod:`pipeline.rl.components`: model loading, prompt rendering, reward statistics, artifact saving.

Generation, log-probs and padding come from :mod:`pipeline.lm`, the reward from :mod:`pipeline.reward`.

Run it as a stage: ``accelerate launch --config_file configs/accelerate/cpu.yaml -m stages.ppo --config configs/tiny.yaml``.
"""

from .gae import compute_gae, masked_mean, masked_whiten
from .kl import AdaptiveKLController, FixedKLController, compute_rewards
from .losses import policy_loss, value_loss

__all__ = [
    "compute_gae",
    "masked_mean",
    "masked_whiten",
    "compute_rewards",
    "FixedKLController",
    "AdaptiveKLController",
    "policy_loss",
    "value_loss",
]
