"""Held-out evaluation of PPO: greedy answers of the policy and of the SFT model, scored by the reward model and
the task checker, and the KL of sampled answers to the reference; with a DPO (implicit) reward, the DPO policy's
greedy answers to the same prompts (a control PPO must beat, ``pipeline/analysis/controls.py``).

    metrics, answers = evaluate_held_out(trainer, tokenizer, held_out_records, held_out_prompt_ids)
    dpo = evaluate_dpo_policy(scorer, held_out_records, max_new_tokens=64, batch_size=32)
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import gather_object

from pipeline.analysis.checker import checker_accuracy_ci
from pipeline.lm import generate, generate_responses, left_pad

from .trainer import PPOTrainer

__all__ = ["evaluate_prompts", "evaluate_held_out", "evaluate_dpo_policy"]


@torch.no_grad()
def evaluate_prompts(trainer: PPOTrainer, prompts: list[list[int]]) -> list[dict[str, Any]]:
    """Greedy answers of the policy and of the reference (SFT) model to this process's held-out prompts,
    both scored, and the KL of sampled policy responses against the reference.

    Under ZeRO-3 every process must pass the same number of prompts (forwards are collective).

    Returns:
        Per prompt: ``policy_ids``/``sft_ids`` (response token ids, stop token excluded),
        ``policy_score``/``sft_score`` (raw scores), ``kl`` (sum over the sampled response's tokens)
        and ``policy_ended``.
    """
    c = trainer.cfg
    out: list[dict[str, Any]] = []
    ref_dev = next(trainer.ref_model.parameters()).device
    for start in range(0, len(prompts), c.rollout_batch_size):
        q, qm = left_pad(prompts[start : start + c.rollout_batch_size], trainer.pad_id, trainer.device)
        with trainer._generation_model() as policy:
            r, rm, ended = generate(policy, q, qm, c.max_new_tokens, trainer.stop_ids, trainer.pad_id, do_sample=False)
            sampled = trainer.sample(policy, q, qm)
            rs, rms = sampled.ids, sampled.mask
        r0, rm0, _ = generate(
            trainer.ref_model,
            q.to(ref_dev),
            qm.to(ref_dev),
            c.max_new_tokens,
            trainer.stop_ids,
            trainer.pad_id,
            do_sample=False,
        )
        r0, rm0 = r0.to(trainer.device), rm0.to(trainer.device)
        lp, _, _ = trainer.model(q, qm, rs, rms, temperature=c.temperature)  # the exact forward, not the sampling's
        assert lp is not None
        ref_lp = trainer.ref_logprobs(q, qm, rs, rms)
        kl = ((lp.float() - ref_lp) * rms).sum(1)
        scores, sft_scores = trainer.score(q, qm, r, rm), trainer.score(q, qm, r0, rm0)
        for i in range(len(q)):
            out.append(
                {
                    "policy_ids": _answer_ids(r[i], rm[i], trainer.stop_ids),
                    "sft_ids": _answer_ids(r0[i], rm0[i], trainer.stop_ids),
                    "policy_score": scores[i].item(),
                    "sft_score": sft_scores[i].item(),
                    "kl": kl[i].item(),
                    "policy_ended": bool(ended[i]),
                }
            )
    return out


def evaluate_held_out(
    trainer: Any, tokenizer: Any, records: list[dict[str, Any]], prompt_ids: list[list[int]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy policy vs SFT answers on held-out prompts, scored by the reward model and the task checker.

    Every process answers an equal share of the prompts; results are gathered on all processes.

    Returns:
        ``(metrics, answers)``: ``reward_mean``, ``sft_reward_mean``, ``kl``, ``checker_accuracy``,
        ``sft_checker_accuracy`` (each with ``_ci95``, the 95% Wilson interval [low, high]), ``ended`` and
        ``n_eval``; per prompt ``prompt``, ``task``, ``answer``
        (the record's ground truth, None without a checker), ``sft``, ``sft_score``, ``policy``, ``policy_score``.
    """
    acc = trainer.accelerator
    per = len(prompt_ids) // acc.num_processes
    if per == 0:
        return {}, []
    lo = acc.process_index * per
    local = evaluate_prompts(trainer, prompt_ids[lo : lo + per])
    results = gather_object(local) if acc.num_processes > 1 else local
    records = records[: len(results)]
    policy_text = [tokenizer.decode(r["policy_ids"], skip_special_tokens=True) for r in results]
    sft_text = [tokenizer.decode(r["sft_ids"], skip_special_tokens=True) for r in results]
    n = len(results)
    acc, ci95, _ = checker_accuracy_ci(records, policy_text)
    sft_acc, sft_ci95, _ = checker_accuracy_ci(records, sft_text)
    metrics = {
        "reward_mean": sum(r["policy_score"] for r in results) / n,
        "sft_reward_mean": sum(r["sft_score"] for r in results) / n,
        "kl": sum(r["kl"] for r in results) / n,
        "checker_accuracy": acc,
        "checker_accuracy_ci95": ci95,
        "sft_checker_accuracy": sft_acc,
        "sft_checker_accuracy_ci95": sft_ci95,
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


@torch.no_grad()
def evaluate_dpo_policy(
    scorer: Any, records: list[dict[str, Any]], max_new_tokens: int, batch_size: int
) -> dict[str, Any]:
    """The DPO-trained LM of an implicit reward (``scorer.model``) answering ``records`` greedily, by the checker.

    Call on one process: generation is not synchronised across processes (``synced_gpus=False``, also under
    ZeRO-3, whose frozen reward models are whole), and the global RNG state is restored afterwards, although greedy
    decoding draws nothing from it.

    Args:
        scorer: an implicit reward (``kind == "implicit"``): ``.model`` and ``.tokenizer``.
        records: held-out prompt records (``prompt``, and ``task``/``answer`` where a checker exists).
        max_new_tokens: answer length limit (``ppo.max_new_tokens``, as PPO's own answers).
        batch_size: prompts per ``generate`` call.

    Returns:
        ``dpo_policy_checker_accuracy`` and its ``_ci95`` (None without a checker), and ``dpo_policy_n_checked``
        (the prompts with a checker).
    """
    device = next(scorer.model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        responses = generate_responses(scorer.model, scorer.tokenizer, [r["prompt"] for r in records],
                                       max_new_tokens, batch_size=batch_size, synced_gpus=False)  # fmt: skip
    acc, ci95, n = checker_accuracy_ci(records, responses)
    return {"dpo_policy_checker_accuracy": acc, "dpo_policy_checker_accuracy_ci95": ci95, "dpo_policy_n_checked": n}


def _answer_ids(ids: torch.Tensor, mask: torch.Tensor, stop_ids: list[int]) -> list[int]:
    return [t for t in ids[mask.bool()].tolist() if t not in stop_ids]
