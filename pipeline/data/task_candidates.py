"""Ranked candidate responses for the generated tasks' reward data: the answer, near misses, malformed ones.

A near miss is well formed but wrong (off by a little, one letter swapped, dropped, doubled or replaced); a
malformed response has the wrong form (empty, rambling, repeated, unspaced, another question's answer).
:func:`ranked_candidates` draws K of them with distinct scores (``task_checks.score_answer``);
:func:`to_pairs` expands a ranked record into its preference pairs.
"""

from __future__ import annotations

import random
from typing import Any

from pipeline.data.task_checks import SAY_FORMS, answer_format, say_word, score_answer, spaced

__all__ = ["ranked_candidates", "to_pairs"]

_FILLER = ("and", "so", "my", "good", "lord", "i", "think", "it", "is", "perhaps", "or", "thou", "art")


def _near_misses(kind: str, answer: str, rng: random.Random) -> list[str]:
    """Well-formed wrong answers close to ``answer``: off by a little, one letter wrong."""
    out: list[str] = []
    if kind == "say":
        return _say_near_misses(answer, rng)
    if answer_format(answer) == "number":
        n = int(answer)
        out += [str(n + d) for d in (1, -1, 2, -2, 10, -10, 3, -3) if n + d >= 0]
        if len(answer) > 1:
            out.append(str(int(answer[::-1])))  # digits swapped
        out.append(answer + answer[-1])  # a digit doubled
    else:
        letters = answer.split()
        i = rng.randrange(len(letters))
        j = i + 1 if i + 1 < len(letters) else i - 1
        swapped = list(letters)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        replaced = list(letters)
        replaced[i] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != letters[i]])
        out += [
            spaced(swapped),
            spaced(letters[:i] + letters[i + 1 :]),
            spaced(letters[: i + 1] + letters[i:]),
            spaced(replaced),
        ]
        if kind in ("reverse", "spell", "sort"):
            out.append(spaced(reversed(letters)))  # the other direction
    rng.shuffle(out)
    return [o for o in out if o != answer and answer_format(o) == answer_format(answer)]


def _say_near_misses(answer: str, rng: random.Random) -> list[str]:
    """The word in the other forms (the bare word first, what careless demonstrations give), then the asked
    form with one letter of the word replaced."""
    word = say_word(answer)
    others = [form.format(w=word) for _, form in SAY_FORMS]
    others = [o for o in others if o != answer]
    rng.shuffle(others)
    i = rng.randrange(len(word))
    typo = word[:i] + rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != word[i]]) + word[i + 1 :]
    return [word, *others, answer.replace(word, typo)]  # every form decorates the word: the bare word is wrong


def _malformed(answer: str, rng: random.Random, words: tuple[str, ...]) -> list[str]:
    """Responses in the wrong form: empty, rambling, repeated, unspaced, another question's answer."""
    number = answer_format(answer) == "number"
    filler = " ".join(rng.sample(_FILLER, 4))
    other = str(rng.randrange(2, 199)) if not number else spaced(rng.choice(words))
    out = [
        "",
        f"{answer}, {answer}, {answer}",
        f"{answer} {filler}",
        f"I think it is {answer}, my lord.",
        f"The answer is {answer}.",
        f"Answer: {answer}",
        " ".join(rng.sample(words, 3)),
        other,
        f"{filler} {other}",
        answer.replace(" ", "") if not number else " ".join(answer),
        answer.replace(" ", "-"),
    ]
    rng.shuffle(out)
    return [o for o in out if o != answer]


def ranked_candidates(
    record: dict[str, Any], k: int, rng: random.Random, words: tuple[str, ...], malformed: bool = True
) -> tuple[list[str], list[float]]:
    """K distinct responses with distinct scores: the answer, near misses, then malformed ones (or, with
    ``malformed=False``, the answer and near misses only)."""
    answer = record["answer"]
    n_near = (1 if rng.random() < 0.5 else 0) if k == 2 else (1 if k == 3 else 2)
    chosen: dict[str, float] = {answer: 1.0}
    near, bad = _near_misses(record["task"], answer, rng), _malformed(answer, rng, words)
    if not malformed:  # drawn above all the same, so both settings consume the random stream alike
        bad = []
    # near misses up to their quota, then malformed ones, then more near misses if still short of k
    for pool, quota in ((near, n_near), (bad, k), (near, k)):
        taken = 0
        for text in pool:
            score = round(score_answer(record, text), 4)
            if len(chosen) == k or taken == quota:
                break
            if text not in chosen and score not in chosen.values():
                chosen[text] = score
                taken += 1
    if len(chosen) < k:
        raise ValueError(
            f"{record['id']}: found only {len(chosen)} distinct candidates for data.tasks.responses_per_prompt={k}"
            + ("" if malformed else " (data.tasks.malformed_candidates=false: near misses only)")
        )
    texts = list(chosen)
    rng.shuffle(texts)
    return texts, [chosen[t] for t in texts]


def to_pairs(record: dict[str, Any], margin: bool = False) -> list[dict[str, Any]]:
    """Expand a K-wise ranked record into its preference pairs (chosen ranked above rejected).

    Gives all C(K, 2) pairs, best-first order; a pair whose two scores are equal is left out.

    Args:
        record: ``prompt``, ``responses``, ``ranking`` (indices, best first) and optional ``scores``.
        margin: also give ``margin`` = score(chosen) - score(rejected) (TRL's reward loss uses a
            ``margin`` column whenever present, so it is opt-in).

    Raises:
        ValueError: ``ranking`` is not a permutation of the response indices.

    >>> rec = {"prompt": "What is 2 + 2?", "responses": ["5", "4", ""], "ranking": [1, 0, 2]}
    >>> [(p["chosen"], p["rejected"]) for p in to_pairs(rec)]
    [('4', '5'), ('4', ''), ('5', '')]
    """
    responses, ranking = record["responses"], record["ranking"]
    if sorted(ranking) != list(range(len(responses))):
        raise ValueError(
            f"record {record.get('id', '')!r}: 'ranking' {ranking} is not a permutation of 0..{len(responses) - 1}"
        )
    scores = record.get("scores")
    pairs = []
    for a, i in enumerate(ranking):
        for j in ranking[a + 1 :]:
            if scores is not None and scores[i] == scores[j]:
                continue
            pair = {"prompt": record["prompt"], "chosen": responses[i], "rejected": responses[j]}
            if margin and scores is not None:
                pair["margin"] = float(scores[i]) - float(scores[j])
            pairs.append(pair)
    return pairs
