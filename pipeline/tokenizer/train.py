"""Building a tokenizer: byte-level BPE trained on the corpus, character-level, or GPT-2's.

Each kind gives the HF tokenizer (chat template, special tokens) and the fast encoder that gives the same ids
(``pipeline.tokenizer.encoder``); :func:`train_tokenizer` checks that they agree on a sample of the text.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import tiktoken
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ..config import TokenizerConfig
from .encoder import CharEncoder, Encoder, bpe_meta, tiktoken_encoding
from .tokens import CHAT_TEMPLATE, EOT_TOKEN, GPT2_PATTERN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN, TokenizerError

if TYPE_CHECKING:  # transformers is imported lazily: corpus workers only need tiktoken/numpy
    from transformers import PreTrainedTokenizerFast

__all__ = ["TrainedTokenizer", "train_tokenizer", "tokenizer_from_ranks"]

log = logging.getLogger(__name__)

_N_BYTES = 256
_CHAR_EXTRA = string.ascii_letters + string.digits + string.punctuation + " \t\n"


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
    enc = tiktoken_encoding("bpe-chat", GPT2_PATTERN, ranks, special)
    hf = _hf_from_tokenizer(tok)
    trained = TrainedTokenizer("bpe", hf, enc, bpe_meta("bpe", GPT2_PATTERN, special, enc.n_vocab), ranks)
    _check_same_ids(trained, docs)
    return trained


def _build_char(documents: Iterable[str]) -> TrainedTokenizer:
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
    enc = tiktoken_encoding("gpt2-chat", pattern, ranks, special)
    tok = tokenizer_from_ranks(ranks, special)
    trained = TrainedTokenizer(
        "gpt2", _hf_from_tokenizer(tok), enc, bpe_meta("gpt2", pattern, special, enc.n_vocab), ranks
    )
    _check_same_ids(trained, ["Hello world! It's 2024, naïve café: 'll 've\n\n  spaces\t and \U0001f600."])
    return trained


def _byte_level_pre_tokenizer(pattern: str) -> Any:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def tokenizer_from_ranks(ranks: dict[bytes, int], special: dict[str, int]) -> Any:
    """A ``tokenizers`` byte-level BPE equal to tiktoken ranks (as transformers' ``TikTokenConverter``):
    every split of a token into two vocabulary tokens becomes a merge, ordered by the token's rank."""
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
