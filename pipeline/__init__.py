"""An end-to-end RLHF pipeline: from-scratch GPT -> pretrain -> SFT -> reward model -> PPO -> HF export."""

__version__ = "0.1.0"
