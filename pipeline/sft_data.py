"""SFT examples: chat conversations tokenised into ``input_ids`` and loss ``labels`` of bounded length.

Labels are built here, once, from the chat template's ``{% generation %}`` markers
(``apply_chat_template(..., return_assistant_tokens_mask=True)``, the same call TRL makes for
``assistant_only_loss``), and the trainer gets an already tokenized ``input_ids``/``labels`` dataset. Doing it
here lets the truncate/drop counts be exact and the mask be tested directly. Every non-assistant token has label
-100; every assistant token, including its closing ``<|end|>``, keeps its id. Too-long examples are cut to
``max_length`` (keeping the start) or dropped, as the config says, and counted; a truncated example left with no
assistant token is dropped and counted too. A conversation of more than ``MAX_CHARS_PER_TOKEN`` characters per
token of ``max_length`` is dropped, or cut to that many characters, before it is tokenised (memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.data.records import MAX_CHARS_PER_TOKEN, clip_turns, text_chars

__all__ = ["IGNORE_INDEX", "LengthStats", "tokenize_chat", "tokenize_examples"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class LengthStats:
    """What tokenisation did to the examples of one split."""

    n_in: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    """Longer than max_length and cut to it (too_long=truncate)."""
    n_dropped_too_long: int = 0
    """Longer than max_length and dropped (too_long=drop)."""
    n_dropped_no_target: int = 0
    """Left with no assistant token after truncation (nothing to learn), dropped."""
    n_target_tokens: int = 0
    """Tokens that count in the loss, over the kept examples."""


def tokenize_chat(
    tokenizer: Any, messages: list[dict[str, str]], assistant_only: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids and loss labels of one conversation.

    With ``assistant_only`` the labels keep the ids of the tokens the chat template renders inside
    ``{% generation %}...{% endgeneration %}`` (the assistant's content and its ``<|end|>``) and are -100
    elsewhere; otherwise every token is a target.

    >>> # ids    <|user|> hi <|end|> <|assistant|> yo <|end|>
    >>> # labels   -100 -100  -100      -100       yo <|end|>

    Raises:
        ValueError: ``assistant_only`` and the template marks no assistant token (no generation markers).
    """
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
    )
    ids = list(out["input_ids"])
    if not assistant_only:
        return ids, list(ids)
    mask = out["assistant_masks"]
    if not any(mask):
        raise ValueError(
            "the chat template marks no assistant tokens: it needs {% generation %}...{% endgeneration %} around "
            "assistant turns (see pipeline.tokenizer.CHAT_TEMPLATE), or set sft.assistant_only_loss=false"
        )
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def tokenize_examples(
    tokenizer: Any,
    records: list[dict[str, Any]],
    max_length: int,
    too_long: str = "drop",
    assistant_only: bool = True,
) -> tuple[list[dict[str, list[int]]], LengthStats]:
    """Tokenise normalised records into ``{"input_ids", "labels"}`` examples of at most ``max_length`` tokens.

    Args:
        tokenizer: tokenizer with the chat template.
        records: records with ``messages`` (see ``pipeline.data.conversations``).
        max_length: context length in tokens.
        too_long: ``truncate`` (keep the first ``max_length`` tokens) or ``drop``.
        assistant_only: loss on assistant tokens only.

    Returns:
        The examples and the counts of what was truncated or dropped.
    """
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")
    stats = LengthStats(n_in=len(records))
    examples = []
    max_chars = MAX_CHARS_PER_TOKEN * max_length
    for rec in records:
        messages = rec["messages"]
        far_over = text_chars(messages) > max_chars  # certainly too long: never tokenised whole
        if far_over and too_long == "drop":
            stats.n_dropped_too_long += 1
            continue
        if far_over:
            messages = clip_turns(messages, max_chars)  # still more than max_length tokens: truncated below
            if assistant_only and not any(m["role"] == "assistant" for m in messages):
                stats.n_truncated += 1
                stats.n_dropped_no_target += 1
                continue
        ids, labels = tokenize_chat(tokenizer, messages, assistant_only)
        if len(ids) > max_length or far_over:
            if too_long == "drop":
                stats.n_dropped_too_long += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            stats.n_truncated += 1
            if all(t == IGNORE_INDEX for t in labels):
                stats.n_dropped_no_target += 1
                continue
        stats.n_target_tokens += sum(t != IGNORE_INDEX for t in labels)
        examples.append({"input_ids": ids, "labels": labels})
    stats.n_kept = len(examples)
    if stats.n_dropped_too_long or stats.n_truncated:
        log.info(
            "sft: %d of %d examples longer than %d tokens (%d truncated, %d dropped, %d left without a target)",
            stats.n_dropped_too_long + stats.n_truncated,
            stats.n_in,
            max_length,
            stats.n_truncated,
            stats.n_dropped_too_long,
            stats.n_dropped_no_target,
        )
    return examples, stats
