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

from .encoder import CharEncoder, Encoder, load_encoder
from .hf_files import ensure_chat_tokens, load_tokenizer, save_tokenizer
from .tokens import (
    CHAT_ROLES,
    CHAT_TEMPLATE,
    END_TOKEN,
    EOT_TOKEN,
    GPT2_PATTERN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    TokenizerError,
)
from .train import TrainedTokenizer, train_tokenizer

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
