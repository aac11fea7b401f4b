"""The reward model: a scalar head on a causal LM backbone, trained on ranked responses.

- :func:`load_reward_model` turns a causal LM dir (the SFT artifact, or any HF model) into
  ``AutoModelForSequenceClassification`` with ``num_labels=1`` and ``config.pad_token_id`` set (the head
  reads the last non-pad token).
- :func:`format_for_reward` / :func:`score_texts` render (prompt, response) as a user turn + an assistant
  turn with the tokenizer's chat template and score them; PPO calls the same two functions, so training
  and RL score identical text.
- Pairwise data trains with TRL's ``RewardTrainer`` unchanged (Bradley-Terry, optional margin).
  K-wise rankings train with :class:`GroupedRewardTrainer`, a ``RewardTrainer`` whose loss is
  :func:`grouped_bradley_terry_loss`: the K responses of a prompt are scored once, all C(K,2) comparisons
  are taken in the same batch and weighted 1/C(K,2), so each prompt counts once (InstructGPT, Ouyang et
  al. 2022, eqn. 1). Shuffling the C(K,2) pairs as independent examples overfits (same paper, sec. 3.5).
- :func:`evaluate_rankings`: held-out pair accuracy, per-prompt rank correlation, reward distributions.
- :func:`reward_stats`: mean/std of rewards on SFT-policy samples, which PPO uses to centre rewards.

Departure from InstructGPT: the reward is not normalised into the model's bias after training; the
statistics are saved beside it (``reward_stats.json``) and PPO applies them.
"""

from __future__ import annotations

import logging
import math
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference, suppress_seqcls_warning
from trl.trainer.utils import pad

from .data.preferences import PreferenceGroup, expand_comparisons
from .evaluate import generate_responses
from .hf_trainer import context_length
from .runs import StageError
from .tokenizer import ensure_chat_tokens

__all__ = [
    "load_reward_model",
    "format_for_reward",
    "score_texts",
    "encode_groups",
    "grouped_rows",
    "pairwise_rows",
    "GroupedPreferenceCollator",
    "grouped_bradley_terry_loss",
    "GroupedRewardTrainer",
    "build_reward_trainer",
    "RankingEval",
    "ranking_metrics",
    "evaluate_rankings",
    "reward_stats",
    "policy_reward_stats",
    "on_policy_groups",
    "policy_best_of_k",
    "MetricsCallback",
    "StopOnSignal",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model and scoring


def load_reward_model(model_dir: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A scalar-head sequence classifier on the backbone in ``model_dir``, and its tokenizer.

    A causal LM dir gets a new, randomly initialised ``score`` head (seed torch first for a reproducible
    one); a reward model dir loads as is. The tokenizer is given the project's chat tokens, template and pad
    token (``pipeline.tokenizer.ensure_chat_tokens``, as SFT does for external models), so the reward model
    scores the same chat format the policy writes; the embeddings grow when tokens were added.

    A dir with ``implicit_reward.json`` (``reward.objective=dpo``) loads as
    :class:`pipeline.implicit_reward.ImplicitReward`, which :func:`score_texts` scores the same way.

    Returns:
        (model in float32 with ``num_labels == 1`` and ``config.pad_token_id`` set, tokenizer).
    """
    from .implicit_reward import is_implicit_reward_dir, load_implicit_reward

    if is_implicit_reward_dir(model_dir):  # reward.objective=dpo: a causal LM and its reference
        return load_implicit_reward(model_dir, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    ensure_chat_tokens(tokenizer)  # a no-op for the pipeline's own tokenizer
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def format_for_reward(tokenizer: Any, prompt: str | list[dict[str, str]], response: str) -> str:
    """The text the reward model scores: the prompt (a user message, or a conversation) and the response as
    an assistant turn, rendered with the tokenizer's chat template.

    >>> from types import SimpleNamespace
    >>> tok = SimpleNamespace(chat_template="x", apply_chat_template=lambda m, tokenize: "|".join(
    ...     f"{t['role']}:{t['content']}" for t in m))
    >>> format_for_reward(tok, "2+2?", "4")
    'user:2+2?|assistant:4'

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "format_for_reward: the tokenizer has no chat template (see pipeline.tokenizer.ensure_chat_tokens)"
        )
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)


