"""Test fixtures: tiny upstream artifacts (tokenizer, pretrain/SFT model, reward model) in a run folder.

``make_fake_upstream(run_dir, cfg, "pretrain")`` writes ``<run_dir>/pretrain/artifact`` (a tiny random
GPT2LMHeadModel + the project's chat tokenizer) and a manifest whose fingerprint matches
``pipeline.lineage.all_fingerprints(cfg)``, so the next stage accepts it as done.

The tokenizer is a byte-level BPE trained in-process on a few KB of text, with the project's special
tokens and chat template (from ``pipeline.tokenizer`` when it exists, else the contract's strings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from pipeline.config import RunConfig, to_dict
from pipeline.lineage import all_fingerprints, stage_inputs
from pipeline.runs import StageDir

try:  # the tokenizer engineer's module is the source of truth when present
    from pipeline.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS
except ImportError:  # pragma: no cover - fallback written against the BRIEF.md contract
    SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    CHAT_TEMPLATE = (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
        "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )

__all__ = ["make_tokenizer", "make_tiny_lm", "make_fake_upstream", "DEFAULT_TEXT", "SPECIAL_TOKENS", "CHAT_TEMPLATE"]

DEFAULT_TEXT = (
    "What is 12 plus 30? The answer is 42. Reverse the word apple: elppa. Count the letters in banana: 6. "
    "Spell cat: c a t. Question answer user assistant system the a of to and in is it that for you with on. "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 40 50 60 70 80 90 100. "
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ , . ? ! : ; ' \" ( ) - + = * / "
)


def make_tokenizer(texts: list[str] | None = None, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the project's special tokens and chat template, trained on ``texts`` + DEFAULT_TEXT.

    Uses ``pipeline.tokenizer.train_tokenizer`` (the project's own BPE) when it is importable, else a
    ``tokenizers`` byte-level BPE built to the same contract.
    """
    docs = (texts or []) + [DEFAULT_TEXT] * 4
    try:
        from pipeline.config import TokenizerConfig
        from pipeline.tokenizer import train_tokenizer
    except ImportError:  # pragma: no cover
        return _fallback_tokenizer(docs, vocab_size)
    return train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=vocab_size, min_frequency=1), docs).hf


def _fallback_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|pad|>")],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_tiny_lm(
    tokenizer: PreTrainedTokenizerFast,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 128,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A tiny random GPT2LMHeadModel whose generation stops at ``<|end|>`` / ``<|endoftext|>``."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return model


def make_fake_upstream(
    run_dir: str | Path,
    cfg: RunConfig,
    stage: str,
    tokenizer: PreTrainedTokenizerFast | None = None,
    model: Any | None = None,
    **model_kwargs: Any,
) -> Path:
    """Write a finished ``stage`` (tokenizer, pretrain, sft, ppo or reward) into ``run_dir`` for tests.

    The artifact is a tiny random model (or ``model`` when given) + ``tokenizer`` (default:
    ``make_tokenizer()``); the manifest carries ``all_fingerprints(cfg)[stage]`` and the inputs'
    fingerprints, so a downstream stage run with ``cfg`` sees it as done.

    Returns:
        The artifact directory.
    """
    sd = StageDir.of(run_dir, stage)
    tokenizer = tokenizer or make_tokenizer()
    sd.artifact.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(sd.artifact)
    if stage == "reward":
        lm = model or make_tiny_lm(tokenizer, **model_kwargs)
        config = GPT2Config(**{**lm.config.to_dict(), "num_labels": 1})
        rm = GPT2ForSequenceClassification(config)
        rm.transformer.load_state_dict(lm.transformer.state_dict())
        rm.config.pad_token_id = tokenizer.pad_token_id
        rm.save_pretrained(sd.artifact)
        (sd.artifact / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "n": 0}))
    elif stage != "tokenizer":
        (model or make_tiny_lm(tokenizer, **model_kwargs)).save_pretrained(sd.artifact)
    fps = all_fingerprints(cfg)
    sd.write_manifest(
        fps[stage],
        {up: fps[up] for up in stage_inputs(cfg, stage)},
        {"run": to_dict(cfg.run)},
        metrics={},
        wall_time_s=0.0,
        extra={"fake_upstream": True},
    )
    return sd.artifact
