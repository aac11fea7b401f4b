"""Config sections of the from-scratch GPT (``model:``) and of its pretraining (``pretrain:``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .schema import ConfigError

__all__ = ["ModelConfig", "PretrainConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """The from-scratch GPT (nanoGPT / GPT-2 shapes)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    vocab_size: int = 0
    """0: the tokenizer's vocabulary size, rounded up to a multiple of ``pad_vocab_multiple``."""
    pad_vocab_multiple: int = 64
    """Round the embedding table up (GPT-2's 50257 -> 50304 is ~faster on GPUs)."""
    dropout: float = 0.0
    bias: bool = True
    """Biases in Linear and LayerNorm layers (GPT-2: True). Without, export writes zero biases."""

    def __post_init__(self) -> None:
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        for k in ("n_layer", "n_head", "n_embd", "block_size", "pad_vocab_multiple"):
            if getattr(self, k) < 1:
                problems.append(f"model.{k} must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class PretrainConfig:
    init_from: str = ""
    """'' = random init; or a GPT-2-format HF model dir/name to continue from."""
    batch_size: int = 16
    """Micro-batch per process (sequences)."""
    block_size: int = 0
    """Sequence length; 0 = model.block_size. Larger than model.block_size is an error."""
    grad_accum: int = 1
    max_steps: int = 600
    lr: float = 1e-3
    min_lr: float = 1e-4
    """Cosine decays to this (nanoGPT: lr/10)."""
    warmup_steps: int = 50
    weight_decay: float = 0.1
    """Applied to matrices only (GPT-3 paper / nanoGPT)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 autocast on GPUs that support it, float32 on CPU."""
    compile: bool = False
    eval_interval: int = 100
    eval_iters: int = 20
    log_interval: int = 10
    ckpt_interval: int = 100
    keep_checkpoints: int = 2
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 64
    num_threads: int = 0
    """torch intra-op threads (0: torch's default)."""

    def __post_init__(self) -> None:
        problems = []
        for k in (
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_iters",
            "log_interval",
            "ckpt_interval",
            "keep_checkpoints",
        ):
            if getattr(self, k) < 1:
                problems.append(f"pretrain.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("warmup_steps", "grad_clip", "sample_tokens"):  # grad_clip 0: no clipping; sample_tokens 0: none
            if getattr(self, k) < 0:
                problems.append(f"pretrain.{k} must be >= 0, got {getattr(self, k)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            problems.append(
                f"pretrain.lr/min_lr must satisfy 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})"
            )
        if problems:
            raise ConfigError("; ".join(problems))