def _encode(tokenizer: Any, prompt: str | list[dict[str, str]], response: str) -> list[int]:
    return tokenizer(format_for_reward(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def score_texts(
    model: Any, tokenizer: Any, prompts: list[Any], responses: list[str], batch_size: int = 32
) -> torch.Tensor:
    """Rewards of (prompt, response) pairs, formatted by :func:`format_for_reward`.

    Sequences are right-padded (the head reads the last non-pad token); one longer than the model's
    context keeps its last tokens, with a warning. The model's train/eval mode is restored.

    Args:
        model: a sequence classifier with one label (a DDP wrapper is unwrapped), or an
            :class:`~pipeline.implicit_reward.ImplicitReward`.
        tokenizer: its tokenizer, with a chat template.
        prompts: user-message strings or chat-message lists.
        responses: one response per prompt.
        batch_size: sequences per forward pass.

    Returns:
        Float32 tensor of shape (N,) on the CPU.
    """
    if getattr(model, "is_implicit_reward", False):  # reward.objective=dpo
        return model.score_texts(tokenizer, prompts, responses, batch_size)
    model = getattr(model, "module", model)
    if len(prompts) != len(responses):
        raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return torch.zeros(0)
    encoded = [_encode(tokenizer, p, r) for p, r in zip(prompts, responses)]
    ctx = context_length(model)
    if ctx is not None and any(len(e) > ctx for e in encoded):
        log.warning(
            "score_texts: %d sequences longer than %d tokens keep their last %d",
            sum(len(e) > ctx for e in encoded),
            ctx,
            ctx,
        )
        encoded = [e[-ctx:] for e in encoded]
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(encoded), batch_size):
            batch = [torch.tensor(e) for e in encoded[start : start + batch_size]]
            ids = pad(batch, padding_value=pad_id, padding_side="right")
            mask = pad([torch.ones_like(b) for b in batch], padding_value=0, padding_side="right")
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            out.append(logits[:, 0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# ----------------------------------------------------------------------------- datasets


def encode_groups(
    tokenizer: Any, groups: list[PreferenceGroup], max_length: int | None
) -> tuple[list[tuple[PreferenceGroup, list[list[int]]]], int]:
    """Tokenise every response of every group; a group with any sequence over ``max_length`` is dropped
    (truncating would cut the end the reward head reads).

    Returns:
        ([(group, token ids per response)], number of groups dropped).
    """
    kept, dropped = [], 0
    for g in groups:
        ids = [_encode(tokenizer, g.prompt, r) for r in g.responses]
        if max_length and max(len(x) for x in ids) > max_length:
            dropped += 1
            continue
        kept.append((g, ids))
    if dropped:
        log.warning("dropped %d of %d preference groups longer than %d tokens", dropped, len(groups), max_length)
    return kept, dropped


def grouped_rows(encoded: list[tuple[PreferenceGroup, list[list[int]]]], use_margin: bool) -> list[dict[str, Any]]:
    """One row per prompt: its K sequences and its C(K,2) comparisons (``winners``, ``losers``, ``weights``)."""
    rows = []
    for g, ids in encoded:
        comps = expand_comparisons(g)
        row = {
            "input_ids": ids,
            "winners": [c.winner for c in comps],
            "losers": [c.loser for c in comps],
            "weights": [c.weight for c in comps],
        }
        if use_margin:
            row["margins"] = [c.margin for c in comps]
        rows.append(row)
    return rows


def pairwise_rows(encoded: list[tuple[PreferenceGroup, list[list[int]]]], use_margin: bool) -> list[dict[str, Any]]:
    """One row per comparison in TRL's processed format (``chosen_ids``, ``rejected_ids``[, ``margin``])."""
    rows = []
    for g, ids in encoded:
        for c in expand_comparisons(g):
            row: dict[str, Any] = {"chosen_ids": ids[c.winner], "rejected_ids": ids[c.loser]}
            if use_margin:
                row["margin"] = c.margin
            rows.append(row)
    return rows


@dataclass
class GroupedPreferenceCollator:
    """Flatten a batch of prompt groups into one padded batch of sequences plus comparison indices.

    Weights are divided by the number of groups in the batch, so they sum to 1 and every prompt counts once.

    >>> c = GroupedPreferenceCollator(pad_token_id=0)
    >>> b = c([{"input_ids": [[1, 2], [3]], "winners": [0], "losers": [1], "weights": [1.0]},
    ...        {"input_ids": [[4], [5, 6], [7]], "winners": [1, 1, 0], "losers": [0, 2, 2], "weights": [1/3] * 3}])
    >>> b["input_ids"].tolist(), b["winners"].tolist(), b["losers"].tolist()
    ([[1, 2], [3, 0], [4, 0], [5, 6], [7, 0]], [0, 3, 3, 2], [1, 2, 4, 4])
    >>> [round(w, 3) for w in b["weights"].tolist()]
    [0.5, 0.167, 0.167, 0.167]
    """

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs: list[torch.Tensor] = []
        winners: list[int] = []
        losers: list[int] = []
        weights: list[float] = []
        margins: list[float] = []
        for ex in examples:
            offset = len(seqs)
            seqs.extend(torch.tensor(ids) for ids in ex["input_ids"])
            winners.extend(offset + i for i in ex["winners"])
            losers.extend(offset + i for i in ex["losers"])
            weights.extend(w / len(examples) for w in ex["weights"])
            margins.extend(ex.get("margins") or [])
        out = {
            "input_ids": pad(seqs, padding_value=self.pad_token_id, padding_side="right"),
            "attention_mask": pad([torch.ones_like(s) for s in seqs], padding_value=0, padding_side="right"),
            "winners": torch.tensor(winners),
            "losers": torch.tensor(losers),
            "weights": torch.tensor(weights, dtype=torch.float),
        }
        if "margins" in examples[0]:
            out["margins"] = torch.tensor(margins, dtype=torch.float)
        return out


def grouped_bradley_terry_loss(
    rewards: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
    weights: torch.Tensor,
    margins: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted Bradley-Terry loss over comparisons within a batch of scored sequences.

    ``loss = -sum_c w_c * log(sigmoid(r[winner_c] - r[loser_c] - m_c))``. With ``w_c = 1 / (B * C(K,2))``
    this is InstructGPT's eqn. 1 averaged over the B prompts of the batch; with one pair per prompt and no
    margin it is TRL's ``RewardTrainer`` loss; the margin term is Llama 2's (Touvron et al. 2023, eqn. 2).

    Args:
        rewards: (N,) one reward per sequence.
        winners, losers: (P,) indices into ``rewards`` of each comparison's preferred / other sequence.
        weights: (P,) comparison weights (summing to 1 over the batch).
        margins: (P,) or None.

    Returns:
        Scalar loss.
    """
    diff = rewards[winners] - rewards[losers]
    if margins is not None:
        diff = diff - margins
    return -(weights * F.logsigmoid(diff)).sum()


class GroupedRewardTrainer(RewardTrainer):
    """``RewardTrainer`` on prompt groups (rows of :func:`grouped_rows`, batches of
    :class:`GroupedPreferenceCollator`), with :func:`grouped_bradley_terry_loss` as its loss.
    ``per_device_train_batch_size`` counts prompts; each step scores B x K sequences."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset  # rows come tokenised and length-filtered by encode_groups

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "winners", "losers", "weights", "margins"]

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1)
        w, lo, weights = inputs["winners"], inputs["losers"], inputs["weights"]
        loss = grouped_bradley_terry_loss(rewards, w, lo, weights, inputs.get("margins"))
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            diff = rewards[w] - rewards[lo]
            acc = self.accelerator.gather_for_metrics((weights * (diff > 0).float()).sum()).mean().item()
            self._metrics[mode]["accuracy"].append(acc)
            self._metrics[mode]["margin"].append((weights * diff).sum().item())
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
        return (loss, outputs) if return_outputs else loss


def build_reward_trainer(
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    args: RewardConfig,
    grouped: bool,
    callbacks: list[TrainerCallback] | None = None,
) -> RewardTrainer:
    """A ``GroupedRewardTrainer`` (``grouped``) or TRL's ``RewardTrainer`` on pre-tokenised rows."""
    from datasets import Dataset

    train = Dataset.from_list(train_rows)
    evaluation = Dataset.from_list(eval_rows) if eval_rows and args.eval_strategy != "no" else None
    if grouped:
        collator = GroupedPreferenceCollator(tokenizer.pad_token_id)
        cls: type[RewardTrainer] = GroupedRewardTrainer
    else:
        collator = DataCollatorForPreference(tokenizer.pad_token_id)
        cls = RewardTrainer
    return cls(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


# ----------------------------------------------------------------------------- evaluation


@dataclass
class RankingEval:
    """Held-out ranking quality of a reward model."""

    pair_accuracy: float
    """Share of all held-out comparisons with reward(winner) > reward(loser) (ties count as wrong)."""
    val_loss: float
    """Grouped Bradley-Terry loss, averaged over prompts."""
    rank_correlation: float | None
    """Spearman correlation of rewards with the true ranking, per prompt, averaged (K > 2 only)."""
    kendall_tau: float | None
    """Kendall's tau per prompt, averaged (K > 2 only)."""
    chosen: list[float] = field(default_factory=list)
    """Reward of each prompt's best response."""
    rejected: list[float] = field(default_factory=list)
    """Reward of each prompt's worst response."""
    n_groups: int = 0
    n_pairs: int = 0
    group_rewards: list[list[float]] = field(default_factory=list)
    """Reward of every response, per group (for breakdowns such as ``pipeline.agreement.pair_accuracy_by_kind``)."""


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of ``x`` (ascending), ties sharing their mean rank."""
    order = torch.argsort(x)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else 0.0


def ranking_metrics(
    groups: list[PreferenceGroup], rewards: list[torch.Tensor], use_margin: bool = False
) -> RankingEval:
    """Ranking metrics from per-group rewards (``rewards[i]`` has one entry per response of ``groups[i]``).

    >>> from pipeline.data.preferences import PreferenceGroup
    >>> g = PreferenceGroup("q", ["a", "b", "c"], [0, 1, 2])
    >>> e = ranking_metrics([g], [torch.tensor([3.0, 1.0, 2.0])])
    >>> round(e.pair_accuracy, 3), e.rank_correlation, round(e.kendall_tau, 3)
    (0.667, 0.5, 0.333)
    """
    correct = total = 0
    losses, spearman, kendall, chosen, rejected = [], [], [], [], []
    for g, r in zip(groups, rewards):
        comps = expand_comparisons(g)
        w = torch.tensor([c.winner for c in comps])
        lo = torch.tensor([c.loser for c in comps])
        weights = torch.tensor([c.weight for c in comps])
        margins = torch.tensor([c.margin for c in comps]) if use_margin else None
        losses.append(float(grouped_bradley_terry_loss(r, w, lo, weights, margins)))
        wins = (r[w] > r[lo]).float()
        correct += int(wins.sum())
        total += len(comps)
        if len(g.responses) > 2:
            position = torch.empty(len(g.ranking))
            position[torch.tensor(g.ranking)] = torch.arange(len(g.ranking), dtype=torch.float)
            spearman.append(_spearman(r, -position))
            kendall.append(float((wins - (r[w] < r[lo]).float()).mean()))
        chosen.append(float(r[g.ranking[0]]))
        rejected.append(float(r[g.ranking[-1]]))
    if not total:
        raise ValueError("ranking_metrics: no held-out comparisons")
    return RankingEval(
        pair_accuracy=correct / total,
        val_loss=sum(losses) / len(losses),
        rank_correlation=sum(spearman) / len(spearman) if spearman else None,
        kendall_tau=sum(kendall) / len(kendall) if kendall else None,
        chosen=chosen,
        rejected=rejected,
        n_groups=len(groups),
        n_pairs=total,
        group_rewards=[[float(x) for x in r] for r in rewards],
    )


def evaluate_rankings(
    model: Any, tokenizer: Any, groups: list[PreferenceGroup], batch_size: int = 32, use_margin: bool = False
) -> RankingEval:
    """Score every response of the held-out ``groups`` and compute :func:`ranking_metrics`."""
    prompts = [g.prompt for g in groups for _ in g.responses]
    responses = [r for g in groups for r in g.responses]
    flat = score_texts(model, tokenizer, prompts, responses, batch_size)
    per_group = list(torch.split(flat, [len(g.responses) for g in groups]))
    return ranking_metrics(groups, per_group, use_margin)


def reward_stats(rewards: torch.Tensor) -> dict[str, float | int]:
    """``{"mean", "std", "n"}`` of rewards (sample standard deviation; 1.0 when n < 2 or all equal, so
    dividing by it is always safe).

    >>> reward_stats(torch.tensor([1.0, 2.0, 3.0]))
    {'mean': 2.0, 'std': 1.0, 'n': 3}
    """
    n = int(rewards.numel())
    if n == 0:
        raise ValueError("reward_stats: no rewards")
    std = float(rewards.std()) if n > 1 else 0.0
    return {"mean": float(rewards.mean()), "std": std if std > 0 else 1.0, "n": n}


def policy_reward_stats(
    policy: Any,
    reward_model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    seed: int | None = None,
) -> dict[str, float | int]:
    """:func:`reward_stats` of the reward model on responses sampled (temperature 1) from ``policy``.

    Args:
        policy: the causal LM whose samples PPO starts from (the SFT model).
        reward_model: the trained reward model.
        tokenizer: shared by both (chat template, pad token).
        prompts: user-message strings (repeat a prompt to draw several samples for it).
        max_new_tokens: sample length cap.
        batch_size: prompts per generate/score call.
        seed: sampling seed.
    """
    responses = generate_responses(
        policy, tokenizer, prompts, max_new_tokens, batch_size=batch_size, do_sample=True, seed=seed
    )
    return reward_stats(score_texts(reward_model, tokenizer, prompts, responses, batch_size))


def policy_best_of_k(
    policy: Any,
    reward_model: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    k: int,
    max_new_tokens: int,
    batch_size: int = 32,
    seed: int | None = None,
    reward_tokenizer: Any = None,
) -> dict[str, dict[str, Any]] | None:
    """:func:`pipeline.agreement.best_of_k` of ``policy`` on ``records`` (``prompt`` plus ``task``/``answer``).

    Draws the policy's greedy answer and ``k`` samples (temperature 1, ``seed``) per prompt, and scores the
    samples with ``reward_model`` (through ``reward_tokenizer``, default ``tokenizer``).
    """
    from pipeline.agreement import best_of_k

    prompts = [r["prompt"] for r in records]
    greedy = generate_responses(policy, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    many = [p for p in prompts for _ in range(k)]
    samples = generate_responses(
        policy, tokenizer, many, max_new_tokens, batch_size=batch_size, do_sample=True, seed=seed
    )
    scores = score_texts(reward_model, reward_tokenizer or tokenizer, many, samples, batch_size).tolist()
    return best_of_k(records, greedy, samples, scores, k)


def on_policy_groups(
    policy: Any,
    tokenizer: Any,
    groups: list[PreferenceGroup],
    k: int,
    pairs_per_prompt: int,
    max_new_tokens: int,
    batch_size: int = 32,
    seed: int = 0,
) -> list[PreferenceGroup]:
    """Preference pairs on the policy's own samples, ranked by the task checker (InstructGPT's labellers
    ranked model samples; here the checker labels them).

    For each group of ``groups`` whose prompt is a single message with a checker (``task``/``answer`` in its
    meta; a prompt that several groups share is sampled for each), ``k`` responses are sampled (temperature 1,
    ``seed``). Every distinct wrong sample is paired with a right response (the record's answer, or a right sample); at most ``pairs_per_prompt`` pairs per prompt,
    picked with a seeded shuffle. Each pair is a K=2 group with the checker's scores (so ``reward.margin``
    applies to it as to the generated data) and the prompt's meta.

    Returns:
        The new groups, in prompt order (empty when no prompt has a checker).
    """
    from .data.tasks import score_answer
    from .evaluate import has_checker

    todo = [(g.prompt, g.meta) for g in groups if isinstance(g.prompt, str) and has_checker(g.meta)]
    if not todo or k < 1 or pairs_per_prompt < 1:
        return []
    many = [p for p, _ in todo for _ in range(k)]
    samples = generate_responses(
        policy, tokenizer, many, max_new_tokens, batch_size=batch_size, do_sample=True, seed=seed
    )
    rng = random.Random(seed)
    out = []
    for i, (prompt, meta) in enumerate(todo):
        scored = {s: score_answer(meta, s) for s in [str(meta["answer"]), *samples[i * k : (i + 1) * k]]}
        right = [s for s, v in scored.items() if v == 1.0]
        wrong = [s for s, v in scored.items() if v < 1.0]
        pairs = [(r, w) for r in right for w in wrong]
        rng.shuffle(pairs)
        for r, w in pairs[:pairs_per_prompt]:
            out.append(PreferenceGroup(prompt, [r, w], [0, 1], scores=[scored[r], scored[w]],
                                       location=f"on-policy sample of {meta.get('id', prompt)!r}", meta=dict(meta)))  # fmt: skip
    return out


# ----------------------------------------------------------------------------- trainer plumbing


_KEYS = {
    "loss": "train/loss",
    "learning_rate": "train/lr",
    "grad_norm": "train/grad_norm",
    "accuracy": "train/accuracy",
    "margin": "train/margin",
    "chosen_nll": "train/chosen_nll",
    "eval_loss": "val/loss",
    "eval_accuracy": "rm/accuracy",
    "eval_margin": "val/margin",
}


class MetricsCallback(TrainerCallback):
    """Forward the Trainer's logs to ``sink`` as ``{"step", "train/loss", "val/loss", "rm/accuracy", ...}``
    (main process only) and stop the stage on a NaN/inf loss, naming the step."""

    def __init__(self, sink: Callable[[dict[str, Any]], None]) -> None:
        self.sink = sink

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        for key in ("loss", "eval_loss"):
            if key in logs and not math.isfinite(logs[key]):
                raise StageError(
                    f"reward: {key} is {logs[key]} at step {state.global_step}; stopping. The last good checkpoint "
                    f"stays in {args.output_dir} (lower reward.lr, or check the data)"
                )
        record = {_KEYS[k]: float(v) for k, v in logs.items() if k in _KEYS}
        if record and state.is_world_process_zero:
            self.sink({"step": state.global_step, **record})


class StopOnSignal(TrainerCallback):
    """On SIGTERM/SIGINT, save a checkpoint at the end of the current step and stop training.

    Use as a Trainer callback and, around ``trainer.train()``, as a context manager that installs the
    handlers (and restores the previous ones however training ends). ``stopped_by`` names the signal
    received, so the caller knows the run was interrupted and writes no artifact.
    """

    def __init__(self) -> None:
        self.stopped_by: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.stopped_by = signal.Signals(signum).name

    def __enter__(self) -> StopOnSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped_by:
            control.should_save = True
            control.should_training_stop = True
