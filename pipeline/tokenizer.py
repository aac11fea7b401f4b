"""Tokenizers: byte-level BPE trained on the corpus, character-level, or GPT-2's; HF files + a fast encoder.

Three kinds (``TokenizerConfig.kind``):

- ``bpe``: byte-level BPE trained with the ``tokenizers`` library's ``BpeTrainer`` on the corpus documents,
  GPT-2 pre-tokenisation (:data:`GPT2_PATTERN`, then ``ByteLevel``). Ids 0..5 are :data:`SPECIAL_TOKENS`,
  then the 256 byte symbols, then the merges in the order they were learned.
- ``char``: one token per character (nanoGPT's ``shakespeare_char``). The vocabulary is every character of
  the training documents plus printable ASCII, tab and newline (departure from nanoGPT: the generated tasks
  need digits, which Shakespeare lacks). Any other character maps to ``<|unk|>`` (id 6), in the HF tokenizer
  and in the fast encoder alike; it decodes as ``<|unk|>``, so such text does not round-trip.
- ``gpt2``: tiktoken's ``gpt2`` encoding (ids 0..50256 as GPT-2), our chat tokens appended from 50257.
  Its file comes from the internet or the tiktoken cache (``TIKTOKEN_CACHE_DIR``).

Every kind is saved as Hugging Face files (``tokenizer.json``, ``tokenizer_config.json`` with the chat
template and special tokens), loadable with ``AutoTokenizer.from_pretrained``, plus what the fast encoder
needs: ``tokenizer.tiktoken`` (tiktoken ranks: base64 token bytes and rank per line; bpe/gpt2) and
``encoder_config.json`` (kind, regex, special tokens; the character table for ``char``). Large corpora are
encoded with :func:`load_encoder` (a ``tiktoken.Encoding`` built from the same merges, which gives the same
ids as the HF tokenizer; ``train_tokenizer`` checks this on a sample of the corpus).

Usage::

    tok = train_tokenizer(TokenizerConfig(vocab_size=2048), documents)
    save_tokenizer(tok, "runs/x/tokenizer/artifact", model_max_length=256)
    hf = load_tokenizer("runs/x/tokenizer/artifact")          # PreTrainedTokenizerFast
    enc = load_encoder("runs/x/tokenizer/artifact")           # enc.encode_ordinary_batch(docs)
"""

from __future__ import annotations

import base64
import json
import logging
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .config import TokenizerConfig

if TYPE_CHECKING:  # transformers is imported lazily: corpus workers only need tiktoken/numpy
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "EOT_TOKEN",
    "PAD_TOKEN",
    "END_TOKEN",
    "UNK_TOKEN",
    "CHAT_ROLES",
    "CHAT_TEMPLATE",
    "GPT2_PATTERN",
    "TokenizerError",
    "Encoder",
    "CharEncoder",
    "TrainedTokenizer",
    "train_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "load_encoder",
    "ensure_chat_tokens",
]

log = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
"""Reserved tokens (BRIEF contract): document separator/eos, padding, the chat roles, end of a chat turn."""
EOT_TOKEN, PAD_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN = SPECIAL_TOKENS
UNK_TOKEN = "<|unk|>"
"""Only in ``char`` tokenizers: stands for characters outside the vocabulary."""
CHAT_ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] }}{{ '<|end|>' }}{% endgeneration %}"
    "{%- elif message['role'] == 'system' or message['role'] == 'user' -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- else -%}"
    "{{ raise_exception('chat role must be system, user or assistant, got: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
