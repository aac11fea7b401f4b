"""Reading records from local files and Hub datasets, with locations for error messages; the fields
normalised records share.

Every record comes with where it came from (``data/train.jsonl:17``, ``qa.csv:row 4``,
``hub:org/name[train] row 12``) so a schema error can name the file, the line or row and the field.

>>> import json, tempfile, os
>>> d = tempfile.mkdtemp(); p = os.path.join(d, "a.jsonl")
>>> _ = open(p, "w").write(json.dumps({"q": 1}) + "\\n")
>>> [(r.location.endswith("a.jsonl:1"), r.data) for r in read_records(p)]
[(True, {'q': 1})]
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, TypeVar

__all__ = [
    "ROLES",
    "Record",
    "BadRecord",
    "SkipCounter",
    "Message",
    "TaskFields",
    "read_records",
    "normalise_all",
    "record_text",
    "chat_turns",
    "MAX_CHARS_PER_TOKEN",
    "text_chars",
    "clip_turns",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


ROLES = ("system", "user", "assistant")
"""The chat roles a record's messages may have."""


class BadRecord(ValueError):
    """A record that fits no accepted schema; the message names the location and the field."""


class Message(TypedDict):
    """One chat turn of a normalised record."""

    role: str
    """``system``, ``user`` or ``assistant``."""
    content: str


class TaskFields(TypedDict, total=False):
    """What a normalised record keeps of the generated tasks' fields, for their checker (``pipeline.data.tasks``)."""

    task: str
    answer: str
    id: Any


@dataclass(frozen=True)
class Record:
    location: str
    """file:line (jsonl), file:row N (csv, parquet, json list) or hub:name[split] row N"""
    data: dict[str, Any]
    error: str = ""
    """Set when the line/row could not be read as a record (bad JSON, not an object)."""


@dataclass
class SkipCounter:
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, err: Exception) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(str(err))


def read_records(
    source: str, split: str = "train", hub_config: str = "", max_records: int = 0, streaming: bool = False
) -> Iterator[Record]:
    """Yield the records of a local .json/.jsonl/.parquet/.csv file or of ``hub:<name>``.

    A .jsonl line that is not valid UTF-8, not valid JSON or not an object, and a .csv row that is not valid
    UTF-8, come back as a Record with ``error`` set, so a caller in skip mode can go on reading.

    Raises:
        FileNotFoundError: the local file does not exist.
        BadRecord: a .json file that is not valid UTF-8 (naming the line) or not a list of objects, or an
            unsupported file type.
    """
    n = 0
    for rec in _iter_source(source, split, hub_config, streaming):
        yield rec
        n += 1
        if max_records and n >= max_records:
            return


def _iter_source(source: str, split: str, hub_config: str, streaming: bool) -> Iterator[Record]:
    if source.startswith("hub:"):
        yield from _iter_hub(source[4:], split, hub_config, streaming)
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    # Files are decoded with errors="surrogateescape": a byte that is not UTF-8 becomes one lone surrogate, which
    # _bad_byte finds, so the record (or file) it is in is reported with its place instead of a traceback.
    if suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where, bad = f"{path}:{i}", _bad_byte(line)
                yield Record(where, {}, error=_not_utf8(where, *bad)) if bad else _record(line, where)
    elif suffix == ".json":
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        if bad := _bad_byte(text):  # one document: the whole file is refused, naming the line
            at, byte = bad
            line, line_start = text.count("\n", 0, at) + 1, text.rfind("\n", 0, at) + 1
            raise BadRecord(_not_utf8(f"{path}:{line}", at - line_start, byte))
        data = _loads(text, str(path))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise BadRecord(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        for i, obj in enumerate(data):
            yield Record(f"{path}:record {i}", _as_object(obj, f"{path}:record {i}"))
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for i, row in enumerate(csv.DictReader(f), 1):
                cells = [c for c in (*row.keys(), *row.values()) if isinstance(c, str)]
                bad = next((b for c in cells if (b := _bad_byte(c))), None)
                error = f"{path}:row {i}: not valid UTF-8 (byte 0x{bad[1]:02x})" if bad else ""
                yield Record(f"{path}:row {i}", {} if bad else dict(row), error=error)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist()):
            yield Record(f"{path}:row {i}", row)
    else:
        raise BadRecord(f"{path}: unsupported file type '{suffix}' (use .json, .jsonl, .parquet or .csv)")


def _iter_hub(name: str, split: str, hub_config: str, streaming: bool) -> Iterator[Record]:
    import datasets

    ds = datasets.load_dataset(name, hub_config or None, split=split, streaming=streaming)
    for i, row in enumerate(ds):
        yield Record(f"hub:{name}[{split}] row {i}", dict(row))


