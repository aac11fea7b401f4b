"""Language-model utilities below both the reward side and PPO: log-probs, padding, generation, dropout off.

Two token layouts are used, and each has one log-prob function here:

- the rollout layout (PPO, and the implicit reward's ``score_ids``): a left-padded prompt ``(B, P)`` and a
  right-padded response ``(B, T)``, run as ``[query | response]`` with position ids that follow the attention
  mask (:func:`concat_inputs`), so a response's log-probs do not depend on its batch mates' padding;
  :func:`response_logprobs` gives ``(B, T)``;
- the training layout (DPO rows): whole right-padded sequences with the index where each response starts;
  :func:`sequence_logprobs` gives the summed response log-probs ``(B,)``.

Both go through :func:`logprobs_from_logits`.

Text generation for evaluation (:func:`generate_responses`: text in, text out) is :func:`generate` (token ids in and
out) with the chat rendering and the decoding around it: one path. PPO's rollout samples with
:func:`sample_responses`, the same decode loop with an inverse-CDF draw that also returns the tokens' log-probs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GPT2LMHeadModel, GPT2Model
from transformers.activations import GELUTanh, NewGELUActivation

__all__ = [
    "END_OF_TURN",
    "END_OF_TEXT",
    "context_length",
    "logprobs_from_logits",
    "entropy_from_logits",
    "pad_sequences",
    "left_pad",
    "right_pad",
    "concat_inputs",
    "lean_forward_applies",
    "gpt2_hidden_states",
    "response_logits",
    "response_logprobs",
    "sequence_mask",
    "sequence_logprobs",
    "truncate_after_stop",
    "ensure_end_token",
    "eval_mode",
    "disable_dropout",
    "TanhGELU",
    "fuse_activations",
    "stop_token_ids",
    "render_user_prompts",
    "Samples",
    "generate",
    "sample_responses",
    "generate_responses",
    "decode_answer",
]

log = logging.getLogger(__name__)

END_OF_TURN = "<|end|>"
END_OF_TEXT = "<|endoftext|>"


def context_length(model: Any) -> int | None:
    """The model's maximum sequence length from its config (GPT-2's n_positions, or max_position_embeddings)."""
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ----------------------------------------------------------------------------- log-probs


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token: ``(B, T, V)`` logits, ``(B, T)`` tokens -> ``(B, T)``.

    A log-softmax and a gather: torch's log-softmax is one vectorised kernel each way, about twice as fast, forward
    and backward, as ``logit[token] - logsumexp(logits)`` (whose exp, subtraction and backward are separate
    ``(B, T, V)`` passes), and the same ``(B, T, V)`` tensor is kept for the backward either way.
    """
    return torch.gather(F.log_softmax(logits, dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: ``(B, T, V)`` -> ``(B, T)``."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- padding and layouts


def pad_sequences(
    seqs: list[list[int]], pad_id: int, side: str, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists on ``side`` (``"left"`` or ``"right"``) into ``(ids, mask)`` of shape ``(B, max_len)``.

    Prompts for generation are left-padded (the new tokens follow every prompt directly); sequences a scalar head
    reads at their last token, and DPO rows, are right-padded.

    >>> pad_sequences([[5, 6], [7]], pad_id=0, side="left")
    (tensor([[5, 6],
            [0, 7]]), tensor([[1, 1],
            [0, 1]]))
    >>> pad_sequences([[5, 6], [7]], pad_id=0, side="right")[0]
    tensor([[5, 6],
            [7, 0]])
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def left_pad(
    seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pad_sequences` on the left."""
    return pad_sequences(seqs, pad_id, "left", device)


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pad_sequences` on the right."""
    return pad_sequences(seqs, pad_id, "right")


def concat_inputs(
    query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of ``[query | response]``, each ``(B, P + T)``.

    Position ids count real tokens only, so left padding does not shift a sequence's positions.
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def lean_forward_applies(model: Any) -> bool:
    """Whether :func:`gpt2_hidden_states` computes ``model``'s forward: a plain GPT-2 (exactly ``GPT2Model``, or a model
    whose ``transformer`` is one; a subclass may override what it would bypass) with causal SDPA attention, no
    cross-attention, no reordered or upcast attention and no gradient checkpointing."""
    t = model if type(model) is GPT2Model else getattr(model, "transformer", None)
    cfg = getattr(t, "config", None)
    return (
        type(t) is GPT2Model
        and getattr(cfg, "_attn_implementation", None) == "sdpa"
        and getattr(cfg, "is_causal", True) is not False
        and not cfg.add_cross_attention
        and not cfg.reorder_and_upcast_attn
        and not any(getattr(m, "gradient_checkpointing", False) for m in (t, *t.h))
    )


def _self_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, L, L)`` boolean SDPA mask of ``(B, L)`` padded sequences: each query attends to the keys the padding
    mask keeps, up to its own position (a padding position after a response attends as in Hugging Face's forward);
    a left-padding position, which has no such key, attends to itself only, so that no softmax row is empty (its
    output is never read)."""
    L = attention_mask.shape[1]
    dev = attention_mask.device
    allowed = torch.ones(L, L, dtype=torch.bool, device=dev).tril() & attention_mask.bool()[:, None, :]
    empty = ~allowed.any(-1, keepdim=True)
    return (allowed | (empty & torch.eye(L, dtype=torch.bool, device=dev)))[:, None]


def _attend_and_mlp(
    block: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The rest of a GPT-2 block once its queries ``(B, H, Q, D)``, keys and values ``(B, H, L, D)`` are known:
    Hugging Face's SDPA call, the output projection and its residual, then the MLP and its residual (dropout as the
    block's modules and attention dropout probability say; none in eval mode)."""
    attn = block.attn
    B, _, Q, _ = q.shape
    dropout = attn.attn_dropout.p if attn.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=attn.scaling)
    x = x + attn.resid_dropout(attn.c_proj(o.transpose(1, 2).reshape(B, Q, -1)))
    return x + block.mlp(block.ln_2(x))


def gpt2_hidden_states(
    t: GPT2Model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, start: int = 0
) -> torch.Tensor:
    """A GPT-2 backbone's final hidden states (after ``ln_f``) at positions ``start:``, ``(B, L - start, C)``.

    Hugging Face's forward through the model's own modules, with the same SDPA call, so the states are its own up to
    float rounding (a test: within 1e-6, gradients too; bit for bit on a CPU at ``start=0`` with padding, while the
    last block's smaller matrix products may round differently), less its per-call machinery; and the last block runs only the rows that are asked
    for: its keys and values come from every position, but its queries, attention output, projection and MLP only
    from ``start`` on. PPO reads the response positions only (from the last prompt token on), so a minibatch skips
    most of the last block for its prompt tokens (with a 2-layer model and 12-token prompts under 44 positions,
    ~12% of the policy's and the value model's forward and backward).

    The attention mask is :func:`_self_attention_mask`'s. Dropout is the model's own (its modules, and its attention
    dropout probability when training).

    Args:
        t: the backbone (``model.transformer``); its parameters are reached through module calls only, so that
            DeepSpeed ZeRO-3's hooks gather them as in Hugging Face's forward.
        input_ids, attention_mask, position_ids: ``(B, L)`` each (:func:`concat_inputs`).
        start: the first position whose state is returned, ``0 <= start < L``.
    """
    cfg = t.config
    B, L = input_ids.shape
    H, C = cfg.n_head, cfg.n_embd
    if not 0 <= start < L:
        raise ValueError(f"gpt2_hidden_states: start={start} outside the {L} positions of the inputs")
    mask = _self_attention_mask(attention_mask)
    x = t.drop(t.wte(input_ids) + t.wpe(position_ids))
    last = len(t.h) - 1
    for i, block in enumerate(t.h):
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=2)
        if i == last and start > 0:  # the kept rows only, from here on
            q, x, mask = q[:, start:], x[:, start:], mask[:, :, start:]
        q, k, v = (z.view(B, -1, H, C // H).transpose(1, 2) for z in (q, k, v))
        x = _attend_and_mlp(block, x, q, k, v, mask)
    return t.ln_f(x if x.shape[1] == L - start else x[:, start:])  # no block sliced it when there are none


def response_logits(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Logits ``(B, T, V)`` (float32, divided by the sampling temperature) that predict each response token.

    A plain GPT-2 runs through :func:`gpt2_hidden_states` from the last prompt position on; any other model through
    its own forward, with ``logits_to_keep``."""
    input_ids, attention_mask, position_ids = concat_inputs(query_ids, query_mask, response_ids, response_mask)
    P, T = query_ids.shape[1], response_ids.shape[1]
    if type(model) is GPT2LMHeadModel and lean_forward_applies(model):
        hidden = gpt2_hidden_states(model.transformer, input_ids, attention_mask, position_ids, start=P - 1)
        logits = model.lm_head(hidden[:, :T]).float()
    else:
        # only the T positions that predict response tokens go through the LM head: (B, T, V), no slice of a wider
        # one. A remote-code model may read logits_to_keep as a count only: it gets the last T + 1 positions, sliced.
        remote = bool(getattr(getattr(model, "config", None), "auto_map", None))
        keep = T + 1 if remote else torch.arange(P - 1, P + T - 1, device=input_ids.device)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=keep,
            use_cache=False,
        )
        logits = (out.logits[:, :-1] if remote else out.logits).float()
    return logits if temperature == 1.0 else logits / temperature  # x / 1.0 == x: no (B, T, V) pass for nothing


def response_logprobs(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs ``(B, T)`` of the response tokens (rollout layout) under a causal LM, 0 on padding."""
    logits = response_logits(model, query_ids, query_mask, response_ids, response_mask, temperature)
    return logprobs_from_logits(logits, response_ids) * response_mask


def sequence_mask(attention_mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Which next-token positions ``(B, T-1)`` of right-padded sequences are response tokens: position ``t``
    predicts token ``t + 1``, a response token when ``t + 1 >= starts[i]`` and not padding."""
    pos = torch.arange(1, attention_mask.shape[1], device=attention_mask.device)[None]
    return (pos >= starts[:, None]) & (attention_mask[:, 1:] > 0)


def sequence_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """Summed log-probs ``(B,)`` of each right-padded sequence's tokens from position ``starts[i]`` on."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    lp = logprobs_from_logits(logits, input_ids[:, 1:])
    return (lp * sequence_mask(attention_mask, starts)).sum(1)


def truncate_after_stop(
    response_ids: torch.Tensor, stop_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token (any of ``stop_ids``).

    Only the end-of-turn token (``stop_ids[0]``, ``<|end|>``) ends a turn: a response whose first stop token is
    another one (``<|endoftext|>``, eos) is cut there too, but counts as not ended, like one that reached the
    length limit (PPO's ``missing_eos_penalty``; a reward model never saw a turn end that way).

    Returns:
        ``(ids, mask, ended)``: ids with everything after the first stop token set to ``pad_id``;
        ``(B, T)`` mask, 1 up to and including that stop token (all ones when there is none);
        ``(B,)`` bool, whether the first stop token is ``stop_ids[0]``.

    >>> truncate_after_stop(torch.tensor([[4, 9, 4, 4], [4, 4, 4, 4], [4, 8, 9, 4]]), stop_ids=[9, 8], pad_id=0)
    (tensor([[4, 9, 0, 0],
            [4, 4, 4, 4],
            [4, 8, 0, 0]]), tensor([[1, 1, 0, 0],
            [1, 1, 1, 1],
            [1, 1, 0, 0]]), tensor([ True, False, False]))
    """
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))
    # stops strictly before position t: a token is kept while no stop came before it
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    mask = (stops_before == 0).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    first_stop = is_stop & (stops_before == 0)
    return ids, mask, (first_stop & (response_ids == stop_ids[0])).any(dim=1)


def ensure_end_token(
    response_ids: torch.Tensor, response_mask: torch.Tensor, stop_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the end-of-turn token (``stop_ids[0]``) to every response whose last token is not it, so a reward
    model scores text in the format it was trained on (prompt + response + ``<|end|>``), at the position it was
    trained to read. A response cut at another stop token (``<|endoftext|>``) keeps it and gets ``<|end|>`` after.

    Returns:
        ``(ids, mask)`` of width ``T + 1``.

    >>> ids, mask = torch.tensor([[4, 9, 0], [4, 4, 4], [4, 8, 0]]), torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    >>> ensure_end_token(ids, mask, stop_ids=[9, 8], pad_id=0)
    (tensor([[4, 9, 0, 0],
            [4, 4, 4, 9],
            [4, 8, 9, 0]]), tensor([[1, 1, 0, 0],
            [1, 1, 1, 1],
            [1, 1, 1, 0]]))
    """
    B = response_ids.shape[0]
    ids = torch.cat([response_ids, response_ids.new_full((B, 1), pad_id)], dim=1)
    mask = torch.cat([response_mask, response_mask.new_zeros((B, 1))], dim=1)
    lengths = response_mask.long().sum(1)
    last = ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    ended = (last == stop_ids[0]) & (lengths > 0)
    rows = (~ended).nonzero().squeeze(1)
    ids[rows, lengths[rows]] = stop_ids[0]
    mask[rows, lengths[rows]] = 1
    return ids, mask


# ----------------------------------------------------------------------------- model set-up


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; its train/eval mode is restored however the block ends."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: PPO's ratio must be 1 before the first update, and reference
    log-probs are dropout-free."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


class _SigmoidFormGELU(torch.autograd.Function):
    """GPT-2's tanh-GELU ``0.5 x (1 + tanh(u))``, ``u = c (x + a x^3)``, computed as ``x * sigmoid(2u)`` (the same
    function: ``0.5 (1 + tanh(u)) = sigmoid(2u)``) with a hand-written backward.

    On an AVX2 CPU torch's ``tanh`` (and the fused ``gelu(approximate="tanh")`` with its backward) costs ~4 ns an
    element, its ``sigmoid`` a third of that: forward and backward together take ~1.1 ms against ~1.7 ms for a
    ``(704, 256)`` activation, with the same error against a float64 reference (~5e-7). The forward keeps
    ``sigmoid(2u)`` for the backward, one activation-sized tensor more than the fused kernel keeps.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        # sigmoid(2u) = sigmoid(x (2c + 2ca x^2)), in place on one new tensor
        s = torch.mul(x, x).mul_(2 * _GELU_C * _GELU_A).add_(2 * _GELU_C).mul_(x).sigmoid_()
        if not ctx.needs_input_grad[0]:  # no graph (inference, or x needs no gradient): s is not kept
            return s.mul_(x)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises instead of coming out wrong
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, s = ctx.saved_tensors
        # d/dx x s = s + x s (1 - s) (2c + 6ca x^2); x^2 is capped so that an activation up to ~1e30 keeps a finite
        # gradient (torch's fused kernel gives NaN from ~1e20; at |x| >= 1e4 s (1 - s) is exactly 0 in float32)
        t = torch.mul(x, x).clamp_(max=1e8).mul_(6 * _GELU_C * _GELU_A).add_(2 * _GELU_C).mul_(x).mul_(s)
        return t.addcmul_(t, s, value=-1).add_(s).mul_(grad)


class TanhGELU(nn.Module):
    """GPT-2's tanh-approximate GELU (``gelu_new``, ``gelu_pytorch_tanh``) at its fastest on each device: the
    sigmoid form (:class:`_SigmoidFormGELU`) for float32 on a CPU, torch's fused ``gelu(approximate="tanh")``
    elsewhere (a GPU's fused kernel beats five element-wise passes, and low-precision inputs keep the kernel's
    float32 internals). The same function up to float rounding on every path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32:
            return _SigmoidFormGELU.apply(x)
        return F.gelu(x, approximate="tanh")


def fuse_activations(model: nn.Module) -> int:
    """Swap GPT-2's tanh-GELU modules (``gelu_new``: a Python formula of 5 element-wise kernels and their backward;
    ``gelu_pytorch_tanh``: torch's fused kernel) for :class:`TanhGELU`: the same function up to float rounding.
    The Python formula cost ~20% of a tiny model's PPO step on a CPU; the sigmoid form takes another 20-35% off the
    activation's own time there (profiled inside a PPO update: 92-96 ms of the fused kernel, 62-78 ms of it).

    Returns:
        The number of activation modules replaced (the saved config is untouched).
    """
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (NewGELUActivation, GELUTanh):
                setattr(module, name, TanhGELU())
                n += 1
    return n


# ----------------------------------------------------------------------------- generation


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


def render_user_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of each user message through the chat template, with the generation prompt."""
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def generate(
    policy: Any,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    lean: bool = True,
    **generate_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (or greedily decode) responses with the KV cache; see :func:`truncate_after_stop`.

    A GPT-2 model sampled from its full distribution (or decoded greedily) goes through :func:`_lean_decode`, which
    gives Hugging Face's ``generate``'s tokens from the same RNG state in about 30% less time; anything else, or
    ``lean=False``, goes through ``generate``.

    Args:
        policy: a Hugging Face causal LM (already gathered under ZeRO-3).
        query_ids, query_mask: ``(B, P)`` left-padded prompts.
        max_new_tokens: response length limit.
        stop_ids: ids that stop generation (``<|end|>``, ``<|endoftext|>``); only the first ends a turn.
        pad_id: id written after the end of a response.
        do_sample, temperature, top_k, top_p: sampling settings (greedy when ``do_sample`` is False).
        lean: allow the lean decode loop (False: always Hugging Face's ``generate``).
        **generate_kwargs: passed to ``generate`` (e.g. ``synced_gpus=True`` under ZeRO-3); the lean loop is used
            only without them (``synced_gpus=False`` aside).

    Returns:
        ``(response_ids, response_mask, ended)``, ``(B, T)``, ``(B, T)``, ``(B,)`` with ``T <= max_new_tokens``;
        ``ended``: the response stopped at ``stop_ids[0]``.
    """
    # synced_gpus=False asks for what the lean loop does anyway (no lock-step with other processes)
    hf_only = {k: v for k, v in generate_kwargs.items() if not (k == "synced_gpus" and v is False)}
    if lean and not hf_only and lean_decode_applies(policy, do_sample, top_k, top_p):
        with eval_mode(policy):
            ids, _, _ = _lean_decode(
                policy, query_ids, query_mask, max_new_tokens, stop_ids, pad_id, do_sample, temperature
            )
        return truncate_after_stop(ids, stop_ids, pad_id)
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=top_k if do_sample else None,
        top_p=top_p if do_sample else None,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )
    with eval_mode(policy):
        out = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen, **generate_kwargs)
    return truncate_after_stop(out[:, query_ids.shape[1] :], stop_ids, pad_id)


@dataclass
class Samples:
    """Responses sampled by :func:`sample_responses`, ``(B, T)`` each (``ended``: ``(B,)``)."""

    ids: torch.Tensor
    """Response ids, ``pad_id`` after the first stop token."""
    mask: torch.Tensor
    """1 up to and including the first stop token."""
    ended: torch.Tensor
    """Whether the response stopped at the end-of-turn token."""
    logprobs: torch.Tensor | None = None
    """float32 log-probability of each token under the distribution it was drawn from (the logits divided by the
    temperature), 0 after the end; None where Hugging Face's ``generate`` sampled."""
    entropy: torch.Tensor | None = None
    """float32 entropy of that distribution at each position, 0 after the end; None when ``logprobs`` is."""


@torch.no_grad()
def sample_responses(
    policy: Any,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    with_logprobs: bool = True,
) -> Samples:
    """PPO's rollout sampling: responses with the log-probs and entropies of the distributions they came from.

    A GPT-2 model sampled from its full distribution goes through the lean decode loop with the inverse-CDF draw
    (:func:`_lean_decode`): the log-probs and entropies come with the tokens, from the sampling logits (as TRL's PPO
    takes them), so no forward pass is needed to recompute them. Anything else samples with :func:`generate`
    (Hugging Face's ``generate``) and returns no log-probs; the caller then computes them with a forward pass.
    ``with_logprobs=False`` asks for none (the same tokens from the same RNG state).
    """
    if not lean_decode_applies(policy, True, top_k, top_p):
        ids, mask, ended = generate(
            policy, query_ids, query_mask, max_new_tokens, stop_ids, pad_id, True, temperature, top_k, top_p
        )
        return Samples(ids, mask, ended)
    with eval_mode(policy):
        raw, lps, ents = _lean_decode(
            policy, query_ids, query_mask, max_new_tokens, stop_ids, pad_id, True, temperature, "inverse_cdf",
            with_logprobs,
        )  # fmt: skip
    ids, mask, ended = truncate_after_stop(raw, stop_ids, pad_id)
    if lps is None or ents is None:
        return Samples(ids, mask, ended)
    return Samples(ids, mask, ended, lps * mask, ents * mask)


def lean_decode_applies(policy: Any, do_sample: bool, top_k: int | None, top_p: float | None) -> bool:
    """Whether :func:`_lean_decode` reproduces ``generate`` for ``policy``: a plain GPT-2 LM (SDPA attention, no
    cross-attention, no reordered or upcast attention) sampled from the full distribution or decoded greedily."""
    return (
        isinstance(policy, GPT2LMHeadModel)
        and lean_forward_applies(policy)
        and (not do_sample or ((top_k or 0) == 0 and (1.0 if top_p is None else top_p) == 1.0))
    )


@torch.no_grad()
def _lean_decode(
    model: Any,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    do_sample: bool,
    temperature: float,
    sampler: Literal["multinomial", "inverse_cdf"] = "multinomial",
    with_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The new tokens ``(B, T)`` of a GPT-2 model's KV-cache decoding, in ``generate``'s order of operations.

    It calls the model's own modules, with the keys and values in buffers allocated once for the whole response
    instead of grown by concatenation each step. With ``sampler="multinomial"`` sampling is ``generate``'s: the last
    position's logits divided by the temperature (when it is not 1), a softmax, and one ``torch.multinomial`` draw
    per row from the same RNG, so the tokens are ``generate``'s. ``"inverse_cdf"`` draws from the same distribution
    with one uniform number per row (:func:`_inverse_cdf_draw`) instead of ``multinomial``'s one exponential number
    per vocabulary entry and row (on a 2-core CPU, 0.07 ms against 1.2 ms a step for 64 rows of 512 tokens): other
    tokens than ``generate``'s from the same seed, the same distribution. A row that has sampled a stop token gets
    ``pad_id`` from then on. The loop stops when every row has stopped, or after ``max_new_tokens``. Left padding is
    masked out, and positions count real tokens only.

    Returns:
        ``(tokens, logprobs, entropy)``; with ``with_logprobs`` the last two are ``(B, T)`` float32: each token's
        log-probability and the entropy of the distribution it was drawn from (the logits divided by the
        temperature; for greedy decoding, the temperature-1 distribution), else None.
    """
    t, cfg = model.transformer, model.config
    dev = query_ids.device
    B, P = query_ids.shape
    H = cfg.n_head
    D = cfg.n_embd // H
    L = P + max_new_tokens
    keys = [torch.empty(B, H, L, D, device=dev, dtype=t.wte.weight.dtype) for _ in t.h]
    values = [torch.empty_like(k) for k in keys]
    key_mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
    key_mask[:, :P] = query_mask.bool()
    positions = query_mask.long().cumsum(1) - 1
    mask = _self_attention_mask(query_mask)  # the prompt's: a left-padding row attends to itself only

    def blocks(x: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        end = start + x.shape[1]
        for i, block in enumerate(t.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=2)
            shape = (B, -1, H, D)
            keys[i][:, :, start:end] = k.view(shape).transpose(1, 2)
            values[i][:, :, start:end] = v.view(shape).transpose(1, 2)
            x = _attend_and_mlp(
                block, x, q.view(shape).transpose(1, 2), keys[i][:, :, :end], values[i][:, :, :end], mask
            )
        return t.ln_f(x[:, -1])

    hidden = blocks(t.wte(query_ids) + t.wpe(positions.clamp(min=0)), mask, 0)
    stops = torch.tensor(stop_ids, device=dev)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    lps = torch.zeros(B, max_new_tokens, device=dev) if with_logprobs else None
    ents = torch.zeros(B, max_new_tokens, device=dev) if with_logprobs else None
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    position = positions[:, -1]
    steps = 0
    for step in range(max_new_tokens):
        logits = model.lm_head(hidden).float()
        if do_sample and temperature != 1.0:
            logits = logits / temperature
        probs = F.softmax(logits, dim=-1) if do_sample or with_logprobs else None
        if not do_sample:
            token = torch.argmax(logits, dim=-1)
        elif sampler == "inverse_cdf":
            token = _inverse_cdf_draw(probs)
        else:
            token = torch.multinomial(probs, num_samples=1).squeeze(1)
        if with_logprobs:
            logp = F.log_softmax(logits, dim=-1)
            lps[:, step] = logp.gather(1, token[:, None]).squeeze(1)
            ents[:, step] = -(probs * logp).sum(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out[:, step] = token
        steps = step + 1
        done = done | torch.isin(token, stops)
        if bool(done.all()) or steps == max_new_tokens:
            break
        key_mask[:, P + step] = True
        position = position + 1
        hidden = blocks(
            t.wte(token[:, None]) + t.wpe(position[:, None]), key_mask[:, None, None, : P + step + 1], P + step
        )
    if not with_logprobs:
        return out[:, :steps], None, None
    return out[:, :steps], lps[:, :steps], ents[:, :steps]


def _inverse_cdf_draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` ``(B, V)``: the first index whose cumulative probability exceeds ``u`` times
    the row's total, ``u`` uniform in [0, 1) from torch's RNG (one number per row). An index of probability 0
    is never drawn: its cumulative sum equals the one before it, which exceeds ``u`` first. The sums are float64,
    so that a parallel (GPU) scan's float32 rounding cannot make them decrease."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    # u < total, so an index always exists; the clamp only guards a product rounded up to the total itself
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[1] - 1).squeeze(1)


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
    """Answer each user prompt with the model through the chat template (evaluation's text path).

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
    encoded = render_user_prompts(tokenizer, prompts)
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
    rng_devices = [device] if device.type == "cuda" else []
    sampling = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    responses: list[str] = []
    with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(encoded), batch_size):
            q, q_mask = left_pad(encoded[start : start + batch_size], pad_id, device)
            ids, _, _ = generate(model, q, q_mask, max_new_tokens, stops, pad_id, **sampling, **generate_kwargs)
            responses.extend(decode_answer(tokenizer, row, set(stops)) for row in ids.tolist())
    return responses


def decode_answer(tokenizer: Any, ids: list[int], stops: set[int]) -> str:
    """Decode generated ids up to (not including) the first stop token, without special tokens."""
    for n, t in enumerate(ids):
        if t in stops:
            ids = ids[:n]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)