"""``<|role|>content<|end|>`` per turn, assistant content + ``<|end|>`` inside ``{% generation %}`` (so
assistant-only masks cover exactly the answer and its end token); ``add_generation_prompt`` appends
``<|assistant|>``. No newlines anywhere."""

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""GPT-2's pre-tokenisation regex (the original form: both Oniguruma, used by ``tokenizers``, and
fancy-regex, used by tiktoken, read it the same way; tiktoken's faster possessive variant uses ``$``,
which means end-of-line in Oniguruma)."""

_RANKS_FILE = "tokenizer.tiktoken"
_META_FILE = "encoder_config.json"
_N_BYTES = 256
_CHAR_EXTRA = string.ascii_letters + string.digits + string.punctuation + " \t\n"


class TokenizerError(RuntimeError):
    """A tokenizer cannot be built, loaded or trusted; the message says why and what to do."""


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


@dataclass
class TrainedTokenizer:
    """A tokenizer ready to save: the HF tokenizer and the fast encoder that gives the same ids."""

    kind: str
    hf: PreTrainedTokenizerFast
    encoder: Encoder
    meta: dict[str, Any]
    """What :func:`load_encoder` needs (written to ``encoder_config.json``)."""
    ranks: dict[bytes, int] | None = None
    """tiktoken mergeable ranks (bpe, gpt2)."""


# ----------------------------------------------------------------------------- training


def train_tokenizer(cfg: TokenizerConfig, documents: Iterable[str]) -> TrainedTokenizer:
    """Build the tokenizer of kind ``cfg.kind``.

    Args:
        cfg: kind, vocab_size (special tokens included) and min_frequency.
        documents: training text (ignored for ``gpt2``); the caller limits it to ``cfg.train_bytes``.

    Returns:
        The HF tokenizer (chat template, special tokens) and the matching fast encoder.

    Raises:
        TokenizerError: vocab_size too small, no training text, GPT-2 file unavailable, or the fast
            encoder disagreeing with the HF tokenizer on the training text.
    """
    if cfg.kind == "bpe":
        return _train_bpe(cfg, documents)
    if cfg.kind == "char":
        return _build_char(documents)
    if cfg.kind == "gpt2":
        return _build_gpt2()
    raise TokenizerError(f"tokenizer.kind: unknown kind {cfg.kind!r} (use bpe, char or gpt2)")


def _train_bpe(cfg: TokenizerConfig, documents: Iterable[str]) -> TrainedTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    smallest = len(SPECIAL_TOKENS) + _N_BYTES + 1
    if cfg.vocab_size < smallest:
        raise TokenizerError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for byte-level BPE: it needs at least {smallest} "
            f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes + 1 merge)"
        )
    docs = [d for d in documents if d]
    if not docs:
        raise TokenizerError("no training text for the BPE tokenizer (the corpus gave no non-empty document)")
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as tiktoken does it.
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(GPT2_PATTERN)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    vocab = tok.get_vocab()
    special = {s: vocab[s] for s in SPECIAL_TOKENS}
    decoder = _unicode_to_bytes()
    ranks = {bytes(decoder[c] for c in s): i for s, i in vocab.items() if s not in special}
    if len(ranks) + len(special) != len(vocab) or sorted(vocab.values()) != list(range(len(vocab))):
        raise TokenizerError("trained BPE vocabulary is not a dense 0..n-1 id range; cannot build the tiktoken ranks")
    if len(vocab) < cfg.vocab_size:
        log.warning(
            "BPE vocabulary has %d tokens, fewer than tokenizer.vocab_size=%d: the training text has no more "
            "merges with frequency >= %d",
            len(vocab),
            cfg.vocab_size,
            cfg.min_frequency,
        )
    enc = _tiktoken_encoding("bpe-chat", GPT2_PATTERN, ranks, special)
    hf = _hf_from_tokenizer(tok)
    trained = TrainedTokenizer("bpe", hf, enc, _bpe_meta("bpe", GPT2_PATTERN, special, enc.n_vocab), ranks)
    _check_same_ids(trained, docs)
    return trained


def _build_char(documents: Iterable[str]) -> TrainedTokenizer:
    from tokenizers import Tokenizer, decoders, models

    docs = list(documents)
    seen: set[str] = set()
    for d in docs:
        seen.update(d)
    chars = "".join(sorted(seen | set(_CHAR_EXTRA)))
    special = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    unk_id = len(SPECIAL_TOKENS)
    offset = unk_id + 1
    vocab = {**special, UNK_TOKEN: unk_id, **{c: offset + i for i, c in enumerate(chars)}}
    # A BPE model without merges and without pre-tokeniser is exactly "one token per character".
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    tok.decoder = decoders.Fuse()
    enc = CharEncoder(chars, special, unk_id=unk_id, offset=offset)
    meta = {
        "kind": "char",
        "chars": chars,
        "offset": offset,
        "unk_token": UNK_TOKEN,
        "unk_id": unk_id,
        "special_tokens": special,
        "n_vocab": enc.n_vocab,
    }
    trained = TrainedTokenizer("char", _hf_from_tokenizer(tok, unk_token=UNK_TOKEN), enc, meta)
    _check_same_ids(trained, [*docs, "unknown: \u4e2d\U0001f600"])
    return trained


def _build_gpt2() -> TrainedTokenizer:
    import tiktoken

    try:
        base = tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests/OSError offline, hash mismatch, blobfile...: all mean "not available"
        raise TokenizerError(
            "tokenizer.kind=gpt2 needs tiktoken's GPT-2 files (vocab.bpe and encoder.json from "
            "openaipublic.blob.core.windows.net), which could not be had: "
            f"{type(e).__name__}: {e}. On a machine with internet run "
            "`TIKTOKEN_CACHE_DIR=/some/dir python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"`, copy "
            "/some/dir here and set TIKTOKEN_CACHE_DIR to it; or use tokenizer.kind=bpe."
        ) from None
    ranks = dict(base._mergeable_ranks)
    special = dict(base._special_tokens)
    if EOT_TOKEN not in special:
        raise TokenizerError(f"tiktoken's gpt2 encoding has no {EOT_TOKEN} token")
    next_id = base.n_vocab
    for s in SPECIAL_TOKENS:
        if s not in special:
            special[s] = next_id
            next_id += 1
    pattern = base._pat_str
    enc = _tiktoken_encoding("gpt2-chat", pattern, ranks, special)
    tok = _tokenizer_from_ranks(ranks, special)
    trained = TrainedTokenizer(
        "gpt2", _hf_from_tokenizer(tok), enc, _bpe_meta("gpt2", pattern, special, enc.n_vocab), ranks
    )
    _check_same_ids(trained, ["Hello world! It's 2024, naïve café: 'll 've\n\n  spaces\t and \U0001f600."])
    return trained


def _byte_level_pre_tokenizer(pattern: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _tokenizer_from_ranks(ranks: dict[bytes, int], special: dict[str, int]) -> Any:
    """A ``tokenizers`` byte-level BPE equal to tiktoken ranks (as transformers' ``TikTokenConverter``):
    every split of a token into two vocabulary tokens becomes a merge, ordered by the token's rank."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    to_str = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(to_str[x] for x in b)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {s(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(s(a), s(b)) for *_, a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(GPT2_PATTERN)
    tok.decoder = decoders.ByteLevel()
    for text, _ in sorted(special.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
    got = {t: tok.token_to_id(t) for t in special}
    if got != special:
        raise TokenizerError(f"special token ids of the HF tokenizer {got} differ from tiktoken's {special}")
    return tok


def _hf_from_tokenizer(tok: Any, unk_token: str | None = None) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=unk_token,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOT_TOKEN, PAD_TOKEN)],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    return hf