def _bad_byte(text: str) -> tuple[int, int] | None:
    """Where the first byte that was not UTF-8 is in ``text`` (decoded with errors="surrogateescape"), and its
    value; None when every byte was.

    >>> _bad_byte(b"caf\\xe9!".decode("utf-8", "surrogateescape")), _bad_byte("café")
    ((3, 233), None)
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start, ord(text[e.start]) - 0xDC00
    return None


def _not_utf8(where: str, at: int, byte: int) -> str:
    return f"{where}: not valid UTF-8 (byte 0x{byte:02x} at column {at + 1})"


def _record(line: str, where: str) -> Record:
    try:
        return Record(where, _as_object(_loads(line, where), where))
    except BadRecord as e:
        return Record(where, {}, error=str(e))


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord(f"{where}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None


def _as_object(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def normalise_all(
    records: Iterable[Record], normalise: Callable[[Record], T], on_bad_record: str = "error"
) -> tuple[list[T], SkipCounter]:
    """Apply ``normalise`` to every record; on BadRecord raise (``error``) or skip and count (``skip``)."""
    out: list[T] = []
    skipped = SkipCounter()
    for rec in records:
        try:
            if rec.error:
                raise BadRecord(rec.error)
            out.append(normalise(rec))
        except BadRecord as e:
            if on_bad_record != "skip":
                raise
            skipped.add(e)
    if skipped.skipped:
        log.warning("skipped %d bad records (first: %s)", skipped.skipped, skipped.examples[0])
    return out, skipped


def record_text(value: Any, field: str, where: str, allow_empty: bool = False) -> str:
    """A record's text field, or a :class:`BadRecord` naming ``where`` and ``field`` (null, not a string, empty)."""
    if value is None:
        raise BadRecord(f"{where}: field '{field}' is missing (null)")
    if not isinstance(value, str):
        raise BadRecord(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRecord(f"{where}: field '{field}' is empty")
    return value


def chat_turns(
    value: Any, field: str, where: str, expected: str = "a non-empty list of {role, content} turns"
) -> list[Message]:
    """Validate a list of chat turns (``field`` names it in errors, e.g. ``messages``; ``expected`` says what the
    field may hold). A system turn may be empty; every other turn needs text.

    >>> chat_turns([{"role": "user", "content": "hi"}], "messages", "f.jsonl:1")
    [{'role': 'user', 'content': 'hi'}]
    >>> chat_turns([{"role": "bot", "content": "hi"}], "messages", "f.jsonl:1")
    Traceback (most recent call last):
    ...
    pipeline.data.records.BadRecord: f.jsonl:1: field 'messages[0].role' is 'bot', expected one of system, user, assistant
    """
    if hasattr(value, "tolist"):  # numpy arrays from parquet/datasets
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRecord(f"{where}: field '{field}' must be {expected}")
    turns: list[Message] = []
    for i, turn in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(
                f"{where}: field '{f}' must be an object with 'role' and 'content', got {type(turn).__name__}"
            )
        role = turn.get("role")
        if role not in ROLES:
            raise BadRecord(f"{where}: field '{f}.role' is {role!r}, expected one of {', '.join(ROLES)}")
        content = record_text(turn.get("content"), f"{f}.content", where, allow_empty=role == "system")
        turns.append({"role": role, "content": content})
    return turns


# ----------------------------------------------------------------------------- length before tokenising

MAX_CHARS_PER_TOKEN = 8
"""A text with more characters than this per token of a length limit is taken as certainly over the limit (BPE
tokens of English average about 4 characters), so it is dropped or cut before it is tokenised: tokenising a
10 MB record only to drop it took peak memory from 0.5 to 4.3 GB (issue 17)."""


def text_chars(value: Any) -> int:
    """Characters of a prompt or response: a string's length, or the summed ``content`` of chat turns.

    >>> text_chars("abc"), text_chars([{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}])
    (3, 3)
    """
    if isinstance(value, str):
        return len(value)
    return sum(len(t.get("content") or "") for t in value)


def clip_turns(turns: list[Message], max_chars: int, keep: str = "start") -> list[Message]:
    """The chat turns cut to at most ``max_chars`` characters of content, keeping the ``start`` of the
    conversation (turns past the cut are left out) or its ``end`` (turns before it are left out).

    >>> t = [{"role": "user", "content": "abcd"}, {"role": "assistant", "content": "efgh"}]
    >>> clip_turns(t, 6)
    [{'role': 'user', 'content': 'abcd'}, {'role': 'assistant', 'content': 'ef'}]
    >>> clip_turns(t, 2, keep="end")
    [{'role': 'assistant', 'content': 'gh'}]
    """
    ordered = turns if keep == "start" else turns[::-1]
    out: list[Message] = []
    left = max_chars
    for turn in ordered:
        if left <= 0:
            break
        content = turn["content"]
        cut = content if len(content) <= left else (content[:left] if keep == "start" else content[-left:])
        out.append({**turn, "content": cut})
        left -= len(cut)
    return out if keep == "start" else out[::-1]
