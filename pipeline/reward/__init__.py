"""The reward model: one :class:`RewardScorer` protocol, its three kinds, and how each is trained.

- :mod:`~pipeline.reward.scorer`: the protocol, the chat rendering every kind scores, a programmatic reward;
- :mod:`~pipeline.reward.scalar`: the classic scalar-head reward model (``reward.objective=bradley_terry``);
- :mod:`~pipeline.reward.implicit`: DPO's implicit reward through the LM head (``reward.objective=dpo``);
- :mod:`~pipeline.reward.checker`: the task checker as a reward (``ppo.reward=checker``);
- :mod:`~pipeline.reward.losses`, :mod:`~pipeline.reward.data`, :mod:`~pipeline.reward.trainers`: training;
- :mod:`~pipeline.reward.on_policy`: pairs on the SFT model's own samples, ranked by the checker;
- :mod:`~pipeline.reward.evaluation`: held-out rankings and the reward statistics PPO normalises with;
- :mod:`~pipeline.reward.build`: the reward stage's set-up (``stages/reward.py`` reads as calls to these).

    scorer = load_scorer("runs/tiny/reward/artifact")   # a ScalarReward or an ImplicitReward
    scorer.score_texts(["What is 2 + 3?"], ["5"])

Nothing here imports :mod:`pipeline.rl`: PPO takes a scorer, the reward side knows nothing of PPO.
"""

from __future__ import annotations

from pathlib import Path

from .checker import CheckerScorer
from .implicit import ImplicitReward, is_implicit_reward_dir, load_implicit_reward
from .scalar import ScalarReward
from .scorer import ProgrammaticReward, RewardScorer, format_for_reward

__all__ = [
    "RewardScorer",
    "ScalarReward",
    "ImplicitReward",
    "CheckerScorer",
    "ProgrammaticReward",
    "format_for_reward",
    "load_scorer",
]


def load_scorer(
    model_dir: str | Path, trust_remote_code: bool = False, stop_ids: list[int] | None = None, pad_id: int | None = None
) -> ScalarReward | ImplicitReward:
    """The reward model in ``model_dir`` as a :class:`RewardScorer`: an :class:`ImplicitReward` when the folder has
    ``implicit_reward.json`` (``reward.objective=dpo``), else a :class:`ScalarReward` (a causal LM folder gets a
    new, randomly initialised head).

    Args:
        model_dir: a reward stage artifact, or any Hugging Face model folder.
        trust_remote_code: passed to ``from_pretrained``.
        stop_ids: ids that end a response, the end-of-turn token first (default: the tokenizer's); PPO passes
            its own so that rollouts are scored with the ids it generates with.
        pad_id: the padding id of PPO's responses (default: the model's or the tokenizer's).

    Raises:
        ValueError: an invalid ``implicit_reward.json``.
        OSError: the folder does not hold a loadable model.
    """
    if is_implicit_reward_dir(model_dir):
        return load_implicit_reward(model_dir, trust_remote_code, stop_ids, pad_id)
    return ScalarReward.load(str(model_dir), trust_remote_code, stop_ids, pad_id)
