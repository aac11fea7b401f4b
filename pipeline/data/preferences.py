"""Ranked-response records for the reward model: one common form, K-wise expansion, validation.

Every accepted record becomes a :class:`PreferenceGroup` (a prompt, K >= 2 responses and their ranking
best -> worst). Accepted records:

- pairwise, explicit prompt: ``{"prompt", "chosen", "rejected"[, "margin"]}``; the prompt is a user
  message string or a list of chat messages, chosen/rejected are strings or a one-message assistant list
  (TRL's conversational preference format);
- pairwise, implicit prompt: ``{"chosen", "rejected"}`` as whole conversations, either message lists or
  Anthropic-HH text (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``): the turns before the last assistant turn
  are the prompt and must be the same in both;
- K-wise: ``{"prompt", "responses", "ranking"}`` (indices, best first) or ``{"prompt", "responses",
  "scores"}`` (higher is better; the ranking is derived). Both may be present; they must then agree.

A group expands to all C(K,2) ordered comparisons (winner, loser), each weighted 1/C(K,2) so that a
prompt counts once whatever its K (InstructGPT, Ouyang et al. 2022, sec. 3.5 / eqn. 1):

>>> g = PreferenceGroup("q", ["a", "b", "c"], [2, 0, 1])
>>> [(c.winner, c.loser, round(c.weight, 3)) for c in expand_comparisons(g)]
[(2, 0, 0.333), (2, 1, 0.333), (0, 1, 0.333)]

Errors name the record's location (file:line / row) and the field; ties (equal scores, identical
responses, chosen == rejected) and rankings with repeated, missing or out-of-range indices are rejected.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import DatasetSpec, TasksConfig
from .loader import Split, SplitRules, carve_held_out_by, load_split
from .records import ROLES, BadRecord, Record

__all__ = [
    "PreferenceGroup",
    "Comparison",
    "PreferenceData",
    "normalise_preference",
    "expand_comparisons",
    "to_pairwise",
    "split_heldout",
    "load_preferences",
    "parse_hh_text",
]

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]
"""A user message, or a list of chat messages ``{"role", "content"}`` (the conversation so far)."""


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_META_KEYS = ("task", "answer", "id")


@dataclass(frozen=True)
class PreferenceGroup:
    """One prompt with K >= 2 ranked responses (pairwise data is K = 2)."""

    prompt: Prompt
    responses: list[str]
    ranking: list[int]
    """Response indices, best first; a permutation of range(K)."""
    scores: list[float] | None = None
    """Optional per-response scores (higher is better), consistent with ``ranking``."""
    margin: float | None = None
    """Pairwise records only: the record's ``margin`` (how much better chosen is)."""
    location: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    """``task``/``answer``/``id`` of generated records (kept for checkers and reports)."""


@dataclass(frozen=True)
class Comparison:
    """Response ``winner`` is preferred to response ``loser`` (indices into the group's responses)."""

    winner: int
    loser: int
    weight: float
    """1 / C(K, 2): a group's comparisons sum to 1."""
    margin: float = 0.0
    """Score difference (K-wise with scores) or the record's margin (pairwise); 0 when unknown."""


PreferenceData = Split[PreferenceGroup]
"""The ranked-response groups of a run (:func:`load_preferences`)."""


# ----------------------------------------------------------------------------- normalisation


def normalise_preference(rec: Record) -> PreferenceGroup:
    """Turn one raw record into a :class:`PreferenceGroup`.

    Raises:
        BadRecord: the record fits no accepted schema, or its ranking is invalid; the message names
            ``rec.location`` and the field.
    """
    d, where = rec.data, rec.location
    meta = {k: d[k] for k in _META_KEYS if k in d}
    if "responses" in d:
        return _kwise(d, where, meta)
    if "chosen" in d and "rejected" in d:
        return _pairwise(d, where, meta)
    raise BadRecord(
        f"{where}: not a preference record (keys: {', '.join(map(str, d)) or 'none'}); expected "
        "prompt/chosen/rejected, chosen/rejected conversations, or prompt/responses/ranking (or scores)"
    )


