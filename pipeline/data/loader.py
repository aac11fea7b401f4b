"""One loader for the fine-tuning datasets: the training and held-out records a ``DatasetSpec`` names.

SFT conversations (``pipeline.data.conversations``), PPO prompts (``pipeline.data.prompts``) and ranked
responses for the reward model (``pipeline.data.preferences``) are all loaded by :func:`load_split`, each
with its own normaliser and :class:`SplitRules`, into the one result type :class:`Split`:

- ``source: default``: the generated task sets (``pipeline.data.tasks``) the rules name, for training and
  held out; ``max_records`` keeps the first training records;
- a local file or ``hub:<name>``: read, normalised (a bad record raises, or is skipped and counted with
  ``on_bad_record: skip``), the held-out records coming from ``eval_source`` (split ``eval_split``, default
  ``split``) or, when that is empty, carved off the training records with a seeded shuffle
  (:func:`carve_held_out`, or :func:`carve_held_out_by` a key such as the prompt).

A Hub dataset that cannot be loaded (the Hub unreachable, offline mode, no such dataset, an unknown split or
config) is a ``StageError`` naming the config key (``sft.dataset.source``), the dataset and the cause
(:func:`hub_dataset_error`), for every stage alike.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pipeline.config import DatasetSpec, TasksConfig
from pipeline.data.records import BadRecord, Record, SkipCounter, normalise_all, read_records
from pipeline.data.tasks import generate_tasks
from pipeline.runs import StageError

__all__ = ["Split", "SplitRules", "load_split", "carve_held_out", "carve_held_out_by", "hub_dataset_error"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_EXAMPLES = 5


@dataclass
class Split(Generic[T]):
    """The training and held-out records of one dataset, normalised, and what was skipped."""

    train: list[T]
    held_out: list[T]
    skipped_by_split: dict[str, int] = field(default_factory=dict)
    """Bad records skipped (``on_bad_record: skip``) per split read: ``train``/``eval`` for a file or Hub
    source, the generated set's name for ``default``; a split with none skipped is absent."""
    skipped_examples: list[str] = field(default_factory=list)
    """The messages of the first (at most 5) skipped records."""
    source: str = ""
    """``spec.source``."""

    @property
    def skipped(self) -> int:
        """Bad records skipped, all splits together."""
        return sum(self.skipped_by_split.values())


@dataclass(frozen=True)
class SplitRules(Generic[T]):
    """What differs between the kinds of records the loader reads."""

    what: str
    """What the records are, for messages (e.g. ``SFT records``)."""
    default_sets: tuple[str, str]
    """The generated sets (``TaskSets`` fields) of ``source: default``: (training, held out)."""
    group_by: Callable[[T], str] | None = None
    """Carve the held-out share by this key (records sharing it stay on one side: e.g. a prompt's ranked
    responses); None: record by record."""
    cap_held_out: bool = True
    """``max_records`` also limits the records read from ``eval_source``."""
    section: str = "dataset"
    """The config section of the ``DatasetSpec`` (``sft.dataset``), for messages."""


