"""The tokenizer contract: special tokens, the chat template and GPT-2's pre-tokenisation regex."""

from __future__ import annotations

__all__ = [
    "SPECIAL_TOKENS",
    "EOT_TOKEN",
    "PAD_TOKEN",
    "SYSTEM_TOKEN",
    "USER_TOKEN",
    "ASSISTANT_TOKEN",
    "END_TOKEN",
    "UNK_TOKEN",
    "CHAT_ROLES",
    "CHAT_TEMPLATE",
    "GPT2_PATTERN",
    "TokenizerError",
]

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


class TokenizerError(RuntimeError):
    """A tokenizer cannot be built, loaded or trusted; the message says why and what to do."""
