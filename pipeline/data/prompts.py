"""Prompt records for PPO: every accepted schema normalised to chat ``messages`` that end with a user turn.

Accepted record schemas (DESIGN.md, "Data"):

==============  ====================================================================================
``prompt``      a string (one user turn) or a list of ``{"role", "content"}`` turns
``messages``    a list of turns; a trailing assistant turn (an SFT record) is dropped, so the prompt is
                everything before the answer
==============  ====================================================================================

Each becomes ``{"messages": [...], "prompt": <last user text>, task?, answer?, id?}``; ``task`` and
``answer`` are kept for the generated tasks' checker. A bad record raises
:class:`~pipeline.data.records.BadRecord` naming the file, the line or row and the field (or is skipped
and counted with ``on_bad_record: skip``).

>>> from pipeline.data.records import Record
>>> normalise_prompt(Record("p.jsonl:3", {"prompt": "What is 2 + 2?"}))["messages"]
[{'role': 'user', 'content': 'What is 2 + 2?'}]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.config import DatasetSpec, TasksConfig
from pipeline.data.records import BadRecord, Record, load_train_and_held_out

__all__ = ["PromptData", "normalise_prompt", "load_prompts"]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_PASSTHROUGH = ("task", "answer", "id")


@dataclass
class PromptData:
    train: list[dict[str, Any]]
    held_out: list[dict[str, Any]]
    skipped: int
    source: str


def _turns(value: Any, field: str, where: str) -> list[dict[str, str]]:
    if hasattr(value, "tolist"):  # numpy arrays from parquet/datasets
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRecord(f"{where}: field '{field}' must be a string or a non-empty list of {{role, content}} turns")
    turns = []
    for i, turn in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(
                f"{where}: field '{f}' must be an object with 'role' and 'content', got {type(turn).__name__}"
            )
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise BadRecord(f"{where}: field '{f}.role' is {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or (role != "system" and not content.strip()):
            raise BadRecord(f"{where}: field '{f}.content' must be a non-empty string")
        turns.append({"role": role, "content": content})
    return turns


def normalise_prompt(rec: Record) -> dict[str, Any]:
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
            turns = _turns(value, "prompt", where)
        field = "prompt"
    elif "messages" in data:
        turns = _turns(data["messages"], "messages", where)
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
    return out


def load_prompts(spec: DatasetSpec, tasks: TasksConfig, seed: int) -> PromptData:
    """Training and held-out prompts named by a :class:`DatasetSpec` (``ppo.dataset``).

    ``source: default`` uses the generated tasks (``generate_tasks(tasks).ppo_train/ppo_eval``). A file or
    ``hub:<name>`` source takes held-out prompts from ``eval_source`` or carves ``eval_fraction`` off the
    training records with a seeded shuffle.

    Raises:
        BadRecord: a bad record in ``on_bad_record: error`` mode (names file, line/row and field), or no usable prompt.
        FileNotFoundError: a local source does not exist.
    """
    if spec.source == "default":
        from pipeline.data.tasks import generate_tasks

        sets = generate_tasks(tasks)
        train = [normalise_prompt(Record(f"default:ppo_train[{i}]", r)) for i, r in enumerate(sets.ppo_train)]
        held = [normalise_prompt(Record(f"default:ppo_eval[{i}]", r)) for i, r in enumerate(sets.ppo_eval)]
        if spec.max_records:
            train = train[: spec.max_records]
        return PromptData(train, held, 0, "default")
    train, held, skipped = load_train_and_held_out(spec, normalise_prompt, seed, "PPO prompts")
    return PromptData(train, held, skipped, spec.source)
