"""PPO for language models (our own implementation on accelerate / DeepSpeed).

- :mod:`pipeline.rl.gae`: masked statistics, whitening, GAE advantages and returns;
- :mod:`pipeline.rl.losses`: clipped policy and value losses, entropy, log-probs, explained variance;
- :mod:`pipeline.rl.kl`: per-token KL penalty, fixed and adaptive KL controllers;
- :mod:`pipeline.rl.rollout`: the ``Rollout`` record, KV-cache generation, scoring with masks and left padding;
- :mod:`pipeline.rl.trainer`: ``PPOTrainer``, the loop with checkpoints and resume;
- :mod:`pipeline.rl.components`: model loading, prompt rendering, held-out evaluation, artifact saving.

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
