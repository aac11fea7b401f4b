"""Building blocks of the PPO stage: load the four models, render prompts, evaluate, save the artifact.

``stages/ppo.py`` reads as a sequence of these calls; each is usable on its own (bench, tests, notebooks).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.runs import StageError

__all__ = [
    "make_accelerator",
    "PPOModels",
    "load_models",
    "load_reward_stats",
    "implicit_score_fn",
    "render_prompts",
    "CheckerReward",
    "evaluate_held_out",
    "save_policy",
    "plot_curves",
]

log = logging.getLogger(__name__)


def make_accelerator() -> Any:
    """An ``Accelerator`` that is really distributed under every launch config, GPUs or not.

    Without a GPU, accelerate turns a multi-process ``MULTI_GPU`` launch into N independent
    single processes, and DeepSpeed picks no communication backend: there we ask for gloo
    (``MULTI_CPU`` for DDP; gloo as DeepSpeed's backend under ZeRO).
    """
    import os

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Accelerator()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    return Accelerator(cpu=True)


@dataclass
class PPOModels:
    policy: nn.Module
    value_model: nn.Module | None
    """None without a critic (``ppo.advantage=group``)."""
    ref_model: nn.Module
    reward_model: Any
    """A sequence classifier, or an :class:`~pipeline.implicit_reward.ImplicitReward`."""
    tokenizer: Any
    stop_ids: list[int]
    pad_id: int


def load_models(
    policy_from: str | Path, reward_from: str | Path, trust_remote_code: bool = False, critic: bool = True
) -> PPOModels:
    """Policy and frozen reference from the SFT model; value model (when ``critic``) and frozen reward model from
    the reward model. An implicit (DPO) reward model (``reward.objective=dpo``) loads as
    :class:`~pipeline.implicit_reward.ImplicitReward`, for PPO's ``score_fn``; it cannot start a value model.

    Raises:
        StageError: a model does not load, has no chat tokenizer, or the reward model's vocabulary
            differs from the policy's (it would score other tokens than the policy wrote).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.evaluate import stop_token_ids
    from pipeline.implicit_reward import is_implicit_reward_dir, load_implicit_reward

    kw = {"trust_remote_code": trust_remote_code}
    implicit = is_implicit_reward_dir(reward_from)
    if implicit and critic:
        raise StageError(
            f"ppo: the reward model at {reward_from} is an implicit (DPO) reward model (reward.objective=dpo): it has "
            "no scalar head to start a value model from; set ppo.advantage=group (a baseline from several samples)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(policy_from), **kw)
        policy = AutoModelForCausalLM.from_pretrained(str(policy_from), **kw)
        ref = AutoModelForCausalLM.from_pretrained(str(policy_from), **kw)
        value = (
            AutoModelForSequenceClassification.from_pretrained(str(reward_from), num_labels=1, **kw) if critic else None
        )
        if implicit:
            reward: Any = load_implicit_reward(reward_from, trust_remote_code)[0]
        else:
            reward = AutoModelForSequenceClassification.from_pretrained(str(reward_from), num_labels=1, **kw)
    except (OSError, ValueError) as e:
        raise StageError(f"ppo: cannot load the models (policy {policy_from}, reward {reward_from}): {e}") from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise StageError(f"ppo: the tokenizer at {policy_from} has no chat template (prompts are chat turns)")
    try:
        rm_tok = AutoTokenizer.from_pretrained(str(reward_from), **kw)
    except (OSError, ValueError):
        rm_tok = None
    if rm_tok is not None and rm_tok.get_vocab() != tokenizer.get_vocab():
        raise StageError(
            f"ppo: the reward model's tokenizer ({reward_from}) differs from the policy's ({policy_from}); "
            "PPO scores the policy's token ids directly, so both must share one tokenizer"
        )
    emb = policy.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > emb:
        raise StageError(f"ppo: tokenizer has {len(tokenizer)} tokens but the policy's embedding only {emb}")
    stops = stop_token_ids(tokenizer, policy)
    if not stops:
        raise StageError(f"ppo: the tokenizer at {policy_from} has no <|end|>/<|endoftext|>/eos token to stop at")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    for m in (value, None if implicit else reward):
        if m is not None and m.config.pad_token_id is None:
            m.config.pad_token_id = pad_id
    return PPOModels(policy, value, ref, reward, tokenizer, stops, int(pad_id))


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
    """
    out, cut = [], 0
    for rec in records:
        text = tokenizer.apply_chat_template(rec["messages"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
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


class CheckerReward:
    """A programmatic PPO reward (``ppo.reward=checker``): the task checker's partial-credit score in [0, 1]
    (:func:`pipeline.data.tasks.score_answer`) of each response to the record its prompt was rendered from.

    Args:
        tokenizer: decodes responses (special tokens dropped, as in evaluation).
        prompt_ids: rendered prompt ids of every record that may be scored (training and held-out).
        records: the matching records, each with ``task`` and ``answer``.

    Raises:
        StageError: a record without ``task``/``answer`` (no checker), named by its id or position.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[list[int]], records: list[dict[str, Any]]) -> None:
        from pipeline.evaluate import has_checker

        for i, rec in enumerate(records):
            if not has_checker(rec):
                raise StageError(
                    f"ppo.reward=checker: prompt record {rec.get('id', i)!r} has no 'task'/'answer' fields, so no "
                    "checker can score it; use the generated tasks (dataset source 'default') or ppo.reward=model"
                )
        self.tokenizer = tokenizer
        self.by_prompt = {tuple(ids): rec for ids, rec in zip(prompt_ids, records)}

    def __call__(self, query_ids: Any, query_mask: Any, response_ids: Any, response_mask: Any) -> Any:
        import torch

        from pipeline.data.tasks import score_answer

        out = []
        for q, qm, r, rm in zip(query_ids, query_mask, response_ids, response_mask):
            key = tuple(q[qm.bool()].tolist())
            if key not in self.by_prompt:
                raise StageError(
                    "ppo.reward=checker: a rollout prompt is not among the scored records (internal error)"
                )
            text = self.tokenizer.decode(r[rm.bool()].tolist(), skip_special_tokens=True)
            out.append(score_answer(self.by_prompt[key], text))
        return torch.tensor(out, dtype=torch.float32)


def implicit_score_fn(reward: Any, stop_ids: list[int], pad_id: int) -> Any:
    """A PPO ``score_fn`` of an :class:`~pipeline.implicit_reward.ImplicitReward`: the response gets its
    end-of-turn token when generation stopped without one, as the reward model's training pairs had it."""
    from pipeline.rl.rollout import ensure_end_token

    def score(query_ids: Any, query_mask: Any, response_ids: Any, response_mask: Any) -> Any:
        ids, mask = ensure_end_token(response_ids, response_mask, stop_ids, pad_id)
        return reward.score_ids(query_ids, query_mask, ids, mask)

    return score


def evaluate_held_out(
    trainer: Any, tokenizer: Any, records: list[dict[str, Any]], prompt_ids: list[list[int]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy policy vs SFT answers on held-out prompts, scored by the reward model and the task checker.

    Every process answers an equal share of the prompts; results are gathered on all processes.

    Returns:
        ``(metrics, answers)``: ``reward_mean``, ``sft_reward_mean``, ``kl``, ``checker_accuracy``,
        ``sft_checker_accuracy``, ``ended`` and ``n_eval``; per prompt ``prompt``, ``task``, ``answer``
        (the record's ground truth, None without a checker), ``sft``, ``sft_score``, ``policy``, ``policy_score``.
    """
    from accelerate.utils import gather_object

    from pipeline.evaluate import checker_accuracy

    acc = trainer.accelerator
    per = len(prompt_ids) // acc.num_processes
    if per == 0:
        return {}, []
    lo = acc.process_index * per
    local = trainer.evaluate(prompt_ids[lo : lo + per])
    results = gather_object(local) if acc.num_processes > 1 else local
    records = records[: len(results)]
    policy_text = [tokenizer.decode(r["policy_ids"], skip_special_tokens=True) for r in results]
    sft_text = [tokenizer.decode(r["sft_ids"], skip_special_tokens=True) for r in results]
    n = len(results)
    metrics = {
        "reward_mean": sum(r["policy_score"] for r in results) / n,
        "sft_reward_mean": sum(r["sft_score"] for r in results) / n,
        "kl": sum(r["kl"] for r in results) / n,
        "checker_accuracy": checker_accuracy(records, policy_text),
        "sft_checker_accuracy": checker_accuracy(records, sft_text),
        "ended": sum(r["policy_ended"] for r in results) / n,
        "n_eval": n,
    }
    answers = [
        {
            "prompt": rec.get("prompt", ""),
            "task": rec.get("task"),
            "answer": rec.get("answer"),
            "sft": s,
            "sft_score": round(r["sft_score"], 4),
            "policy": p,
            "policy_score": round(r["policy_score"], 4),
        }
        for rec, r, s, p in zip(records, results, sft_text, policy_text)
    ]
    return metrics, answers


def save_policy(trainer: Any, tokenizer: Any, stop_ids: list[int], pad_id: int, out_dir: Path) -> None:
    """Write the aligned policy (safetensors), tokenizer and generation_config to ``out_dir``; call on every process."""
    from transformers import GenerationConfig

    state = trainer.policy_state_dict()  # gathers ZeRO-3 shards: every process takes part
    if not trainer.accelerator.is_main_process:
        return
    policy = trainer.unwrapped.policy
    out_dir.mkdir(parents=True, exist_ok=True)
    policy.generation_config = GenerationConfig(
        eos_token_id=list(stop_ids), pad_token_id=pad_id, bos_token_id=getattr(policy.config, "bos_token_id", None)
    )
    policy.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def plot_curves(metrics: list[dict[str, Any]], path: Path) -> None:
    """PNG of the PPO curves (reward, KL, entropy, response length) from metrics.jsonl records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("ppo/reward", "reward (centred)"),
        ("ppo/kl", "KL to reference"),
        ("ppo/entropy", "entropy"),
        ("ppo/response_length", "response length"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (key, title) in zip(axes, keys):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
