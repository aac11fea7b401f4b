"""Fake upstream artifacts for export/chat/report tests: a tiny BPE tokenizer with the chat tokens and template of
the contract, and a tiny GPT2LMHeadModel, written as done stages (manifests with the current fingerprints)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.config import RunConfig, load_config
from pipeline.lineage import all_fingerprints, stage_inputs
from pipeline.runs import StageDir

from . import _METRICS as _STAGE_METRICS

SPECIAL = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>"
    "{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TEXT = "What is 12 + 7? 19. Reverse the word apple: elppa. Hello, who are you? I am a small model. " * 20


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_TEXT], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIAL[2:],
    )  # fmt: skip
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_model(tok: PreTrainedTokenizerFast, seed: int = 0, n_positions: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=n_positions, vocab_size=len(tok),
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


_METRICS = {**_STAGE_METRICS, "tokenizer": {"vocab_size": 320}}  # the fake stages' metrics; this tokenizer has 320


def make_fake_run(
    root: Path, *overrides: str, stages: tuple[str, ...] = ("tokenizer", "pretrain", "sft", "reward", "ppo")
) -> RunConfig:
    """Write done stages (different random weights per model stage) under ``root``; returns the config."""
    cfg = load_config(None, [f"run.root={root}", *overrides])
    fps = all_fingerprints(cfg)
    tok = make_tokenizer()
    for i, stage in enumerate(stages):
        sd = StageDir.of(cfg.run_dir, stage)
        sd.artifact.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(sd.artifact)
        if stage in ("pretrain", "sft", "ppo"):
            make_model(tok, seed=i).save_pretrained(sd.artifact)
        if stage == "reward":
            (sd.artifact / "reward_stats.json").write_text('{"mean": 0.0, "std": 1.0, "n": 8}')
        for step in (1, 2):
            sd.append_metrics({"step": step, "train/loss": 3.0 / step, "val/loss": 3.1 / step})
        inputs = {u: fps[u] for u in stage_inputs(cfg, stage)}
        sd.write_manifest(fps[stage], inputs, {}, dict(_METRICS[stage]), 1.0 + i)
    return cfg