def _tiktoken_encoding(name: str, pattern: str, ranks: dict[bytes, int], special: dict[str, int]) -> Any:
    import tiktoken

    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def _bpe_meta(kind: str, pattern: str, special: dict[str, int], n_vocab: int) -> dict[str, Any]:
    return {"kind": kind, "pat_str": pattern, "ranks_file": _RANKS_FILE, "special_tokens": special, "n_vocab": n_vocab}


def _check_same_ids(tok: TrainedTokenizer, docs: Sequence[str], max_chars: int = 200_000) -> None:
    """The fast encoder must give the HF tokenizer's ids; checked on up to ``max_chars`` of ``docs``."""
    sample, n = [], 0
    for d in docs:
        sample.append(d[: max_chars - n])
        n += len(sample[-1])
        if n >= max_chars:
            break
    for i, text in enumerate(sample):
        fast = tok.encoder.encode_ordinary(text)
        ref = tok.hf.backend_tokenizer.encode(text, add_special_tokens=False).ids
        if fast != ref:
            at = next((k for k, (a, b) in enumerate(zip(fast, ref)) if a != b), min(len(fast), len(ref)))
            raise TokenizerError(
                f"{tok.kind} tokenizer: the tiktoken encoder and the HF tokenizer disagree on training document {i} "
                f"at token {at} (tiktoken {fast[at : at + 5]}, HF {ref[at : at + 5]}); this is a bug, please report it"
            )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (as in ``tokenizers``' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(_N_BYTES):
        if b not in bs:
            bs.append(b)
            cs.append(_N_BYTES + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


# ----------------------------------------------------------------------------- saving / loading


def save_tokenizer(tok: TrainedTokenizer, out_dir: str | Path, model_max_length: int | None = None) -> Path:
    """Write the HF tokenizer files, the tiktoken ranks and ``encoder_config.json`` into ``out_dir``.

    Args:
        tok: from :func:`train_tokenizer`.
        out_dir: created if missing.
        model_max_length: the model's context length, recorded in ``tokenizer_config.json``.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model_max_length is not None:
        tok.hf.model_max_length = int(model_max_length)
    # save_jinja_files=False: the chat template goes into tokenizer_config.json (read by every version)
    tok.hf.save_pretrained(str(out), save_jinja_files=False)
    _make_portable(out / "tokenizer_config.json")
    if tok.ranks is not None:
        _write_ranks(out / _RANKS_FILE, tok.ranks)
    (out / _META_FILE).write_text(json.dumps(tok.meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def _make_portable(config_path: Path) -> None:
    """Write the v4-era names (``PreTrainedTokenizerFast``, ``additional_special_tokens``) that transformers
    4.x and 5.x both read, instead of v5-only ``TokenizersBackend``/``extra_special_tokens``."""
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    config_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The HF tokenizer (``PreTrainedTokenizerFast``) saved in ``path`` (a tokenizer artifact or model dir).

    Raises:
        TokenizerError: ``path`` holds no tokenizer.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise TokenizerError(f"no tokenizer at {p} (tokenizer.json missing); run the tokenizer stage first")
    return AutoTokenizer.from_pretrained(str(p))


def load_encoder(path: str | Path) -> Encoder:
    """The fast corpus encoder saved in ``path``: a ``tiktoken.Encoding`` (bpe, gpt2) or a :class:`CharEncoder`.

    Both expose ``encode_ordinary``/``encode_ordinary_batch``/``decode``, ``eot_token`` and ``n_vocab``.

    Raises:
        TokenizerError: ``path`` has no ``encoder_config.json`` or its ranks file is missing/corrupt.
    """
    p = Path(path)
    meta_path = p / _META_FILE
    if not meta_path.is_file():
        raise TokenizerError(f"no {_META_FILE} in {p}: not a tokenizer artifact of this pipeline")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    special = {str(k): int(v) for k, v in meta["special_tokens"].items()}
    if meta["kind"] == "char":
        return CharEncoder(meta["chars"], special, unk_id=int(meta["unk_id"]), offset=int(meta["offset"]))
    ranks = _read_ranks(p / meta.get("ranks_file", _RANKS_FILE))
    return _tiktoken_encoding(f"{meta['kind']}-chat", meta["pat_str"], ranks, special)


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    """tiktoken's ``.tiktoken`` format (as ``tiktoken.load.dump_tiktoken_bpe``)."""
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("".join(lines), encoding="ascii")


def _read_ranks(path: Path) -> dict[bytes, int]:
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


# ----------------------------------------------------------------------------- any HF tokenizer


def ensure_chat_tokens(tokenizer: PreTrainedTokenizerFast) -> int:
    """Give any HF tokenizer this pipeline's special tokens, a pad token and :data:`CHAT_TEMPLATE`.

    Tokens already present as single special tokens are kept (no new id); a tokenizer whose pad token is
    unset gets ``<|pad|>``, one without eos gets ``<|endoftext|>``. The chat template is replaced by ours
    (generation stops at ``<|end|>``, which other templates do not produce).

    Args:
        tokenizer: a ``PreTrainedTokenizerFast`` (e.g. from an external model).

    Returns:
        How many tokens were added to the vocabulary (the caller resizes the model's embeddings).
    """
    before = len(tokenizer)
    missing = [t for t in SPECIAL_TOKENS if not _is_single_special(tokenizer, t)]
    extra = [t for t in missing if t not in (EOT_TOKEN, PAD_TOKEN)]
    if EOT_TOKEN in missing:
        extra.insert(0, EOT_TOKEN)
    if extra:
        tokenizer.add_special_tokens({"extra_special_tokens": extra}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    elif PAD_TOKEN in missing:
        tokenizer.add_special_tokens({"extra_special_tokens": [PAD_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.eos_token is None:
        tokenizer.eos_token = EOT_TOKEN
    if tokenizer.chat_template not in (None, CHAT_TEMPLATE):
        log.info("replacing the tokenizer's chat template with the pipeline's CHAT_TEMPLATE")
    tokenizer.chat_template = CHAT_TEMPLATE
    added = len(tokenizer) - before
    if added:
        log.info("added %d special tokens to the tokenizer: %s", added, missing)
    return added


def _is_single_special(tokenizer: PreTrainedTokenizerFast, token: str) -> bool:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return len(ids) == 1 and token in tokenizer.all_special_tokens
