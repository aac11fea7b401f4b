"""Shared evaluation helpers: chat generation on held-out prompts and checker accuracy.

Used by the SFT and PPO stages (and the report) so that "checker accuracy" means the same thing
everywhere: each prompt is a user message, rendered with the tokenizer's chat template and
``add_generation_prompt=True``, answered by the model (greedy unless sampling is asked for) until
``<|end|>``, and the decoded answer is judged by the task's ground-truth checker
(``pipeline.data.tasks.check_answer``).

    responses = generate_responses(model, tok, [r["prompt"] for r in recs], max_new_tokens=32)
    acc = checker_accuracy(recs, responses)   # None when no record has a checker
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pipeline.hf_trainer import context_length

__all__ = ["generate_responses", "checker_accuracy", "stop_token_ids", "has_checker"]

log = logging.getLogger(__name__)

END_OF_TURN = "<|end|>"
END_OF_TEXT = "<|endoftext|>"


def stop_token_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """Token ids that end a chat answer: ``<|end|>``, ``<|endoftext|>``, the tokenizer's eos and the
    model's generation_config eos ids (those that exist), ``<|end|>`` first."""
    ids: list[int] = []
    vocab = tokenizer.get_vocab()
    for tok in (END_OF_TURN, END_OF_TEXT):
        if tok in vocab:
            ids.append(int(vocab[tok]))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.extend(int(i) for i in ([eos] if isinstance(eos, int) else eos))
    return list(dict.fromkeys(ids))


def _render_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Answer each user prompt with the model through the chat template.

    Prompts are left-padded into batches (position ids follow the attention mask, so a prompt's
    answer does not depend on its batch mates); generation stops at ``<|end|>`` / ``<|endoftext|>``;
    the answer is decoded without special tokens. A prompt too long for the model's context
    (prompt + ``max_new_tokens`` > context) keeps its last tokens, with a warning.

    Args:
        model: a Hugging Face causal LM (a DDP wrapper is unwrapped). Its train/eval mode is restored.
        tokenizer: the matching tokenizer, with a chat template and a pad token (or eos used as pad).
        prompts: user-message strings.
        max_new_tokens: at most this many generated tokens per answer.
        batch_size: prompts per ``generate`` call.
        do_sample, temperature, top_k, top_p: sampling settings (greedy when ``do_sample`` is False).
        seed: seeds torch's RNG for sampling (the global RNG state is restored afterwards).
        **generate_kwargs: passed to ``model.generate`` (e.g. ``synced_gpus=True`` under ZeRO-3).

    Returns:
        One decoded answer per prompt, in order.
    """
    model = getattr(model, "module", model)
    if not prompts:
        return []
    stops = stop_token_ids(tokenizer, model)
    if not stops:
        raise ValueError("generate_responses: the tokenizer has no <|end|>, <|endoftext|> or eos token to stop at")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    encoded = _render_prompts(tokenizer, prompts)
    ctx = context_length(model)
    if ctx is not None:
        room = ctx - max_new_tokens
        if room < 1:
            raise ValueError(
                f"generate_responses: max_new_tokens={max_new_tokens} leaves no room in a {ctx}-token context"
            )
        n_cut = sum(len(e) > room for e in encoded)
        if n_cut:
            log.warning("%d prompts longer than %d tokens keep only their last %d tokens", n_cut, room, room)
            encoded = [e[-room:] for e in encoded]

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sampling: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        sampling.update(temperature=temperature, top_k=top_k if top_k > 0 else None, top_p=top_p)
    else:  # silence "temperature is set but do_sample=False" from model generation configs
        sampling.update(temperature=None, top_k=None, top_p=None)
    rng_devices = [device] if device.type == "cuda" else []
    responses: list[str] = []
    try:
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start : start + batch_size]
                width = max(len(e) for e in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for i, e in enumerate(batch):  # left padding
                    input_ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
                    attention[i, width - len(e) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stops,
                    pad_token_id=pad_id,
                    **sampling,
                    **generate_kwargs,
                )
                for row in out[:, width:].tolist():
                    responses.append(_decode_answer(tokenizer, row, set(stops)))
    finally:
        model.train(was_training)
    return responses


def _decode_answer(tokenizer: Any, ids: list[int], stops: set[int]) -> str:
    """Decode generated ids up to (not including) the first stop token, without special tokens."""
    for n, t in enumerate(ids):
        if t in stops:
            ids = ids[:n]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def has_checker(record: dict[str, Any]) -> bool:
    """A record can be checked when it carries the generated-task fields ``task`` and ``answer``."""
    return bool(record.get("task")) and record.get("answer") is not None


def checker_accuracy(records: list[dict[str, Any]], responses: list[str]) -> float | None:
    """Share of checkable records whose response passes ``pipeline.data.tasks.check_answer``.

    Args:
        records: held-out records (any with ``task`` and ``answer`` has a checker).
        responses: one response per record, same order.

    Returns:
        Accuracy in [0, 1] over the records that have a checker; None when none has one.

    Raises:
        ValueError: ``records`` and ``responses`` differ in length.
    """
    if len(records) != len(responses):
        raise ValueError(f"checker_accuracy: {len(records)} records but {len(responses)} responses")
    pairs = [(r, s) for r, s in zip(records, responses) if has_checker(r)]
    if not pairs:
        return None
    from pipeline.data.tasks import check_answer  # the tasks module owns the checkers

    return sum(bool(check_answer(r, s)) for r, s in pairs) / len(pairs)
