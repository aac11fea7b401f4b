"""Config sections of the from-scratch GPT (``model:``) and of its pretraining (``pretrain:``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..provenance import deepspeed_launch
from .schema import ConfigError, to_dict

__all__ = ["ModelConfig", "PretrainConfig", "MUON_UNDER_ZERO"]

MUON_UNDER_ZERO = (
    "pretrain.optimizer=muon cannot run under DeepSpeed ZeRO (LAUNCH=zero2|zero3): ZeRO hands the optimizer flat "
    "1-D shards of the parameters, and Muon orthogonalises whole 2-D matrices. Use LAUNCH=ddp (Muon then runs on "
    "every process after the gradient all-reduce) or LAUNCH=cpu, or set pretrain.optimizer=adamw."
)
"""Why ``optimizer=muon`` is refused under a ZeRO launch of the pretrain stage: by the orchestrator before it launches
anything, by the pretrain stage process before it touches its folder (:meth:`PretrainConfig.launch_problems`), and
again by ``pipeline.pretrain.train`` for any other caller. Other stages of a config with ``optimizer: muon`` run under
ZeRO as usual (``make sft LAUNCH=zero2`` on the default config)."""

_OPTIMIZER_KEYS = ("optimizer", "muon_lr", "muon_momentum", "muon_weight_decay", "muon_momentum_warmup_steps")
"""Keys added after the stage fingerprints were pinned; none changes an AdamW run, so the pretrain fingerprint counts
them only with ``optimizer=muon`` (:meth:`PretrainConfig.fingerprint_fields`)."""


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
    """AdamW's decay, applied to matrices and embeddings only (GPT-3 paper / nanoGPT)."""
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW for every parameter (nanoGPT). muon: torch.optim.Muon for the 2-D weight matrices inside the
    transformer blocks (attention qkv/projection, MLP in/out) and AdamW (``lr``, betas, ``weight_decay``) for the rest:
    token and position embeddings (the LM head is tied to the token embedding), LayerNorms and biases, as
    modded-nanogpt does. Both follow the same warmup + cosine schedule. Refused under DeepSpeed ZeRO."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (Keller Jordan's Muon default); the schedule scales it exactly as it scales ``lr``
    (warmup, then cosine to ``muon_lr * min_lr / lr``). Muon's "original" per-matrix scaling sqrt(max(1, rows/cols))
    applies on top."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum (Keller Jordan's Muon and modded-nanogpt: 0.95)."""
    muon_weight_decay: float = 0.0
    """Muon's decoupled weight decay (Keller Jordan's Muon: 0; torch's default 0.1 decays lr * 0.1 per step)."""
    muon_momentum_warmup_steps: int = 0
    """Muon's momentum rises linearly from 0.85 to ``muon_momentum`` over this many steps (modded-nanogpt: 300);
    0: ``muon_momentum`` from the first step."""
    grad_clip: float = 1.0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 autocast on GPUs that support it; on a CPU, the rule of ``pipeline.precision.resolve_dtype`` for
    this stage: bf16 on CPUs with AVX512-BF16 (measured faster to the same loss) or AMX, float32 on other CPUs and
    under DeepSpeed on a CPU. The stage logs the choice and records it in its manifest (``dtype``)."""
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
            "eval_interval",
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
        if self.num_threads < 0:
            problems.append(f"pretrain.num_threads must be >= 0 (0: torch's default), got {self.num_threads}")
        if self.weight_decay < 0:
            problems.append(f"pretrain.weight_decay must be >= 0, got {self.weight_decay}")
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                problems.append(f"pretrain.{k} must be in [0, 1), got {getattr(self, k)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            problems.append(
                f"pretrain.lr/min_lr must satisfy 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})"
            )
        problems += self._muon_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _muon_problems(self) -> list[str]:
        problems = []
        if self.muon_lr <= 0:
            problems.append(f"pretrain.muon_lr must be > 0, got {self.muon_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            problems.append(f"pretrain.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.muon_weight_decay < 0:
            problems.append(f"pretrain.muon_weight_decay must be >= 0, got {self.muon_weight_decay}")
        if self.muon_momentum_warmup_steps < 0:
            problems.append(f"pretrain.muon_momentum_warmup_steps must be >= 0, got {self.muon_momentum_warmup_steps}")
        return problems

    def launch_problems(self, deepspeed: bool | None = None) -> list[str]:
        """What stops pretraining under this launch (``deepspeed``: default, this process's launch): Muon under ZeRO.
        Asked only where pretraining runs, since the other stages do not use this section's optimizer.

        >>> PretrainConfig(optimizer="muon").launch_problems(deepspeed=True) == [MUON_UNDER_ZERO]
        True
        >>> PretrainConfig(optimizer="muon").launch_problems(deepspeed=False), PretrainConfig().launch_problems(True)
        ([], [])
        """
        zero = deepspeed_launch() if deepspeed is None else deepspeed
        return [MUON_UNDER_ZERO] if self.optimizer == "muon" and zero else []

    def fingerprint_fields(self) -> dict[str, Any]:
        """The values the pretrain stage's fingerprint hashes: every field, except the optimizer keys while
        ``optimizer=adamw`` (they change nothing then), so AdamW runs keep the fingerprints they had before those
        keys existed; with ``optimizer=muon`` every one of them counts.

        >>> adamw, muon = PretrainConfig().fingerprint_fields(), PretrainConfig(optimizer="muon").fingerprint_fields()
        >>> "muon_lr" in adamw, "muon_lr" in muon
        (False, True)
        """
        fields = to_dict(self)
        if self.optimizer == "adamw":
            for k in _OPTIMIZER_KEYS:
                del fields[k]
        return fields
