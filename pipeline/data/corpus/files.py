"""Corpus documents from local files (.txt, .jsonl, .parquet) and from Hugging Face datasets.

A record without a string ``text_field`` is an error naming file:line and field, or is skipped and counted
with ``on_bad_record=skip``.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...config import CorpusConfig
from .base import CorpusError, CorpusStats, clean_str, decode_counting

__all__ = ["file_documents", "hub_documents", "glob_files"]

log = logging.getLogger(__name__)


def glob_files(pattern: str) -> list[str]:
    """The files (not folders) a ``data.corpus.paths`` glob matches, ``~`` expanded, ``**`` recursive; unsorted."""
    return [m for m in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(m).is_file()]


def _resolve_paths(cfg: CorpusConfig) -> list[Path]:
    if not cfg.paths:
        raise CorpusError("data.corpus.paths is empty: data.corpus.source=files needs .txt/.jsonl/.parquet files")
    out: list[Path] = []
    for pattern in cfg.paths:
        p = Path(pattern).expanduser()
        if glob.has_magic(pattern):
            matches = sorted(Path(m) for m in glob_files(pattern))
            if not matches:
                raise CorpusError(f"data.corpus.paths: no file matches {pattern!r}")
            out.extend(matches)
        elif p.is_file():
            out.append(p)
        else:
            raise CorpusError(f"data.corpus.paths: file not found: {p}")
    return out


def file_documents(cfg: CorpusConfig, stats: CorpusStats) -> Iterator[str]:
    """The documents of the local files ``data.corpus.paths`` names (.txt, .jsonl, .parquet; globs allowed)."""
    for path in _resolve_paths(cfg):
        suffix = path.suffix.lower()
        stats.files.append(str(path))
        if suffix == ".txt":
            yield from _txt_documents(path, cfg.txt_document_separator, stats)
        elif suffix == ".jsonl":
            yield from _jsonl_documents(path, cfg, stats)
        elif suffix == ".parquet":
            yield from _parquet_documents(path, cfg, stats)
        else:
            raise CorpusError(
                f"data.corpus.paths: {path}: unsupported file type {suffix!r} (use .txt, .jsonl or .parquet)"
            )


def _txt_documents(path: Path, separator: str, stats: CorpusStats) -> Iterator[str]:
    text, bad = decode_counting(path.read_bytes())
    if bad:
        log.warning("%s: %d undecodable bytes replaced by U+FFFD", path, bad)
    stats.replaced_bytes += bad
    if separator:
        yield from text.split(separator)
    else:
        yield text


def _bad(stats: CorpusStats, cfg: CorpusConfig, message: str) -> None:
    if cfg.on_bad_record == "skip":
        stats.skip(message)
        return
    raise CorpusError(message + " (set data.corpus.on_bad_record=skip to skip such records)")


def _text_of(obj: Any, where: str, cfg: CorpusConfig, stats: CorpusStats) -> str | None:
    if not isinstance(obj, dict):
        _bad(stats, cfg, f"{where}: expected a JSON object, got {type(obj).__name__}")
        return None
    if cfg.text_field not in obj:
        _bad(stats, cfg, f"{where}: record has no field '{cfg.text_field}' (data.corpus.text_field)")
        return None
    value = obj[cfg.text_field]
    if not isinstance(value, str):
        _bad(stats, cfg, f"{where}: field '{cfg.text_field}' is {type(value).__name__}, expected a string")
        return None
    text, bad = clean_str(value)
    stats.replaced_bytes += bad
    return text


def _jsonl_documents(path: Path, cfg: CorpusConfig, stats: CorpusStats) -> Iterator[str]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line, bad = decode_counting(raw)
            stats.replaced_bytes += bad
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(stats, cfg, f"{path}:{n}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
                continue
            text = _text_of(obj, f"{path}:{n}", cfg, stats)
            if text is not None:
                yield text


def _parquet_documents(path: Path, cfg: CorpusConfig, stats: CorpusStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for non-parquet input
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    if cfg.text_field not in pf.schema_arrow.names:
        raise CorpusError(
            f"{path}: no column '{cfg.text_field}' (data.corpus.text_field); columns: {', '.join(pf.schema_arrow.names)}"
        )
    row = 0
    for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            text = _text_of({cfg.text_field: value}, f"{path}:row {row}", cfg, stats)
            row += 1
            if text is not None:
                yield text


def hub_documents(cfg: CorpusConfig, stats: CorpusStats) -> Iterator[str]:
    """The documents of the Hugging Face dataset ``data.corpus.hub_name`` (``text_field`` of each row)."""
    if not cfg.hub_name:
        raise CorpusError("data.corpus.hub_name is empty: data.corpus.source=hub needs a dataset name")
    import datasets

    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config or None, split=cfg.split, streaming=cfg.streaming)
    except Exception as e:  # network, missing config/split, auth: all reported with the config keys
        raise CorpusError(
            f"data.corpus.hub_name={cfg.hub_name!r} (hub_config={cfg.hub_config!r}, split={cfg.split!r}): "
            f"could not load the dataset: {type(e).__name__}: {e}"
        ) from None
    stats.files.append(f"hub:{cfg.hub_name}")
    for i, row in enumerate(ds):
        text = _text_of(row, f"hub:{cfg.hub_name}[{cfg.split}] row {i}", cfg, stats)
        if text is not None:
            yield text
