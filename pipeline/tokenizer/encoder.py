"""The fast corpus encoder: a ``tiktoken.Encoding`` twin of the HF tokenizer (bpe, gpt2) or a vectorised
character table (char), with the files that rebuild it.

The tokenizer artifact holds, besides the HF files, ``tokenizer.tiktoken`` (tiktoken ranks: base64 token bytes
and rank per line; bpe/gpt2) and ``encoder_config.json`` (kind, regex, special tokens; the character table for
``char``). :func:`load_encoder` needs neither transformers nor the HF tokenizer files.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tiktoken

from .tokens import EOT_TOKEN, UNK_TOKEN, TokenizerError

__all__ = [
    "RANKS_FILE",
    "META_FILE",
    "Encoder",
    "CharEncoder",
    "load_encoder",
    "tiktoken_encoding",
    "bpe_meta",
    "write_ranks",
    "read_ranks",
]

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "encoder_config.json"


class Encoder(Protocol):
    """The fast corpus encoder: ``tiktoken.Encoding`` or :class:`CharEncoder`."""

    eot_token: int
    n_vocab: int

    def encode_ordinary(self, text: str) -> list[int]: ...

    def encode_ordinary_batch(self, text: list[str], *, num_threads: int = 8) -> list[list[int]]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


class CharEncoder:
    """Vectorised character -> id mapping with tiktoken's encoder interface (``char`` kind).

    >>> enc = CharEncoder("ab", {"<|endoftext|>": 0}, unk_id=1, offset=2)
    >>> enc.encode_ordinary("abz"), enc.decode([2, 3, 0])
    ([2, 3, 1], 'ab<|endoftext|>')
    """

    def __init__(self, chars: str, special_tokens: dict[str, int], unk_id: int, offset: int) -> None:
        self.chars = "".join(sorted(set(chars)))
        self.special_tokens = dict(special_tokens)
        self.unk_id = unk_id
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._ids = np.arange(offset, offset + len(self.chars), dtype=np.int64)
        self._itos = {int(i): c for i, c in zip(self._ids, self.chars)}
        self._itos.update({i: s for s, i in self.special_tokens.items()})
        self.eot_token = self.special_tokens[EOT_TOKEN]
        self.n_vocab = max(self._itos) + 1

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of ``text`` as an int64 array (unknown characters -> ``unk_id``)."""
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if not len(self._codepoints):
            return np.full(len(cps), self.unk_id, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._codepoints, cps), len(self._codepoints) - 1)
        return np.where(self._codepoints[pos] == cps, self._ids[pos], self.unk_id)

    def encode_ordinary_batch(self, text: list[str], *, num_threads: int = 8) -> list[list[int]]:
        del num_threads  # numpy is fast enough; kept for tiktoken's signature
        return [self.encode_ordinary(t) for t in text]

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(self._itos.get(int(t), UNK_TOKEN) for t in tokens)


def load_encoder(path: str | Path) -> Encoder:
    """The fast corpus encoder saved in ``path``: a ``tiktoken.Encoding`` (bpe, gpt2) or a :class:`CharEncoder`.

    Both expose ``encode_ordinary``/``encode_ordinary_batch``/``decode``, ``eot_token`` and ``n_vocab``.

    Raises:
        TokenizerError: ``path`` has no ``encoder_config.json`` or its ranks file is missing/corrupt.
    """
    p = Path(path)
    meta_path = p / META_FILE
    if not meta_path.is_file():
        raise TokenizerError(f"no {META_FILE} in {p}: not a tokenizer artifact of this pipeline")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    special = {str(k): int(v) for k, v in meta["special_tokens"].items()}
    if meta["kind"] == "char":
        return CharEncoder(meta["chars"], special, unk_id=int(meta["unk_id"]), offset=int(meta["offset"]))
    ranks = read_ranks(p / meta.get("ranks_file", RANKS_FILE))
    return tiktoken_encoding(f"{meta['kind']}-chat", meta["pat_str"], ranks, special)


def tiktoken_encoding(name: str, pattern: str, ranks: dict[bytes, int], special: dict[str, int]) -> Any:
    """A ``tiktoken.Encoding`` from BPE ranks and special tokens."""
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def bpe_meta(kind: str, pattern: str, special: dict[str, int], n_vocab: int) -> dict[str, Any]:
    """What :func:`load_encoder` needs to rebuild a BPE encoder (``encoder_config.json``)."""
    return {"kind": kind, "pat_str": pattern, "ranks_file": RANKS_FILE, "special_tokens": special, "n_vocab": n_vocab}


def write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    """tiktoken's ``.tiktoken`` format (as ``tiktoken.load.dump_tiktoken_bpe``)."""
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("".join(lines), encoding="ascii")


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken ranks read back from a ``.tiktoken`` file.

    Raises:
        TokenizerError: the file is missing or has a line that is not ``<base64 token> <rank>``.
    """
    # tiktoken.load.load_tiktoken_bpe caches even local files by path name in /tmp, so a rewritten
    # artifact at the same path could be read stale; parse the (simple) format here instead.
    if not path.is_file():
        raise TokenizerError(f"tiktoken ranks file missing: {path}")
    ranks = {}
    for n, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}:{n}: not a '<base64 token> <rank>' line") from None
    return ranks
