"""Reward-model training rows from preference groups, and their collators.

- Scalar head: :func:`encode_groups` tokenises every response of every group; :func:`grouped_rows` makes one
  row per prompt (its K sequences and C(K,2) comparisons, InstructGPT's batching, collated by
  :class:`GroupedPreferenceCollator`), :func:`pairwise_rows` one row per comparison in TRL's format.
- DPO: :func:`dpo_rows` makes one row per comparison with where each response starts;
  :func:`add_reference_logprobs` stores the frozen reference's log-probs in them; :class:`DPOCollator`
  interleaves chosen and rejected sequences.

A group with any sequence longer than ``max_length`` tokens is dropped whole by both paths (truncating would
cut the end the reward head reads, or the response the DPO loss scores); a group of more than
``MAX_CHARS_PER_TOKEN`` characters per token of ``max_length`` is dropped before it is tokenised (memory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from pipeline.data.preferences import PreferenceGroup, expand_comparisons
from pipeline.data.records import MAX_CHARS_PER_TOKEN, text_chars
from pipeline.lm import right_pad

from .implicit import summed_logprobs
from .scorer import encode_for_reward, encode_prompt_response

__all__ = [
    "encode_groups",
    "grouped_rows",
    "pairwise_rows",
    "GroupedPreferenceCollator",
    "dpo_rows",
    "add_reference_logprobs",
    "DPOCollator",
]

log = logging.getLogger(__name__)
E = TypeVar("E")


def _encode_fitting(
    groups: list[PreferenceGroup], encode: Callable[[Any, str], E], length: Callable[[E], int], max_length: int | None
) -> tuple[list[tuple[PreferenceGroup, list[E]]], int]:
    """Every response of every group encoded; groups with a sequence over ``max_length`` dropped whole, those
    certainly over it (by their characters) before they are tokenised."""
    kept, dropped = [], 0
    max_chars = MAX_CHARS_PER_TOKEN * (max_length or 0)
    for g in groups:
        if max_chars and text_chars(g.prompt) + max(map(len, g.responses)) > max_chars:
            dropped += 1
            continue
        enc = [encode(g.prompt, r) for r in g.responses]
        if max_length and max(length(e) for e in enc) > max_length:
            dropped += 1
            continue
        kept.append((g, enc))
    if dropped:
        log.warning("dropped %d of %d preference groups longer than %d tokens", dropped, len(groups), max_length)
    return kept, dropped


def encode_groups(
    tokenizer: Any, groups: list[PreferenceGroup], max_length: int | None
) -> tuple[list[tuple[PreferenceGroup, list[list[int]]]], int]:
    """Tokenise every response of every group (:func:`~pipeline.reward.scorer.format_for_reward`'s text).

    Returns:
        ([(group, token ids per response)], number of groups dropped for being longer than ``max_length``).
    """
    return _encode_fitting(groups, lambda p, r: encode_for_reward(tokenizer, p, r), len, max_length)


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
        seqs: list[list[int]] = []
        winners: list[int] = []
        losers: list[int] = []
        weights: list[float] = []
        margins: list[float] = []
        for ex in examples:
            offset = len(seqs)
            seqs.extend(ex["input_ids"])
            winners.extend(offset + i for i in ex["winners"])
            losers.extend(offset + i for i in ex["losers"])
            weights.extend(w / len(examples) for w in ex["weights"])
            margins.extend(ex.get("margins") or [])
        ids, mask = right_pad(seqs, self.pad_token_id)
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "winners": torch.tensor(winners),
            "losers": torch.tensor(losers),
            "weights": torch.tensor(weights, dtype=torch.float),
        }
        if "margins" in examples[0]:
            out["margins"] = torch.tensor(margins, dtype=torch.float)
        return out


def dpo_rows(
    tokenizer: Any, groups: list[PreferenceGroup], max_length: int | None
) -> tuple[list[dict[str, Any]], list[PreferenceGroup]]:
    """One row per comparison of every group: ``chosen_ids``/``rejected_ids``, where each response
    starts, and ``chosen_best`` (1 when the chosen response is the group's best, the rows the NLL term of
    ``reward.dpo_nll_weight`` trains on). A group with any sequence over ``max_length`` tokens is dropped whole.

    Returns:
        (rows, the groups kept).
    """
    kept, _ = _encode_fitting(
        groups, lambda p, r: encode_prompt_response(tokenizer, p, r), lambda e: len(e[0]), max_length
    )
    rows = []
    for g, enc in kept:
        for c in expand_comparisons(g):
            (cw, sw), (cl, sl) = enc[c.winner], enc[c.loser]
            rows.append({"chosen_ids": cw, "chosen_start": sw, "rejected_ids": cl, "rejected_start": sl,
                         "chosen_best": int(c.winner == g.ranking[0])})  # fmt: skip
    return rows, [g for g, _ in kept]


def add_reference_logprobs(reference: Any, rows: list[dict[str, Any]], pad_id: int, batch_size: int) -> None:
    """Store ``ref_chosen``/``ref_rejected`` (the reference's summed response log-probs) in each row (TRL's
    ``precompute_ref_log_probs``: the Trainer then holds one model, and DDP / ZeRO work as for SFT)."""
    for side in ("chosen", "rejected"):
        lp = summed_logprobs(reference, [(r[f"{side}_ids"], r[f"{side}_start"]) for r in rows], pad_id, batch_size)
        for r, v in zip(rows, lp.tolist()):
            r[f"ref_{side}"] = v


@dataclass
class DPOCollator:
    """Chosen and rejected sequences of a batch of :func:`dpo_rows` rows, interleaved into one padded batch
    (chosen at even rows, rejected at odd rows), with their response starts, reference log-probs and
    ``chosen_best`` flags."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sides = ("chosen", "rejected")
        ids, mask = right_pad([ex[f"{s}_ids"] for ex in examples for s in sides], self.pad_token_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "starts": torch.tensor([ex[f"{s}_start"] for ex in examples for s in sides]),
            "ref_logps": torch.tensor([ex[f"ref_{s}"] for ex in examples for s in sides], dtype=torch.float),
            "chosen_best": torch.tensor([ex["chosen_best"] for ex in examples], dtype=torch.float),
        }
