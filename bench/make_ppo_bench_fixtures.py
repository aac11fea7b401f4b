"""Tiny models and prompts for the PPO throughput comparison (ours against TRL 1.12's PPOTrainer).

Writes, under ``--out`` (default ``runs/trlbench`` of the checkout):

- ``tokenizer/``: a byte-level BPE trained with ``pipeline.tokenizer`` on ``--corpus`` (default: the shared
  ``tinyshakespeare.txt`` beside the checkout, ``../shared/data``; chat template,
  ``<|pad|>``/``<|end|>`` and the other special tokens of the contract);
- ``policy/``: a randomly initialised ``GPT2LMHeadModel`` + the tokenizer files, ``generation_config.json``
  stopping at ``<|end|>``/``<|endoftext|>``;
- ``reward/``: a randomly initialised ``GPT2ForSequenceClassification`` (num_labels=1, pad_token_id set) +
  the tokenizer files + ``reward_stats.json``;
- ``prompts.jsonl``: ``--n-prompts`` short arithmetic questions, ``{"prompt": "What is 12+7?", "task": "add",
  "answer": "19", "id": "..."}`` (the PPO record shape of the contract).

Runs with the project's venv (it imports ``pipeline``); TRL 1.12's venv only loads what it writes::

    .venv/bin/python bench/make_ppo_bench_fixtures.py --out runs/trlbench
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch

from pipeline.config import TokenizerConfig
from pipeline.tokenizer import END_TOKEN, EOT_TOKEN, PAD_TOKEN, load_tokenizer, save_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "trlbench"
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def make_prompts(n: int, seed: int) -> list[dict]:
    """``n`` distinct-ish arithmetic questions with their answers (seeded)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*"])
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        kind = {"+": "add", "-": "sub", "*": "mul"}[op]
        records.append({"prompt": f"What is {a}{op}{b}?", "task": kind, "answer": str(answer), "id": f"bench-{i:05d}"})
    return records


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """The HF tokenizer files as ``save_tokenizer`` wrote them (chat template inside tokenizer_config.json)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, dst / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="text file, documents split at blank lines")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--n-positions", type=int, default=256)
    p.add_argument("--n-prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reward-scale",
        type=float,
        default=10.0,
        help="multiply the random score head (a random RM's scores spread ~0.1; x10 makes the PPO signal visible)",
    )
    args = p.parse_args()

    from transformers import GenerationConfig, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    out = Path(args.out)
    text = Path(args.corpus).read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n") if d.strip()]
    tok_dir = save_tokenizer(
        train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=args.vocab_size), docs),
        out / "tokenizer",
        model_max_length=args.n_positions,
    )
    tok = load_tokenizer(tok_dir)
    end_id, eot_id, pad_id = (tok.convert_tokens_to_ids(t) for t in (END_TOKEN, EOT_TOKEN, PAD_TOKEN))
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=args.n_positions,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=pad_id,
    )

    policy = GPT2LMHeadModel(cfg)
    policy.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=[end_id, eot_id], pad_token_id=pad_id)
    policy.save_pretrained(out / "policy")
    _copy_tokenizer(tok_dir, out / "policy")

    rm_dict = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")}
    rm_cfg = GPT2Config(**rm_dict, num_labels=1)
    reward = GPT2ForSequenceClassification(rm_cfg)
    with torch.no_grad():
        reward.score.weight.mul_(args.reward_scale)
    reward.save_pretrained(out / "reward")
    _copy_tokenizer(tok_dir, out / "reward")
    (out / "reward" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0, "n": 0}) + "\n")

    records = make_prompts(args.n_prompts, args.seed)
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")

    ids = tok.apply_chat_template([{"role": "user", "content": records[0]["prompt"]}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    print(
        json.dumps(
            {
                "out": str(out),
                "vocab": len(tok),
                "policy_params": sum(p.numel() for p in policy.parameters()),
                "reward_params": sum(p.numel() for p in reward.parameters()),
                "n_prompts": len(records),
                "example_prompt_tokens": len(ids),
                "end_id": end_id,
                "eot_id": eot_id,
                "pad_id": pad_id,
            }
        )
    )


if __name__ == "__main__":
    main()
