"""Token shards: documents tokenised in parallel into memory-mapped train/val files, and a batch sampler.

Layout of a shard folder (written to ``<dir>.tmp`` and renamed, so a folder that exists is complete)::

    index.json           dtype, vocab size, eot id, per-split shard list with token and document counts,
                         corpus statistics (replaced bytes, skipped records), seed and val_fraction
    train_000.bin ...    flat token ids (uint16, or uint32 when the vocabulary exceeds 65,536); each document
    val_000.bin ...      is followed by the eot token; shards hold whole documents (~``shard_tokens`` each)

The train/val split is by document, never inside one: document ``i`` goes to val when a hash of
(seed, i) falls below ``val_fraction``. When that leaves a split empty and there are >= 2 documents,
the last document moves to the empty split, so both are non-empty. One document only is an error (set
``data.corpus.txt_document_separator`` to split a single text file into documents).

Reading follows nanoGPT: random windows of ``block_size + 1`` tokens, ``x`` = the first ``block_size``,
``y`` = the same shifted by one. :class:`TokenShards` opens each shard's ``np.memmap`` once; windows are
drawn from a ``torch.Generator`` only, so saving and restoring its state resumes the exact sequence.

Usage::

    write_shards(iter_documents(cfg.data.corpus, stats), tokenizer_dir, out_dir, seed=1337, val_fraction=0.05)
    train = TokenShards(out_dir, "train")
    x, y = train.sample_batch(16, 256, generator)      # (16, 256) int64 each
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tokenizer import Encoder, load_encoder

__all__ = ["ShardError", "write_shards", "split_of", "TokenShards", "INDEX_FILE", "SPLITS"]

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SPLITS = ("train", "val")


class ShardError(ValueError):
    """Shards cannot be written or read as asked; the message names the folder, split and numbers."""


def split_of(doc_index: int, seed: int, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for document ``doc_index``, deterministic in (seed, index).

    >>> [split_of(i, 0, 0.5) for i in range(6)]
    ['val', 'val', 'val', 'train', 'val', 'train']
    """
    h = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") / 2.0**64 < val_fraction else "train"


# ----------------------------------------------------------------------------- writing


_worker_encoder: Encoder | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_encoder
    _worker_encoder = load_encoder(tokenizer_dir)


def _encode_chunk(job: tuple[list[str], str]) -> list[np.ndarray]:
    docs, dtype = job
    assert _worker_encoder is not None
    eot = _worker_encoder.eot_token
    out = []
    for d in docs:
        ids = _worker_encoder.encode_ordinary(d)
        ids.append(eot)
        out.append(np.asarray(ids, dtype=dtype))
    return out


