"""Building blocks of the PPO stage: load the models, render prompts, read the reward statistics, save the artifact.

``stages/ppo.py`` reads as a sequence of these calls; each is usable on its own (bench, tests, notebooks).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

from pipeline.data.records import MAX_CHARS_PER_TOKEN, clip_turns, text_chars
from pipeline.lm import stop_token_ids
from pipeline.reward import RewardScorer, load_scorer
from pipeline.runs import StageError
from pipeline.training import without_tied_copies

__all__ = [
    "PPOModels",
    "load_models",
    "load_reward_stats",
    "render_prompts",
    "save_policy",
]

log = logging.getLogger(__name__)


@dataclass
class PPOModels:
    policy: nn.Module
    value_model: nn.Module | None
    """None without a critic (``ppo.advantage=group``)."""
    ref_model: nn.Module
    scorer: RewardScorer
    """The frozen reward model (a scalar head or DPO's implicit reward)."""
    tokenizer: Any
    stop_ids: list[int]
    pad_id: int


def load_models(
    policy_from: str | Path, reward_from: str | Path, trust_remote_code: bool = False, critic: bool = True
) -> PPOModels:
    """Policy and frozen reference from the SFT model; the reward model as a scorer, and the value model (when
    ``critic``) from the reward model's network, or, for a scorer without a scalar head (DPO's implicit reward),
    from the policy with a new scalar head.

    Raises:
        StageError: a model does not load, has no chat tokenizer, the critic does not load, or the reward model's
            vocabulary differs from the policy's (it would score other tokens than the policy wrote).
    """
    kw = {"trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(policy_from), **kw)
        policy = AutoModelForCausalLM.from_pretrained(str(policy_from), **kw)
        ref = AutoModelForCausalLM.from_pretrained(str(policy_from), **kw)
    except (OSError, ValueError) as e:
        raise StageError(f"ppo: cannot load the policy from {policy_from}: {e}") from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise StageError(f"ppo: the tokenizer at {policy_from} has no chat template (prompts are chat turns)")
    emb = policy.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > emb:
        raise StageError(f"ppo: tokenizer has {len(tokenizer)} tokens but the policy's embedding only {emb}")
    stops = stop_token_ids(tokenizer, policy)
    if not stops:
        raise StageError(f"ppo: the tokenizer at {policy_from} has no <|end|>/<|endoftext|>/eos token to stop at")
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1])
    try:
        scorer = load_scorer(reward_from, trust_remote_code, stop_ids=stops, pad_id=pad_id)
    except (OSError, ValueError) as e:
        raise StageError(f"ppo: cannot load the reward model from {reward_from}: {e}") from None
    if scorer.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise StageError(
            f"ppo: the reward model's tokenizer ({reward_from}) differs from the policy's ({policy_from}); "
            "PPO scores the policy's token ids directly, so both must share one tokenizer"
        )
    value = None
    if critic:
        # The value model starts from the reward model's network (InstructGPT); a scorer without a scalar head
        # (DPO's implicit reward) has none, so it starts from the policy with a new scalar head (OpenRLHF's
        # critic can start from the SFT model too), which ppo.critic_warmup_steps then trains first.
        value_from = reward_from if scorer.trains_critic else policy_from
        if not scorer.trains_critic:
            log.info("ppo: the reward model (%s) has no scalar head: the value model starts from the policy "
                     "(%s) with a new scalar head", scorer.kind, policy_from)  # fmt: skip
        try:
            value = AutoModelForSequenceClassification.from_pretrained(str(value_from), num_labels=1, **kw)
        except (OSError, ValueError) as e:
            raise StageError(f"ppo: cannot start the value model from {value_from}: {e}") from None
        if value.config.pad_token_id is None:
            value.config.pad_token_id = pad_id
    return PPOModels(policy, value, ref, scorer, tokenizer, stops, pad_id)


def load_reward_stats(reward_from: str | Path) -> dict[str, float]:
    """``reward_stats.json`` beside the reward model ({"mean", "std", "n"}); mean 0, std 1 when absent."""
    path = Path(reward_from) / "reward_stats.json"
    if not path.is_file():
        log.warning("ppo: %s not found: rewards are not centred (mean 0, std 1)", path)
        return {"mean": 0.0, "std": 1.0, "n": 0}
    try:
        stats = json.loads(path.read_text())
        return {"mean": float(stats["mean"]), "std": float(stats["std"]), "n": int(stats.get("n", 0))}
    except (ValueError, KeyError, TypeError) as e:
        raise StageError(f"{path}: expected {{'mean': float, 'std': float, 'n': int}} ({e})") from None


def render_prompts(tokenizer: Any, records: list[dict[str, Any]], max_prompt_length: int) -> list[list[int]]:
    """Token ids of each record's ``messages`` through the chat template with the generation prompt.

    A prompt longer than ``max_prompt_length`` keeps its last tokens (the assistant header stays), with a warning.
    One of more than ``MAX_CHARS_PER_TOKEN`` characters per token of the limit is first cut to that many characters
    of its end, so that a huge record is never tokenised whole.
    """
    out, cut = [], 0
    max_chars = MAX_CHARS_PER_TOKEN * max_prompt_length
    for rec in records:
        messages = rec["messages"]
        far_over = text_chars(messages) > max_chars
        if far_over:
            messages = clip_turns(messages, max_chars, keep="end")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length or far_over:
            ids, cut = ids[-max_prompt_length:], cut + 1
        out.append(ids)
    if cut:
        log.warning(
            "ppo: %d of %d prompts were cut to their last ppo.max_prompt_length=%d tokens",
            cut,
            len(records),
            max_prompt_length,
        )
    return out


def save_policy(trainer: Any, tokenizer: Any, stop_ids: list[int], pad_id: int, out_dir: Path) -> None:
    """Write the aligned policy (safetensors), tokenizer and generation_config to ``out_dir``; call on every process."""
    state = trainer.policy_state_dict()  # gathers ZeRO-3 shards: every process takes part
    if not trainer.accelerator.is_main_process:
        return
    policy = trainer.unwrapped.policy
    out_dir.mkdir(parents=True, exist_ok=True)
    policy.generation_config = GenerationConfig(
        eos_token_id=list(stop_ids), pad_token_id=pad_id, bos_token_id=getattr(policy.config, "bos_token_id", None)
    )
    policy.save_pretrained(out_dir, state_dict=without_tied_copies(policy, state), safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
