"""A reward model that judges through the language-model head: DPO's implicit reward.

``reward.objective=dpo`` trains a causal LM ``pi`` from the reward stage's init model (the SFT model,
which stays frozen as the reference ``pi_ref``) with the DPO loss on the same preference pairs a
Bradley-Terry reward model trains on (Rafailov et al. 2023, eqn. 7)::

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

and the reward of a response is the implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))``, summed over
the response tokens (the end-of-turn token included), the quantity DPO ranks responses by. Why a second
kind: a last-token scalar head the size of the policy does not learn to check a sum or a letter lookup on
held-out items (its best of 8 on addition is below the policy's greedy answer, bench/RESULTS.md), while the
same network's LM head, trained on the same pairs, ranks them far better: judging through the generative
path, which is what the SFT model already does well.

The artifact (``runs/<run>/reward/artifact``) is then the trained causal LM and its tokenizer, the frozen
reference in ``reference/``, and ``implicit_reward.json`` (``{"kind": "dpo", "beta": ...}``). It loads with
:func:`load_implicit_reward` (``pipeline.reward.load_reward_model`` dispatches to it), and scores with the
same ``score_texts`` call as a classifier, so the reward stage's checks, PPO and the report use it unchanged.
PPO uses it through its ``score_fn`` hook and needs ``ppo.advantage=group`` (there is no scalar head to start
a value model from).

``reward.dpo_nll_weight`` adds the chosen responses' mean token NLL to the loss (RPO, Pang et al. 2024; TRL's
``rpo_alpha``), over the comparisons whose chosen response is its group's best. Plain DPO lowers the chosen
responses' likelihood too, so every token's implicit reward drifts negative and shorter outputs (a prefix of
the right answer, or none) score higher: a shortcut PPO takes (bench/RESULTS.md). The NLL term keeps the best
responses above the reference.

Reference log-probs are computed once before training (as TRL's ``precompute_ref_log_probs``), so the
Trainer holds one model and DDP / ZeRO work as for the SFT stage.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from trl.trainer.utils import pad

from .data.preferences import PreferenceGroup, expand_comparisons
from .hf_trainer import context_length
from .reward import format_for_reward
from .rl.losses import logprobs_from_logits
from .tokenizer import ensure_chat_tokens

__all__ = [
    "IMPLICIT_CONFIG",
    "ImplicitReward",
    "is_implicit_reward_dir",
    "load_implicit_reward",
    "save_implicit_reward",
    "encode_prompt_response",
    "add_reference_logprobs",
    "dpo_rows",
    "DPOCollator",
    "dpo_loss",
    "sequence_logprobs",
    "response_lengths",
    "response_mask",
    "chosen_nll",
    "DPORewardTrainer",
]

log = logging.getLogger(__name__)

IMPLICIT_CONFIG = "implicit_reward.json"
REFERENCE_DIR = "reference"


def encode_prompt_response(tokenizer: Any, prompt: Any, response: str) -> tuple[list[int], int]:
    """Token ids of the prompt and response as the policy sees them, and where the response starts.

    The prompt is rendered with the generation prompt (as PPO's rollouts are); the full sequence is
    :func:`pipeline.reward.format_for_reward`'s text, so the response part ends with the template's end-of-turn
    token.

    Raises:
        ValueError: the template does not render the prompt as a prefix of the conversation.
    """
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    head = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(format_for_reward(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
    if ids[: len(head_ids)] != head_ids:
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + response")
    return ids, len(head_ids)


def response_mask(attention_mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Which next-token positions ``(B, T-1)`` of right-padded sequences are response tokens: position ``t``
    predicts token ``t + 1``, a response token when ``t + 1 >= starts[i]`` and not padding."""
    pos = torch.arange(1, attention_mask.shape[1], device=attention_mask.device)[None]
    return (pos >= starts[:, None]) & (attention_mask[:, 1:] > 0)


def response_lengths(attention_mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Number of response tokens ``(B,)``: what :func:`sequence_logprobs` sums over."""
    return response_mask(attention_mask, starts).sum(1)


def sequence_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """Summed log-probs ``(B,)`` of each right-padded sequence's tokens from position ``starts[i]`` on."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    lp = logprobs_from_logits(logits, input_ids[:, 1:])
    return (lp * response_mask(attention_mask, starts)).sum(1)


def _batches(encoded: list[tuple[list[int], int]], pad_id: int, batch_size: int, device: Any) -> Any:
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        seqs = [torch.tensor(ids) for ids, _ in chunk]
        ids = pad(seqs, padding_value=pad_id, padding_side="right").to(device)
        mask = pad([torch.ones_like(s) for s in seqs], padding_value=0, padding_side="right").to(device)
        yield ids, mask, torch.tensor([s for _, s in chunk], device=device)


@torch.no_grad()
def _logprobs(model: Any, encoded: list[tuple[list[int], int]], pad_id: int, batch_size: int) -> torch.Tensor:
    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [sequence_logprobs(model, *b).cpu() for b in _batches(encoded, pad_id, batch_size, device)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class ImplicitReward:
    """``beta * (log pi(y|x) - log pi_ref(y|x))`` of a DPO-trained causal LM ``model`` and its reference.

    Scores text like a classifier reward model (:meth:`score_texts`, what ``pipeline.reward.score_texts``
    calls) and token ids like PPO's rollouts (:meth:`score_ids`, a PPO ``score_fn``).
    """

    model: Any
    reference: Any
    beta: float
    pad_token_id: int
    is_implicit_reward: bool = True

    def to(self, device: Any, dtype: torch.dtype | None = None) -> ImplicitReward:
        """Both models to ``device`` (and ``dtype`` when given); :meth:`score_ids` moves its inputs there."""
        self.model.to(device=device, dtype=dtype)
        self.reference.to(device=device, dtype=dtype)
        return self

    def parameters(self) -> Any:
        return self.model.parameters()

    def score_texts(
        self, tokenizer: Any, prompts: list[Any], responses: list[str], batch_size: int = 32
    ) -> torch.Tensor:
        """Implicit rewards ``(N,)`` (float32, CPU) of (prompt, response) pairs rendered by the chat template."""
        if len(prompts) != len(responses):
            raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
        encoded = [encode_prompt_response(tokenizer, p, r) for p, r in zip(prompts, responses)]
        ctx = context_length(self.model)
        if ctx and any(len(ids) > ctx for ids, _ in encoded):
            log.warning("score_texts: %d sequences longer than %d tokens keep their last %d",
                        sum(len(ids) > ctx for ids, _ in encoded), ctx, ctx)  # fmt: skip
            encoded = [(ids[-ctx:], max(1, start - (len(ids) - ctx))) if len(ids) > ctx else (ids, start)
                       for ids, start in encoded]  # fmt: skip
        lp = _logprobs(self.model, encoded, self.pad_token_id, batch_size)
        ref = _logprobs(self.reference, encoded, self.pad_token_id, batch_size)
        return (self.beta * (lp - ref)).float()

    @torch.no_grad()
    def score_ids(
        self, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Implicit rewards ``(B,)`` (float32, on the models' device) of left-padded queries + right-padded
        responses (PPO's rollout layout), computed on the models' device."""
        from .rl.rollout import response_logprobs

        dev = next(self.model.parameters()).device
        t = [x.to(dev) for x in (query_ids, query_mask, response_ids, response_mask)]
        lp = response_logprobs(self.model, *t).float()
        ref = response_logprobs(self.reference, *t).float()
        return self.beta * (lp - ref).sum(1)

    __call__ = score_ids


def is_implicit_reward_dir(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds an implicit (DPO) reward model, i.e. has ``implicit_reward.json``."""
    return (Path(model_dir) / IMPLICIT_CONFIG).is_file()


def save_implicit_reward(out_dir: str | Path, reference: Any, beta: float, tokenizer: Any) -> None:
    """Complete an artifact whose trained LM is already saved in ``out_dir``: save ``reference`` (the frozen
    model the reference log-probs came from) into ``out_dir/reference`` and write ``implicit_reward.json``
    (main process only)."""
    out = Path(out_dir)
    reference.save_pretrained(str(out / REFERENCE_DIR))
    tokenizer.save_pretrained(str(out / REFERENCE_DIR), save_jinja_files=False)
    (out / IMPLICIT_CONFIG).write_text(json.dumps({"kind": "dpo", "beta": beta, "reference": REFERENCE_DIR}, indent=2))


def load_implicit_reward(model_dir: str | Path, trust_remote_code: bool = False) -> tuple[ImplicitReward, Any]:
    """The :class:`ImplicitReward` in ``model_dir`` (float32, eval mode) and its tokenizer.

    Raises:
        ValueError: ``implicit_reward.json`` is not a valid description (names the file and field).
    """
    path = Path(model_dir) / IMPLICIT_CONFIG
    try:
        spec = json.loads(path.read_text())
        beta, ref_name = float(spec["beta"]), str(spec.get("reference", REFERENCE_DIR))
        if spec.get("kind", "dpo") != "dpo":
            raise ValueError(f"kind {spec.get('kind')!r} is not 'dpo'")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid implicit reward description ({e})") from None
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    ensure_chat_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kw).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(Path(model_dir) / ref_name), **kw).eval()
    for m in (model, reference):
        m.requires_grad_(False)
    return ImplicitReward(model, reference, beta, int(tokenizer.pad_token_id)), tokenizer


# ----------------------------------------------------------------------------- training


def dpo_rows(
    tokenizer: Any, groups: list[PreferenceGroup], max_length: int | None
) -> tuple[list[dict[str, Any]], list[PreferenceGroup]]:
    """One row per comparison of every group: ``chosen_ids``/``rejected_ids``, where each response
    starts, and ``chosen_best`` (1 when the chosen response is the group's best, the rows the NLL term of
    ``reward.dpo_nll_weight`` trains on). A group with any sequence over ``max_length`` tokens is dropped whole, as
    :func:`pipeline.reward.encode_groups` drops it.

    Returns:
        (rows, the groups kept).
    """
    rows, kept = [], []
    for g in groups:
        enc = [encode_prompt_response(tokenizer, g.prompt, r) for r in g.responses]
        if max_length and max(len(ids) for ids, _ in enc) > max_length:
            continue
        kept.append(g)
        for c in expand_comparisons(g):
            (cw, sw), (cl, sl) = enc[c.winner], enc[c.loser]
            rows.append({"chosen_ids": cw, "chosen_start": sw, "rejected_ids": cl, "rejected_start": sl,
                         "chosen_best": int(c.winner == g.ranking[0])})  # fmt: skip
    if len(kept) < len(groups):
        log.warning("dropped %d of %d preference groups longer than %d tokens", len(groups) - len(kept), len(groups),
                    max_length)  # fmt: skip
    return rows, kept


def add_reference_logprobs(reference: Any, rows: list[dict[str, Any]], pad_id: int, batch_size: int) -> None:
    """Store ``ref_chosen``/``ref_rejected`` (the reference's summed response log-probs) in each row."""
    for side in ("chosen", "rejected"):
        lp = _logprobs(reference, [(r[f"{side}_ids"], r[f"{side}_start"]) for r in rows], pad_id, batch_size)
        for r, v in zip(rows, lp.tolist()):
            r[f"ref_{side}"] = v


@dataclass
class DPOCollator:
    """Chosen and rejected sequences of a batch of :func:`dpo_rows` rows, interleaved into one padded batch
    (chosen at even rows, rejected at odd rows), with their response starts, reference log-probs and
    ``chosen_best`` flags."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [torch.tensor(ex[f"{s}_ids"]) for ex in examples for s in ("chosen", "rejected")]
        return {
            "input_ids": pad(seqs, padding_value=self.pad_token_id, padding_side="right"),
            "attention_mask": pad([torch.ones_like(s) for s in seqs], padding_value=0, padding_side="right"),
            "starts": torch.tensor([ex[f"{s}_start"] for ex in examples for s in ("chosen", "rejected")]),
            "ref_logps": torch.tensor(
                [ex[f"ref_{s}"] for ex in examples for s in ("chosen", "rejected")], dtype=torch.float
            ),
            "chosen_best": torch.tensor([ex["chosen_best"] for ex in examples], dtype=torch.float),
        }


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss on interleaved (chosen, rejected) log-probs, and the implicit reward margins.

    >>> loss, margin = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), 0.5)
    >>> round(float(margin[0]), 3), round(float(loss), 4)
    (1.0, 0.3133)
    """
    ratio = logps - ref_logps
    margin = beta * (ratio[0::2] - ratio[1::2])
    return -F.logsigmoid(margin).mean(), margin


def chosen_nll(logps: torch.Tensor, lengths: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of the chosen responses (even rows of interleaved log-probs) whose ``best`` flag is set:
    ``-sum logps / sum lengths`` over those rows, 0 when there are none (RPO's NLL term).

    >>> round(float(chosen_nll(torch.tensor([-1.0, -3.0, -6.0, -1.0]), torch.tensor([4, 1, 2, 1]),
    ...                        torch.tensor([1.0, 0.0]))), 3)
    0.25
    """
    w = best.to(logps.dtype)
    return -(logps[0::2] * w).sum() / (lengths[0::2].to(logps.dtype) * w).sum().clamp(min=1)


class DPORewardTrainer(Trainer):
    """``transformers.Trainer`` with :func:`dpo_loss` on :class:`DPOCollator` batches (precomputed reference
    log-probs), plus ``nll_weight`` times :func:`chosen_nll` in training (RPO; Pang et al. 2024). Logs the pair
    accuracy and margin of the implicit reward and the chosen responses' NLL with the loss; held-out batches
    give the DPO loss alone, the quantity the stage's final evaluation reports as ``val/loss``."""

    def __init__(self, *args: Any, beta: float, nll_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta, self.nll_weight = beta, nll_weight
        self._dpo_metrics: dict[str, list[float]] = {"accuracy": [], "margin": [], "chosen_nll": []}

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "chosen_start", "rejected_ids", "rejected_start",
                                       "ref_chosen", "ref_rejected", "chosen_best"]  # fmt: skip

    def _terms(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(DPO loss, margins, chosen NLL) of a batch."""
        logps = sequence_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["starts"])
        loss, margin = dpo_loss(logps, inputs["ref_logps"], self.beta)
        lengths = response_lengths(inputs["attention_mask"], inputs["starts"])
        return loss, margin, chosen_nll(logps, lengths, inputs["chosen_best"])

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        loss, margin, nll = self._terms(model, inputs)
        if self.nll_weight:
            loss = loss + self.nll_weight * nll
        if model.training:
            m = margin.detach()
            self._dpo_metrics["accuracy"].append(float((m > 0).float().mean()))
            self._dpo_metrics["margin"].append(float(m.mean()))
            self._dpo_metrics["chosen_nll"].append(float(nll.detach()))
        return (loss, {"margin": margin}) if return_outputs else loss

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        """The DPO loss of a held-out batch (the base class would call the model without its inputs' meaning)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self._terms(model, inputs)[0]
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for k, v in self._dpo_metrics.items():
                if v:
                    logs[k] = sum(v) / len(v)
                v.clear()
        super().log(logs, *args, **kwargs)
