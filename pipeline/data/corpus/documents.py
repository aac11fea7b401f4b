"""The corpus as one stream of documents, whatever its source (``data.corpus.source``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from ...config import CorpusConfig
from .base import CorpusError, CorpusStats
from .default import DEFAULT_PACKAGE, default_documents
from .files import file_documents, hub_documents

__all__ = ["iter_documents", "head_bytes"]

log = logging.getLogger(__name__)


def iter_documents(cfg: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[str]:
    """Yield the non-empty documents of the corpus described by ``cfg`` (at most ``cfg.max_documents``).

    Args:
        cfg: the ``data.corpus`` config section.
        stats: filled in as documents are read (counts, replaced bytes, skipped records).

    Raises:
        CorpusError: no files/dataset, no non-empty document, a bad record (``on_bad_record=error``),
            or the default corpus could not be downloaded.
    """
    stats = stats if stats is not None else CorpusStats()
    if cfg.source == "default":
        raw: Iterator[str] = default_documents(cfg, stats)
        where = f"the default corpus ({DEFAULT_PACKAGE})"
    elif cfg.source == "files":
        raw = file_documents(cfg, stats)
        where = f"data.corpus.paths={list(cfg.paths)}"
    elif cfg.source == "hub":
        raw = hub_documents(cfg, stats)
        where = f"data.corpus.hub_name={cfg.hub_name!r} (config {cfg.hub_config!r}, split {cfg.split!r})"
    else:
        raise CorpusError(f"data.corpus.source: unknown source {cfg.source!r} (use default, files or hub)")
    for doc in raw:
        if not doc or not doc.strip():
            stats.empty_documents += 1
            continue
        stats.documents += 1
        stats.chars += len(doc)
        yield doc
        if cfg.max_documents and stats.documents >= cfg.max_documents:
            break
    if stats.replaced_bytes:
        log.warning("corpus: replaced %d undecodable bytes by U+FFFD", stats.replaced_bytes)
    if stats.skipped_records:
        log.warning("corpus: skipped %d bad records (first: %s)", stats.skipped_records, stats.skipped_examples[0])
    if stats.documents == 0:
        detail = []
        if stats.empty_documents:
            detail.append(f"{stats.empty_documents} empty")
        if stats.skipped_records:
            detail.append(f"{stats.skipped_records} bad records skipped")
        raise CorpusError(f"no non-empty documents in {where}" + (f" ({', '.join(detail)})" if detail else ""))


def head_bytes(documents: Iterable[str], max_bytes: int) -> list[str]:
    """The first documents of ``documents`` holding at most ``max_bytes`` UTF-8 bytes (the last one cut).

    >>> head_bytes(["abc", "def", "ghi"], 5)
    ['abc', 'de']
    """
    out: list[str] = []
    left = max_bytes
    for doc in documents:
        data = doc.encode("utf-8")
        if len(data) >= left:
            cut = data[:left].decode("utf-8", errors="ignore")
            if cut:
                out.append(cut)
            break
        out.append(doc)
        left -= len(data)
    return out