def load_split(
    spec: DatasetSpec, normalise: Callable[[Record], T], rules: SplitRules[T], tasks: TasksConfig, seed: int
) -> Split[T]:
    """The training and held-out records ``spec`` names, each passed through ``normalise``.

    Args:
        spec: the stage's ``dataset`` section.
        normalise: one raw record to its normalised form; raises ``BadRecord`` naming location and field.
        rules: the generated sets of ``source: default`` and how to carve a held-out share.
        tasks: the generated tasks' config (``source: default``).
        seed: the seed of the held-out carve.

    Returns:
        The records and the skipped counts, ``source`` = ``spec.source``.

    Raises:
        BadRecord: a bad record in ``on_bad_record: error`` mode (names file, line/row and field), or no
            usable training record.
        FileNotFoundError: a local source does not exist.
        StageError: a Hub source cannot be loaded (:func:`hub_dataset_error`).
    """
    out: Split[T] = Split([], [], source=spec.source)

    def keep(records: Iterable[Record], split: str) -> list[T]:
        normalised, skipped = normalise_all(records, normalise, spec.on_bad_record)
        _count(skipped, split, out)
        return normalised

    def read(key: str, source: str, split: str, cap: int, name: str) -> list[T]:
        try:
            return keep(read_records(source, split, spec.hub_config, cap), name)
        except BadRecord:
            raise
        except Exception as e:  # the Hub, its cache or the datasets library: anywhere in the reading
            if source.startswith("hub:") and _is_hub_failure(e):
                raise hub_dataset_error(f"{rules.section}.{key}", source, split, spec.hub_config, e) from None
            raise

    if spec.source == "default":
        sets = generate_tasks(tasks)
        train_name, held_name = rules.default_sets
        out.train = keep(_in_memory(getattr(sets, train_name), train_name), train_name)
        out.held_out = keep(_in_memory(getattr(sets, held_name), held_name), held_name)
        if spec.max_records:
            out.train = out.train[: spec.max_records]
    else:
        out.train = read("source", spec.source, spec.split, spec.max_records, "train")
        if spec.eval_source:
            cap = spec.max_records if rules.cap_held_out else 0
            out.held_out = read("eval_source", spec.eval_source, spec.eval_split or spec.split, cap, "eval")
        elif rules.group_by is not None:
            out.train, out.held_out = carve_held_out_by(out.train, rules.group_by, spec.eval_fraction, seed)
        else:
            out.train, out.held_out = carve_held_out(out.train, spec.eval_fraction, seed)
        log.info(
            "%s: %d train, %d held-out from %s (%d bad skipped)",
            rules.what,
            len(out.train),
            len(out.held_out),
            spec.source,
            out.skipped,
        )
    if not out.train:
        raise BadRecord(f"{spec.source}: no usable {rules.what} (skipped {out.skipped} bad ones)")
    return out


def _is_hub_failure(e: Exception) -> bool:
    """An error of loading a Hub dataset (not a bug of ours): network, cache and HTTP errors (``OSError``: the
    ``ConnectionError`` of an unreachable Hub or of offline mode, ``DatasetNotFoundError``), a ``ValueError`` such
    as an unknown split or config, or any error of the ``datasets`` library."""
    datasets_error = getattr(sys.modules.get("datasets.exceptions"), "DatasetsError", ())
    return isinstance(e, (OSError, ValueError, datasets_error))


def _offline() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_dataset_error(key: str, source: str, split: str, hub_config: str, e: Exception) -> StageError:
    """The error for a Hub dataset (``source`` = ``hub:<name>``, the value of config key ``key``) that did not load
    with exception ``e``: the key, the dataset, the split (and config) and the cause in words.

    >>> print(hub_dataset_error("sft.dataset.source", "hub:org/qa", "train", "", ConnectionError("no route")))
    ... # doctest: +ELLIPSIS
    sft.dataset.source='hub:org/qa': cannot load the Hub dataset 'org/qa' (split 'train'): ...(no route)
    """
    name = source.removeprefix("hub:")
    what = f"split {split!r}" + (f", config {hub_config!r}" if hub_config else "")
    found = type(e).__name__
    if found == "DatasetNotFoundError":
        cause = f"no such dataset on the Hub, or it is private or gated (log in with `hf auth login`) ({e})"
    elif isinstance(e, ConnectionError) and _offline():
        cause = (
            "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and the dataset is not in the local datasets "
            f"cache; download it once with network access, or use a local file ({e})"
        )
    elif isinstance(e, ConnectionError):
        cause = f"the Hub could not be reached; check the network, or use a local file ({e})"
    else:
        cause = f"{found}: {e}"
    return StageError(f"{key}={source!r}: cannot load the Hub dataset {name!r} ({what}): {cause}")


def _in_memory(records: list[dict[str, Any]], name: str) -> Iterable[Record]:
    return (Record(f"default:{name}[{i}]", r) for i, r in enumerate(records))


def _count(counter: SkipCounter, split: str, out: Split) -> None:
    if counter.skipped:
        out.skipped_by_split[split] = out.skipped_by_split.get(split, 0) + counter.skipped
        out.skipped_examples.extend(counter.examples[: _MAX_EXAMPLES - len(out.skipped_examples)])


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


def carve_held_out_by(records: list[T], key: Callable[[T], str], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """:func:`carve_held_out` over the distinct keys (sorted): the records of a held-out key are held out.

    >>> carve_held_out_by(["a1", "b1", "a2", "c1"], lambda r: r[0], 0.4, seed=0)
    (['b1', 'c1'], ['a1', 'a2'])
    """
    _, held_keys = carve_held_out(sorted({key(r) for r in records}), fraction, seed)
    held = set(held_keys)
    return [r for r in records if key(r) not in held], [r for r in records if key(r) in held]