@dataclass
class _Split:
    name: str
    root: Path
    shard_tokens: int
    dtype: np.dtype
    shards: list[dict[str, Any]] = field(default_factory=list)
    last: np.ndarray | None = None
    """The last document written (kept to move it when the other split would stay empty)."""
    _file: Any = None
    """Open handle on the last shard (one open per shard, not per document)."""

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.shards)

    def append(self, ids: np.ndarray) -> None:
        if not self.shards or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            self.shards.append({"file": f"{self.name}_{len(self.shards):03d}.bin", "tokens": 0, "documents": 0})
        cur = self.shards[-1]
        if self._file is None:
            self._file = open(self.root / cur["file"], "ab")  # closed by close()
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        cur["tokens"] += len(ids)
        cur["documents"] += 1
        self.last = ids

    def pop_last(self) -> np.ndarray:
        """Remove the last document written (it is at the end of the last shard)."""
        assert self.last is not None and self.shards
        self.close()
        ids, cur = self.last, self.shards[-1]
        path = self.root / cur["file"]
        cur["tokens"] -= len(ids)
        cur["documents"] -= 1
        with open(path, "r+b") as f:
            f.truncate(cur["tokens"] * self.dtype.itemsize)
        if cur["documents"] == 0:
            path.unlink()
            self.shards.pop()
        self.last = None
        return ids

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_shards(
    documents: Iterable[str],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    val_fraction: float,
    num_proc: int = 0,
    shard_tokens: int = 100_000_000,
    max_tokens: int = 0,
    chunk_docs: int = 64,
    corpus_stats: Any = None,
) -> dict[str, Any]:
    """Tokenise ``documents`` with the encoder saved in ``tokenizer_dir`` into shards in ``out_dir``.

    Args:
        documents: the corpus (e.g. :func:`pipeline.data.corpus.iter_documents`), read once, lazily.
        tokenizer_dir: a saved tokenizer artifact (:func:`pipeline.tokenizer.save_tokenizer`).
        out_dir: the shard folder; written as ``<out_dir>.tmp`` and renamed (replacing an old one).
        seed: run seed; with ``val_fraction`` it decides each document's split.
        val_fraction: share of documents for validation, in (0, 1).
        num_proc: worker processes (0: all cores; 1: in this process).
        shard_tokens: start a new shard file once the current one has this many tokens.
        max_tokens: stop after the document that reaches this many tokens in total (0: no limit).
        chunk_docs: at most this many documents (and about 1M characters) per worker task.
        corpus_stats: a ``CorpusStats`` filled by ``documents``; its counts go into ``index.json``.

    Returns:
        The index written to ``index.json``.

    Raises:
        ShardError: fewer than 2 documents, or a bad ``val_fraction``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ShardError(f"data.corpus.val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    encoder = load_encoder(tokenizer_dir)
    dtype = np.dtype(np.uint16 if encoder.n_vocab <= 2**16 else np.uint32)
    splits = {s: _Split(s, tmp, max(1, shard_tokens), dtype) for s in SPLITS}
    t0 = time.time()
    n_docs, total, truncated = 0, 0, False
    encoded = _encoded(documents, str(tokenizer_dir), dtype.str, num_proc, chunk_docs)
    try:
        for ids in encoded:
            splits[split_of(n_docs, seed, val_fraction)].append(ids)
            n_docs += 1
            total += len(ids)
            if max_tokens and total >= max_tokens:
                truncated = True
                break
        _balance(splits, n_docs, out)
        for sp in splits.values():
            sp.close()
        seconds = time.time() - t0
        index = {
            "format": 1,
            "dtype": dtype.name,
            "vocab_size": encoder.n_vocab,
            "eot_token": encoder.eot_token,
            "seed": seed,
            "val_fraction": val_fraction,
            "documents": n_docs,
            "tokens": total,
            "truncated_at_max_tokens": truncated,
            "splits": {
                s.name: {"tokens": s.tokens, "documents": s.documents, "shards": s.shards} for s in splits.values()
            },
            "tokenize_seconds": round(seconds, 3),
            "corpus": corpus_stats.as_dict() if corpus_stats is not None else {},
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        _replace_dir(tmp, out)
    finally:
        encoded.close()  # stops the worker pool when max_tokens ended the loop early
        for sp in splits.values():
            sp.close()
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "shards: %d documents, %d tokens (train %d, val %d) in %.1fs (%.0f tokens/s) -> %s",
        n_docs,
        total,
        splits["train"].tokens,
        splits["val"].tokens,
        seconds,
        total / max(seconds, 1e-9),
        out,
    )
    return index


def _balance(splits: dict[str, _Split], n_docs: int, out: Path) -> None:
    if n_docs < 2:
        raise ShardError(
            f"{out}: the corpus has {n_docs} document(s); a train/val split by document needs at least 2. "
            "Split a single text file into documents with data.corpus.txt_document_separator (e.g. '\\n\\n')."
        )
    train, val = splits["train"], splits["val"]
    if val.documents == 0:
        val.append(train.pop_last())
    elif train.documents == 0:
        train.append(val.pop_last())


def _encoded(
    docs: Iterable[str], tokenizer_dir: str, dtype: str, num_proc: int, chunk_docs: int
) -> Iterator[np.ndarray]:
    """Token arrays (eot appended) of ``docs`` in order; workers get chunks, at most 4 per worker in flight."""
    procs = num_proc or _available_cpus()
    chunks = _chunked(docs, chunk_docs)
    if procs <= 1:
        _init_worker(tokenizer_dir)
        for chunk in chunks:
            yield from _encode_chunk((chunk, dtype))
        return
    # fork: workers start fast and inherit nothing they need beyond the encoder they load themselves.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(procs, initializer=_init_worker, initargs=(tokenizer_dir,)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, ((chunk, dtype),)))
            if len(pending) >= 4 * procs:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _available_cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _chunked(docs: Iterable[str], max_docs: int, max_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Lists of documents, cut at ``max_docs`` documents or ``max_chars`` characters (few long documents,
    like 42 plays, still spread over the workers).

    >>> [len(c) for c in _chunked(["a" * 10] * 7, max_docs=3, max_chars=25)]
    [3, 3, 1]
    """
    chunk: list[str] = []
    chars = 0
    for d in docs:
        chunk.append(d)
        chars += len(d)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _replace_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


