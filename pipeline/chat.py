"""Interactive terminal chat with any stage's model, streaming tokens as they are generated.

    python -m pipeline chat --config configs/tiny.yaml [--stage sft] [--temperature 0.7 --top-k 0 --top-p 0.9]
    make chat [ARGS="..."] [CHAT="--stage sft --temperature 0"]

The conversation goes through the model's chat template; the oldest turns are dropped when it no longer fits
the context. Commands: ``/reset`` starts over, ``/quit`` (or end of input, Ctrl-D) leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .config import RunConfig
from .model_source import check_model_source
from .runs import StageDir, StageError

__all__ = ["ChatSettings", "resolve_model_dir", "chat_loop", "reply"]

CHAT_STAGES = ("export", "ppo", "sft", "pretrain")
"""Stages with a causal LM artifact, newest first."""


@dataclass(frozen=True)
class ChatSettings:
    temperature: float = 0.7
    """0: greedy."""
    top_k: int = 0
    """0: off."""
    top_p: float = 0.9
    max_new_tokens: int = 128
    system: str = ""
    seed: int | None = None


def resolve_model_dir(cfg: RunConfig, stage: str | None = None, model: str | None = None) -> Path:
    """The model to chat with: ``model`` when given, else ``stage``'s artifact, else the newest done stage's.

    Raises:
        StageError: the stage is not done, or no stage is; ``model`` is no model folder nor a reachable Hub model
            (:func:`~pipeline.model_source.check_model_source`).
    """
    if model:
        check_model_source("--model", model)
        return Path(model)
    if stage is not None:
        if stage not in CHAT_STAGES:
            raise StageError(f"chat: stage '{stage}' has no causal LM; choose one of {', '.join(CHAT_STAGES)}")
        sd = StageDir.of(cfg.run_dir, stage)
        if sd.manifest() is None or not sd.artifact.is_dir():
            raise StageError(
                f"chat: stage '{stage}' is not done ({sd.manifest_path} missing); run `make {stage}` first"
            )
        return sd.artifact
    for s in CHAT_STAGES:
        sd = StageDir.of(cfg.run_dir, s)
        if sd.manifest() is not None and sd.artifact.is_dir():
            return sd.artifact
    raise StageError(f"chat: no stage of {cfg.run_dir} is done yet; run `make pretrain` (or `make all`) first")


def _fit(tokenizer: Any, messages: list[dict[str, str]], budget: int) -> list[int]:
    """Chat-template ids of ``messages``, dropping the oldest non-system turns until they fit ``budget``."""
    msgs = list(messages)
    while True:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(ids) <= budget or len(msgs) - first <= 1:
            return list(ids)[-budget:]
        del msgs[first : first + 2 if len(msgs) - first > 2 else first + 1]


def reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], settings: ChatSettings, out: TextIO) -> str:
    """Generate the assistant's answer to ``messages``, writing tokens to ``out`` as they come; returns it."""
    import torch
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    n_ctx = int(getattr(model.config, "n_positions", 0) or getattr(model.config, "max_position_embeddings", 1024))
    max_new = max(1, min(settings.max_new_tokens, n_ctx // 2))
    ids = _fit(tokenizer, messages, n_ctx - max_new)
    streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sample = settings.temperature > 0
    kwargs: dict[str, Any] = dict(do_sample=sample, max_new_tokens=max_new, streamer=streamer)
    if sample:
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    eos = sorted(
        {
            *(eos if isinstance(eos, list) else [eos]),
            *([end] if isinstance(end, int) and end != tokenizer.unk_token_id else []),
        }
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    with torch.no_grad():
        x = torch.tensor([ids], device=model.device)
        y = model.generate(x, attention_mask=torch.ones_like(x), eos_token_id=eos, pad_token_id=pad, **kwargs)
    return tokenizer.decode(y[0, x.shape[1] :], skip_special_tokens=True).strip()


def chat_loop(
    model_dir: Path,
    settings: ChatSettings,
    input_fn: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> int:
    """Run the conversation until ``/quit`` or end of input; returns 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not tokenizer.chat_template:
            raise StageError(f"chat: the tokenizer in {model_dir} has no chat template")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:  # files that are there but do not load (a truncated or foreign model)
        raise StageError(f"chat: cannot load the model in {model_dir}: {e}") from None
    if torch.cuda.is_available():
        model = model.cuda()
    base = [{"role": "system", "content": settings.system}] if settings.system else []
    messages = list(base)
    print(f"chatting with {model_dir} (/reset, /quit or Ctrl-D to leave)", file=out)
    while True:
        try:
            text = input_fn("you> ").strip()
        except EOFError:
            print(file=out)
            return 0
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            messages = list(base)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        out.write("model> ")
        messages.append({"role": "assistant", "content": reply(model, tokenizer, messages, settings, out)})
