"""Conversations for SFT: Q&A records of every accepted schema normalised to chat ``messages``.

Accepted record schemas (DESIGN.md, "Data"), tried in this order:

==========================  ==============================================================
``messages``                a list of ``{"role": system|user|assistant, "content": str}`` turns
``prompt`` / ``completion`` strings, or lists of turns (TRL's conversational prompt-completion)
``question`` / ``answer``   strings
``instruction`` / ``output`` strings, with an optional ``input`` appended to the instruction
==========================  ==============================================================

Each becomes a :class:`ChatRecord` ``{"messages": [...], **passthrough}`` where the passthrough keeps ``task``,
``answer`` and ``id`` (what the generated tasks' checker needs). A record that fits no schema raises
:class:`~pipeline.data.records.BadRecord` naming the location (file and line/row) and the field;
with ``on_bad_record: skip`` it is skipped and counted instead.

>>> from pipeline.data.records import Record
>>> normalise_chat(Record("qa.csv:row 1", {"question": "2+2?", "answer": "4"}))["messages"]
[{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]
"""

from __future__ import annotations

import logging
from typing import Any, cast

from pipeline.config import DatasetSpec, TasksConfig
from pipeline.data.loader import Split, SplitRules, load_split
from pipeline.data.records import ROLES, BadRecord, Message, Record, TaskFields, chat_turns, record_text

__all__ = ["ROLES", "SCHEMAS", "ChatRecord", "SFTData", "normalise_chat", "load_sft_data", "last_user_prompt"]

log = logging.getLogger(__name__)

SCHEMAS = "messages | prompt+completion | question+answer | instruction(+input)+output"
_PASSTHROUGH = ("task", "answer", "id")


class ChatRecord(TaskFields):
    """An SFT record: a conversation ending with the assistant turn to learn."""

    messages: list[Message]


SFTData = Split[ChatRecord]
"""The SFT records of a run (:func:`load_sft_data`)."""
_RULES: SplitRules[ChatRecord] = SplitRules("SFT records", ("sft_train", "sft_eval"), section="sft.dataset")


def _from_messages(data: dict[str, Any], where: str) -> list[Message]:
    turns = chat_turns(data["messages"], "messages", where)
    if not any(t["role"] == "assistant" for t in turns):
        raise BadRecord(f"{where}: field 'messages' has no assistant turn to train on")
    if turns[-1]["role"] != "assistant":
        raise BadRecord(f"{where}: field 'messages' must end with an assistant turn, ends with '{turns[-1]['role']}'")
    return turns


def _from_prompt_completion(data: dict[str, Any], where: str) -> list[Message]:
    if "completion" not in data:
        raise BadRecord(f"{where}: record has 'prompt' but no field 'completion' (schemas: {SCHEMAS})")
    prompt, completion = data["prompt"], data["completion"]
    if isinstance(prompt, str) or prompt is None:
        turns = [{"role": "user", "content": record_text(prompt, "prompt", where)}]
    else:
        turns = chat_turns(prompt, "prompt", where)
    if isinstance(completion, str) or completion is None:
        turns.append({"role": "assistant", "content": record_text(completion, "completion", where)})
    else:
        done = chat_turns(completion, "completion", where)
        if done[-1]["role"] != "assistant":
            raise BadRecord(f"{where}: field 'completion' must end with an assistant turn")
        turns.extend(done)
    return turns


def _from_question_answer(data: dict[str, Any], where: str) -> list[Message]:
    if "answer" not in data:
        raise BadRecord(f"{where}: record has 'question' but no field 'answer' (schemas: {SCHEMAS})")
    return [
        {"role": "user", "content": record_text(data["question"], "question", where)},
        {"role": "assistant", "content": record_text(_scalar(data["answer"]), "answer", where)},
    ]


def _from_instruction(data: dict[str, Any], where: str) -> list[Message]:
    if "output" not in data:
        raise BadRecord(f"{where}: record has 'instruction' but no field 'output' (schemas: {SCHEMAS})")
    user = record_text(data["instruction"], "instruction", where)
    extra = data.get("input")
    if extra is not None:
        extra = record_text(extra, "input", where, allow_empty=True)
        if extra.strip():
            user = f"{user}\n\n{extra}"  # Alpaca's layout: instruction, blank line, input
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": record_text(data["output"], "output", where)},
    ]


def _scalar(value: Any) -> Any:
    """Numbers as answers (``{"question": "2+2?", "answer": 4}``) read as text."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def normalise_chat(rec: Record) -> ChatRecord:
    """Normalise one record of any accepted schema to ``{"messages": [...], task?, answer?, id?}``.

    Raises:
        BadRecord: the record fits no schema, or a field has the wrong type or is empty; the message
            names ``rec.location`` and the field.
    """
    # Columnar sources (parquet, hub datasets) give every row every column, null where a row lacks it.
    data, where = {k: v for k, v in rec.data.items() if v is not None}, rec.location
    if "messages" in data:
        messages = _from_messages(data, where)
    elif "prompt" in data:
        messages = _from_prompt_completion(data, where)
    elif "question" in data:
        messages = _from_question_answer(data, where)
    elif "instruction" in data:
        messages = _from_instruction(data, where)
    else:
        keys = ", ".join(map(str, data)) or "none"
        raise BadRecord(f"{where}: record fits no SFT schema (expected {SCHEMAS}); fields found: {keys}")
    out: dict[str, Any] = {"messages": messages}
    for key in _PASSTHROUGH:
        if data.get(key) is not None and not (key == "answer" and "task" not in data):
            out[key] = _scalar(data[key]) if key == "answer" else data[key]
    return cast(ChatRecord, out)


def last_user_prompt(record: ChatRecord) -> str:
    """The last user message before the final assistant turn: the held-out prompt of a record."""
    users = [m["content"] for m in record["messages"][:-1] if m["role"] == "user"]
    return users[-1] if users else ""


def load_sft_data(spec: DatasetSpec, tasks: TasksConfig, seed: int) -> SFTData:
    """The train and held-out records a :class:`DatasetSpec` names, normalised to ``messages``.

    ``source: default`` uses the generated tasks (``generate_tasks(tasks).sft_train/sft_eval``). A file
    or ``hub:<name>`` source takes its held-out set from ``eval_source`` (split ``eval_split``, default
    ``split``) or, when that is empty, carves ``eval_fraction`` off the training records with a seeded
    shuffle (``pipeline.data.loader``).

    Raises:
        BadRecord: a bad record in ``on_bad_record: error`` mode (names file, line/row and field), or no
            usable training record.
        FileNotFoundError: a local source does not exist.
    """
    return load_split(spec, normalise_chat, _RULES, tasks, seed)