class TokenShards:
    """One split of a shard folder, memory-mapped once, with a nanoGPT-style random-window sampler.

    Attributes:
        tokens: tokens in the split.
        documents: documents in the split.
        vocab_size, eot_token, dtype: from ``index.json``.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise ShardError(f"no token shards at {self.root} ({INDEX_FILE} missing); run the tokenizer stage first")
        self.index = json.loads(index_path.read_text())
        if split not in self.index["splits"]:
            raise ShardError(f"{index_path}: no split {split!r} (have {', '.join(self.index['splits'])})")
        self.split = split
        info = self.index["splits"][split]
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        self.eot_token = int(self.index["eot_token"])
        self.documents = int(info["documents"])
        self.arrays = [
            np.memmap(self.root / s["file"], dtype=self.dtype, mode="r") for s in info["shards"] if s["tokens"]
        ]
        for arr, s in zip(self.arrays, [s for s in info["shards"] if s["tokens"]]):
            if len(arr) != s["tokens"]:
                raise ShardError(f"{self.root / s['file']}: {len(arr)} tokens on disk, index.json says {s['tokens']}")
        self.tokens = sum(len(a) for a in self.arrays)
        self._lens = np.array([len(a) for a in self.arrays], dtype=np.int64)

    def __len__(self) -> int:
        return self.tokens

    def num_windows(self, block_size: int) -> int:
        """How many distinct ``block_size + 1`` windows fit (windows do not cross shard files)."""
        return int(np.maximum(self._lens - block_size, 0).sum())

    def sample_batch(
        self, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows, drawn with ``generator`` only (one ``torch.randint`` call).

        Args:
            batch_size: rows B.
            block_size: sequence length T.
            generator: a CPU ``torch.Generator``; its state alone decides the batch.

        Returns:
            ``(x, y)``: int64 tensors of shape (B, T); ``y[:, t] == x[:, t + 1]`` for t < T - 1 and ``y`` ends
            with the token after ``x``'s window.

        Raises:
            ShardError: the split has no window of ``block_size + 1`` tokens.
        """
        windows = np.maximum(self._lens - block_size, 0)
        total = int(windows.sum())
        if total == 0:
            biggest = int(self._lens.max()) if len(self._lens) else 0
            raise ShardError(
                f"{self.root}: split '{self.split}' has {self.tokens} tokens (largest shard {biggest}), fewer than "
                f"block_size + 1 = {block_size + 1}; use a smaller block size, more data or a larger "
                "data.corpus.val_fraction"
            )
        starts = torch.randint(total, (batch_size,), generator=generator).numpy()
        offsets = np.arange(block_size + 1)
        if len(self.arrays) == 1:
            buf = self.arrays[0][starts[:, None] + offsets]  # (B, T+1), one fancy-indexed read
        else:
            bounds = np.cumsum(windows)
            shard = np.searchsorted(bounds, starts, side="right")
            local = starts - (bounds[shard] - windows[shard])
            buf = np.stack([self.arrays[k][o : o + block_size + 1] for k, o in zip(shard, local)])
        t = torch.from_numpy(buf.astype(np.int64))
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()
