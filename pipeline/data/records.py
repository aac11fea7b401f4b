"""Reading records from local files and Hub datasets, with locations for error messages.

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
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Record",
    "BadRecord",
    "SkipCounter",
    "read_records",
    "normalise_all",
    "carve_held_out",
    "load_train_and_held_out",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


class BadRecord(ValueError):
    """A record that fits no accepted schema; the message names the location and the field."""


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

    A .jsonl line that is not valid JSON or not an object comes back as a Record with ``error`` set,
    so a caller in skip mode can go on reading.

    Raises:
        FileNotFoundError: the local file does not exist.
        BadRecord: a .json file that is not a list of objects, or an unsupported file type.
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
    if suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="strict") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield _record(line, f"{path}:{i}")
    elif suffix == ".json":
        data = _loads(path.read_text(encoding="utf-8"), str(path))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise BadRecord(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        for i, obj in enumerate(data):
            yield Record(f"{path}:record {i}", _as_object(obj, f"{path}:record {i}"))
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f), 1):
                yield Record(f"{path}:row {i}", dict(row))
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


def _record(line: str, where: str) -> Record:
    try:
        return Record(where, _as_object(_loads(line, where), where))
    except BadRecord as e:
        return Record(where, {}, error=str(e))


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def _as_object(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def normalise_all(
    records: Iterator[Record] | list[Record], normalise: Callable[[Record], T], on_bad_record: str = "error"
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


def carve_held_out(records: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split ``records`` into (train, held-out) with a seeded shuffle, keeping the original order in each.

    At least one record is held out (and one kept) when ``fraction > 0`` and there are two or more.

    >>> carve_held_out(list(range(10)), 0.2, seed=0)
    ([0, 1, 2, 3, 4, 5, 6, 9], [7, 8])
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(records) * fraction)) if fraction > 0 else 0
    if fraction > 0 and len(records) > 1:
        n_eval = min(max(n_eval, 1), len(records) - 1)
    held_idx = set(order[:n_eval])
    held = [r for i, r in enumerate(records) if i in held_idx]
    train = [r for i, r in enumerate(records) if i not in held_idx]
    return train, held


def load_train_and_held_out(
    spec: Any, normalise: Callable[[Record], T], seed: int, what: str
) -> tuple[list[T], list[T], int]:
    """The (train, held-out, skipped count) records of a file or ``hub:<name>`` ``DatasetSpec``.

    Held-out records come from ``spec.eval_source`` (split ``eval_split``, default ``split``) or, when that is
    empty, ``spec.eval_fraction`` is carved off the training records with a seeded shuffle.

    Raises:
        BadRecord: a bad record in ``on_bad_record: error`` mode, or no usable training record (``what`` names them).
        FileNotFoundError: a local source does not exist.
    """

    def read(source: str, split: str) -> tuple[list[T], SkipCounter]:
        records = read_records(source, split=split, hub_config=spec.hub_config, max_records=spec.max_records)
        return normalise_all(records, normalise, spec.on_bad_record)

    train, skipped = read(spec.source, spec.split)
    if spec.eval_source:
        held, skipped_eval = read(spec.eval_source, spec.eval_split or spec.split)
        skipped.skipped += skipped_eval.skipped
    else:
        train, held = carve_held_out(train, spec.eval_fraction, seed)
    if not train:
        raise BadRecord(f"{spec.source}: no usable {what} (skipped {skipped.skipped} bad ones)")
    log.info(
        "%s: %d train, %d held-out from %s (%d bad skipped)", what, len(train), len(held), spec.source, skipped.skipped
    )
    return train, held, skipped.skipped
