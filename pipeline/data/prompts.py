"""Prompt records for PPO: every accepted schema normalised to chat ``messages`` that end with a user turn.

Accepted record schemas (DESIGN.md, "Data"):

==============  ====================================================================================
``prompt``      a string (one user turn) or a list of ``{"role", "content"}`` turns
``messages``    a list of turns; a trailing assistant turn (an SFT record) is dropped, so the prompt is
                everything before the answer
==============  ====================================================================================

Each becomes a :class:`PromptRecord` ``{"messages": [...], "prompt": <last user text>, task?, answer?, id?}``; ``task`` and
``answer`` are kept for the generated tasks' checker. A bad record raises
:class:`~pipeline.data.records.BadRecord` naming the file, the line or row and the field (or is skipped
and counted with ``on_bad_record: skip``).

>>> from pipeline.data.records import Record
>>> normalise_prompt(Record("p.jsonl:3", {"prompt": "What is 2 + 2?"}))["messages"]
[{'role': 'user', 'content': 'What is 2 + 2?'}]
"""

from __future__ import annotations

import logging
from typing import Any, cast

from pipeline.config import DatasetSpec, TasksConfig
from pipeline.data.loader import Split, SplitRules, load_split
from pipeline.data.records import BadRecord, Message, Record, TaskFields, chat_turns

__all__ = ["PromptRecord", "PromptData", "normalise_prompt", "load_prompts"]

log = logging.getLogger(__name__)

_PROMPT_EXPECTED = "a string or a non-empty list of {role, content} turns"
_PASSTHROUGH = ("task", "answer", "id")


class PromptRecord(TaskFields):
    """A PPO prompt: the conversation so far, ending with the user turn the policy answers."""

    messages: list[Message]
    prompt: str
    """The last user turn's text."""


PromptData = Split[PromptRecord]
"""The PPO prompts of a run (:func:`load_prompts`)."""
_RULES: SplitRules[PromptRecord] = SplitRules("PPO prompts", ("ppo_train", "ppo_eval"), section="ppo.dataset")


def normalise_prompt(rec: Record) -> PromptRecord:
    """Normalise one ``prompt`` or ``messages`` record (see the module docstring).

    Raises:
        BadRecord: no ``prompt``/``messages`` field, a wrong type, an empty text, or no user turn to answer.
    """
    data, where = rec.data, rec.location
    if "prompt" in data:
        value = data["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise BadRecord(f"{where}: field 'prompt' is empty")
            turns = [{"role": "user", "content": value}]
        elif value is None:
            raise BadRecord(f"{where}: field 'prompt' is missing (null)")
        else:
            turns = chat_turns(value, "prompt", where, _PROMPT_EXPECTED)
        field = "prompt"
    elif "messages" in data:
        turns = chat_turns(data["messages"], "messages", where, _PROMPT_EXPECTED)
        field = "messages"
    else:
        keys = ", ".join(map(str, data)) or "none"
        raise BadRecord(f"{where}: a PPO record needs a 'prompt' or 'messages' field; fields found: {keys}")
    if turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if not turns or turns[-1]["role"] != "user":
        raise BadRecord(f"{where}: field '{field}' must end with a user turn for the policy to answer")
    out: dict[str, Any] = {"messages": turns, "prompt": turns[-1]["content"]}
    for key in _PASSTHROUGH:
        if data.get(key) is not None:
            out[key] = str(data[key]) if key == "answer" else data[key]
    return cast(PromptRecord, out)


def load_prompts(spec: DatasetSpec, tasks: TasksConfig, seed: int) -> PromptData:
    """Training and held-out prompts named by a :class:`DatasetSpec` (``ppo.dataset``).

    ``source: default`` uses the generated tasks (``generate_tasks(tasks).ppo_train/ppo_eval``). A file or
    ``hub:<name>`` source takes held-out prompts from ``eval_source`` or carves ``eval_fraction`` off the
    training records with a seeded shuffle (``pipeline.data.loader``).

    Raises:
        BadRecord: a bad record in ``on_bad_record: error`` mode (names file, line/row and field), or no usable prompt.
        FileNotFoundError: a local source does not exist.
    """
    return load_split(spec, normalise_prompt, _RULES, tasks, seed)
