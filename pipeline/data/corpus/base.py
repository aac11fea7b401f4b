"""What every corpus source shares: the error type, the reading statistics and byte decoding that counts
what it had to replace."""

from __future__ import annotations

import codecs
import re
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CorpusError", "CorpusStats", "decode_counting", "clean_str"]


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


def clean_str(text: str) -> tuple[str, int]:
    """Replace lone surrogates (possible via JSON ``\\ud800`` escapes) by U+FFFD, one each, and count them."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        return _SURROGATE.subn("\ufffd", text)