def _kwise(d: dict[str, Any], where: str, meta: dict[str, Any]) -> PreferenceGroup:
    if "prompt" not in d:
        raise BadRecord(f"{where}: field 'prompt' is missing (K-wise records need prompt/responses/ranking)")
    prompt = _prompt(d["prompt"], where, "prompt")
    raw = d["responses"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise BadRecord(f"{where}: field 'responses' must be a list of at least 2 responses, got {raw!r:.80}")
    responses = [_response(r, where, f"responses[{i}]") for i, r in enumerate(raw)]
    k = len(responses)
    scores = _scores(d["scores"], k, where) if d.get("scores") is not None else None
    if d.get("ranking") is not None:
        ranking = _ranking(d["ranking"], k, where)
        if scores is not None:
            _check_scores_agree(scores, ranking, where)
    elif scores is not None:
        ranking = sorted(range(k), key=lambda i: -scores[i])
        _check_scores_agree(scores, ranking, where)
    else:
        raise BadRecord(f"{where}: field 'ranking' (or 'scores') is missing: a K-wise record needs an order")
    _check_distinct(responses, ranking, where)
    return PreferenceGroup(prompt, responses, ranking, scores, None, where, meta)


def _pairwise(d: dict[str, Any], where: str, meta: dict[str, Any]) -> PreferenceGroup:
    chosen, rejected = d["chosen"], d["rejected"]
    if d.get("prompt") not in (None, "", []):
        prompt = _prompt(d["prompt"], where, "prompt")
        responses = [_response(chosen, where, "chosen"), _response(rejected, where, "rejected")]
    else:
        p_c, r_c = _split_conversation(chosen, where, "chosen")
        p_r, r_r = _split_conversation(rejected, where, "rejected")
        if p_c != p_r:
            raise BadRecord(
                f"{where}: fields 'chosen' and 'rejected' differ before their last assistant turn; "
                "they must be two answers to the same conversation (or give a 'prompt' field)"
            )
        prompt = _simplify(p_c)
        responses = [r_c, r_r]
    margin = None
    if d.get("margin") is not None:
        m = d["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float, str)):
            raise BadRecord(f"{where}: field 'margin' must be a number, got {m!r}")
        try:
            margin = float(m)
        except ValueError:
            raise BadRecord(f"{where}: field 'margin' must be a number, got {m!r}") from None
    if responses[0] == responses[1]:
        raise BadRecord(f"{where}: fields 'chosen' and 'rejected' are identical (a tie is not a preference)")
    return PreferenceGroup(prompt, responses, [0, 1], None, margin, where, meta)


def _prompt(p: Any, where: str, name: str) -> Prompt:
    if isinstance(p, str):
        if not p.strip():
            raise BadRecord(f"{where}: field '{name}' is empty")
        return p
    return _simplify(_messages(p, where, name))


def _simplify(messages: list[dict[str, str]]) -> Prompt:
    """A conversation that is a single user turn becomes its text (the form PPO and generation use)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def _messages(m: Any, where: str, name: str) -> list[dict[str, str]]:
    if not isinstance(m, list) or not m:
        raise BadRecord(f"{where}: field '{name}' must be a string or a non-empty list of chat messages, got {m!r:.80}")
    out = []
    for i, msg in enumerate(m):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise BadRecord(f"{where}: field '{name}[{i}]' must be an object with a string 'content', got {msg!r:.80}")
        if msg.get("role") not in ROLES:
            raise BadRecord(f"{where}: field '{name}[{i}].role' is {msg.get('role')!r}; expected one of {ROLES}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _response(r: Any, where: str, name: str) -> str:
    if isinstance(r, str):
        return r
    msgs = _messages(r, where, name)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise BadRecord(
            f"{where}: field '{name}' must be a string or a single assistant message when a prompt is given, "
            f"got {len(msgs)} messages"
        )
    return msgs[0]["content"]


def _split_conversation(conv: Any, where: str, name: str) -> tuple[list[dict[str, str]], str]:
    """(turns before the last assistant turn, that turn's text) of a whole conversation."""
    if isinstance(conv, str):
        msgs = parse_hh_text(conv)
        if msgs is None:
            raise BadRecord(
                f"{where}: field '{name}' is plain text but there is no 'prompt' field; give a prompt, or whole "
                "conversations as chat messages or Anthropic-HH text ('\\n\\nHuman: ...\\n\\nAssistant: ...')"
            )
    else:
        msgs = _messages(conv, where, name)
    if msgs[-1]["role"] != "assistant":
        raise BadRecord(f"{where}: field '{name}' must end with an assistant turn (the response being ranked)")
    if len(msgs) < 2:
        raise BadRecord(f"{where}: field '{name}' has no turn before the assistant's answer (no prompt)")
    return msgs[:-1], msgs[-1]["content"]


def parse_hh_text(text: str) -> list[dict[str, str]] | None:
    """Anthropic-HH conversation text as chat messages; None when the text has no HH turn markers.

    >>> parse_hh_text("\\n\\nHuman: hi\\n\\nAssistant: hello")
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
    """
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def _ranking(r: Any, k: int, where: str) -> list[int]:
    if not isinstance(r, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in r):
        raise BadRecord(f"{where}: field 'ranking' must be a list of response indices (best first), got {r!r:.80}")
    bad = [i for i in r if not 0 <= i < k]
    if bad:
        raise BadRecord(f"{where}: field 'ranking' has index {bad[0]} out of range for {k} responses")
    repeated = sorted({i for i in r if r.count(i) > 1})
    if repeated:
        raise BadRecord(
            f"{where}: field 'ranking' repeats index {repeated[0]}; a ranking lists each response exactly once "
            "(ties are not accepted)"
        )
    missing = sorted(set(range(k)) - set(r))
    if missing:
        raise BadRecord(f"{where}: field 'ranking' misses index {missing[0]} ({len(r)} indices for {k} responses)")
    return list(r)


def _scores(s: Any, k: int, where: str) -> list[float]:
    if not isinstance(s, list) or len(s) != k:
        raise BadRecord(f"{where}: field 'scores' must be a list of {k} numbers (one per response), got {s!r:.80}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in s):
        raise BadRecord(f"{where}: field 'scores' must hold numbers, got {s!r:.80}")
    return [float(x) for x in s]


def _check_scores_agree(scores: list[float], ranking: list[int], where: str) -> None:
    for a, b in zip(ranking, ranking[1:]):
        if scores[a] == scores[b]:
            raise BadRecord(
                f"{where}: field 'scores' ties responses {a} and {b} (both {scores[a]:g}); ties are not accepted "
                "(drop one of them, or give distinct scores)"
            )
        if scores[a] < scores[b]:
            raise BadRecord(
                f"{where}: fields 'ranking' and 'scores' disagree: response {a} is ranked above {b} "
                f"but scores {scores[a]:g} < {scores[b]:g}"
            )


def _check_distinct(responses: list[str], ranking: list[int], where: str) -> None:
    seen: dict[str, int] = {}
    for i in ranking:
        if responses[i] in seen:
            raise BadRecord(
                f"{where}: field 'responses' has identical responses {seen[responses[i]]} and {i} at different "
                "ranks (a tie; drop one of them)"
            )
        seen[responses[i]] = i


# ----------------------------------------------------------------------------- expansion


def expand_comparisons(group: PreferenceGroup) -> list[Comparison]:
    """All C(K,2) comparisons of a group: (ranking[i], ranking[j]) for i < j, each weighted 1/C(K,2).

    The margin is the score difference when the group has scores, else the pairwise record's margin, else 0.
    """
    r = group.ranking
    k = len(r)
    weight = 2.0 / (k * (k - 1))
    out = []
    for i in range(k):
        for j in range(i + 1, k):
            w, lo = r[i], r[j]
            if group.scores is not None:
                margin = group.scores[w] - group.scores[lo]
            else:
                margin = group.margin or 0.0
            out.append(Comparison(w, lo, weight, margin))
    return out


def to_pairwise(groups: list[PreferenceGroup]) -> list[dict[str, Any]]:
    """Independent pairs ``{"prompt", "chosen", "rejected", "margin"}``: every comparison of every group,
    weight 1 each (a group of K counts C(K,2) times: the ``kwise: pairs`` ablation)."""
    out = []
    for g in groups:
        for c in expand_comparisons(g):
            out.append(
                {
                    "prompt": g.prompt,
                    "chosen": g.responses[c.winner],
                    "rejected": g.responses[c.loser],
                    "margin": c.margin,
                }
            )
    return out


def split_heldout(
    groups: list[PreferenceGroup], fraction: float, seed: int
) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """Carve a held-out share off ``groups`` by prompt (a prompt's responses never straddle the split)."""
    return carve_held_out_by(groups, _prompt_key, fraction, seed)


def _prompt_key(group: PreferenceGroup) -> str:
    p = group.prompt
    return p if isinstance(p, str) else repr(p)


_RULES: SplitRules[PreferenceGroup] = SplitRules(
    "preference records",
    ("reward_train", "reward_eval"),
    group_by=_prompt_key,
    cap_held_out=False,
    section="reward.dataset",
)


# ----------------------------------------------------------------------------- loading


def load_preferences(spec: DatasetSpec, tasks_cfg: TasksConfig, seed: int) -> PreferenceData:
    """Training and held-out preference groups for a ``DatasetSpec``.

    ``source: default`` uses the generated ranked-response sets (``pipeline.data.tasks``); a file or
    ``hub:<name>`` is read and normalised, its held-out set coming from ``eval_source`` (all of it:
    ``max_records`` limits the training records only) or, when that is empty, from ``eval_fraction`` of its
    prompts (``pipeline.data.loader``).

    Raises:
        BadRecord: a bad record (``on_bad_record: error``), naming its location and field, or no usable
            training record.
        FileNotFoundError: a dataset file does not exist.
    """
    return load_split(spec, normalise_preference, _RULES, tasks_cfg, seed)
