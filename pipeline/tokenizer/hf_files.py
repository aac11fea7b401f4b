"""The Hugging Face side of a tokenizer artifact: writing and reading its files, and giving any HF
tokenizer this pipeline's special tokens and chat template."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .encoder import META_FILE, RANKS_FILE, write_ranks
from .tokens import CHAT_TEMPLATE, EOT_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, TokenizerError
from .train import TrainedTokenizer

if TYPE_CHECKING:  # transformers is imported lazily: corpus workers only need tiktoken/numpy
    from transformers import PreTrainedTokenizerFast

__all__ = ["save_tokenizer", "load_tokenizer", "ensure_chat_tokens"]

log = logging.getLogger(__name__)


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
        write_ranks(out / RANKS_FILE, tok.ranks)
    (out / META_FILE).write_text(json.dumps(tok.meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
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
