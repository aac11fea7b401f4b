"""The generated tasks' checker: is a response the record's answer, and how close is it.

Answers compare after normalisation (case, whitespace, surrounding quotes and end punctuation); numbers
compare by value, letter answers need their letters spaced. :func:`score_answer` gives partial credit in
bands: 1.0 correct, [0.5, 0.9) well formed but wrong, [0, 0.4) malformed, so any near miss outranks any
malformed response.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from difflib import SequenceMatcher
from typing import Any

__all__ = [
    "SAY_FORMS",
    "say_word",
    "spaced",
    "answer_format",
    "has_checker",
    "check_answer",
    "score_answer",
    "response_class",
]

_NUMBER = re.compile(r"[+-]?\d+")
_LETTERS = re.compile(r"[a-z]( [a-z])*")
_EDGE_CHARS = " \t\r\n\"'`.!?,;:"
# Scores: correct 1.0; well-formed but wrong in [0.5, 0.9); malformed in [0, 0.4).
_WRONG_BASE, _WRONG_SPAN, _MALFORMED_SPAN = 0.5, 0.4, 0.4


def spaced(letters: Iterable[str]) -> str:
    """Letters separated by single spaces: the form of every letter answer (``k i n g``).

    >>> spaced("king")
    'k i n g'
    """
    return " ".join(letters)


def _normalise(text: Any) -> str:
    """Lowercase, collapse whitespace, strip surrounding quotes and trailing punctuation."""
    return " ".join(str(text).lower().split()).strip(_EDGE_CHARS)


def answer_format(answer: Any) -> str:
    """How an answer is compared: ``number`` (an integer), ``letters`` (single letters spaced) or ``text``.

    >>> answer_format("68"), answer_format("k i n g"), answer_format("to be")
    ('number', 'letters', 'text')
    """
    a = _normalise(answer)
    if _NUMBER.fullmatch(a):
        return "number"
    if _LETTERS.fullmatch(a):
        return "letters"
    return "text"


def _truth(record: dict[str, Any]) -> str:
    if record.get("answer") is None or not record.get("task"):
        where = f" (id {record['id']})" if "id" in record else ""
        raise ValueError(f"record{where} has no 'task'/'answer' fields, so it has no checker")
    return _normalise(record["answer"])


def has_checker(record: dict[str, Any]) -> bool:
    """A record can be checked when it carries the generated-task fields ``task`` and ``answer``."""
    return bool(record.get("task")) and record.get("answer") is not None


def check_answer(record: dict[str, Any], response: str) -> bool:
    """Whether ``response`` is the record's answer, ignoring case, extra whitespace and end punctuation.

    Numbers compare by value (``"068"`` is 68); letter answers need their letters spaced (``k i n g``).

    Raises:
        ValueError: the record has no ``task``/``answer`` (no checker).
    """
    return score_answer(record, response) == 1.0


def score_answer(record: dict[str, Any], response: str) -> float:
    """Partial credit in [0, 1]: 1.0 correct; [0.5, 0.9) well-formed but wrong; [0, 0.4) malformed.

    Well-formed wrong answers earn more the closer they are: ``0.5 + 0.4 / (1 + |error|)`` for numbers,
    ``0.5 + 0.4 * similarity`` of the letter sequences otherwise. A malformed response (empty, wrong
    format, rambling) earns ``0.4 * similarity`` of its text to the answer. Any near miss therefore
    outranks any malformed response.

    Raises:
        ValueError: the record has no ``task``/``answer`` (no checker).
    """
    if record.get("task") == "say":
        return _score_say(record, response)
    want, got = _truth(record), _normalise(response)
    fmt = answer_format(want)
    if fmt == "number" and _NUMBER.fullmatch(got):
        error = abs(int(got) - int(want))
        return 1.0 if error == 0 else _WRONG_BASE + _WRONG_SPAN / (1 + error)
    if fmt == "letters" and _LETTERS.fullmatch(got):
        if got == want:
            return 1.0
        return _WRONG_BASE + _WRONG_SPAN * SequenceMatcher(None, got.split(), want.split(), autojunk=False).ratio()
    if got == want:  # text answers
        return 1.0
    span = _WRONG_BASE + _WRONG_SPAN if fmt == "text" else _MALFORMED_SPAN
    return span * SequenceMatcher(None, got, want, autojunk=False).ratio()


SAY_FORMS: tuple[tuple[tuple[str, ...], str], ...] = (
    (('Say "{w}" in quotes.', 'Write "{w}" in double quotes.'), '"{w}"'),
    (('Shout "{w}"!', 'Say "{w}" with an exclamation mark.'), "{w}!"),
    (('Say "{w}" in parentheses.', 'Write "{w}" in round brackets.'), "({w})"),
    (('Ask "{w}" as a question.', 'Say "{w}" with a question mark.'), "{w}?"),
)
"""The ``say`` task's forms: (prompt phrasings, answer pattern). Every form decorates the word; the bare word, the
answer careless demonstrators give whatever was asked, is never right. The prompt quotes the word so that it is
the same BPE tokens as in every answer (a word after a space is other tokens than the word after a quote, and
copying across that mapping does not generalise to held-out words at this model size: measured,
data_cards/generated-tasks-sft.md). A bare-word form was dropped (v3): the reward model could not tell the right
bare word from a misspelled one (right-vs-wrong AUC 0.64 on those prompts), while it tells forms apart at 0.94-0.95."""

_WORDS = re.compile(r"[a-z]+")


def say_word(answer: str) -> str:
    """The word of a ``say`` answer: the one lowercase word of every form.

    >>> say_word("(king)"), say_word('"king"')
    ('king', 'king')
    """
    return _WORDS.findall(answer)[-1]


def _score_say(record: dict[str, Any], response: str) -> float:
    """The ``say`` task is about form, so only surrounding whitespace is forgiven: quotes, ``!``, case and
    repeats are what the prompt asks for. Right: the answer exactly. Near miss: the word itself appears (a
    different form, e.g. the bare word). Malformed: the word is missing or misspelled."""
    _truth(record)
    want, got = " ".join(str(record["answer"]).split()), " ".join(str(response).split())
    if got == want:
        return 1.0
    word = say_word(want)
    similarity = SequenceMatcher(None, got, want, autojunk=False).ratio()
    if word in _WORDS.findall(got):
        return _WRONG_BASE + _WRONG_SPAN * similarity
    return _MALFORMED_SPAN * similarity


def response_class(record: dict[str, Any], response: str) -> str:
    """``right``, ``near miss`` (well-formed but wrong) or ``malformed``, by :func:`score_answer`'s bands.

    >>> rec = {"task": "add", "answer": "103"}
    >>> [response_class(rec, r) for r in ("103", "101", "The answer is 103.")]
    ['right', 'near miss', 'malformed']
    """
    score = score_answer(record, response)
    return "right" if score == 1.0 else "near miss" if score >= _WRONG_BASE else "malformed"
