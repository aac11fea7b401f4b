"""The one-to-one mapping between the from-scratch GPT (``pipeline.model``) and Hugging Face GPT-2.

Our parameter names are GPT-2's (``transformer.h.0.attn.c_attn``...), so :func:`to_hf_state_dict` only
transposes the Conv1D matrices, and a ``GPT2LMHeadModel`` built from :func:`to_hf_config` gives the same
logits. :func:`from_hf` goes the other way (continue pretraining from GPT-2 weights).

Usage::

    save_hf(model, "artifact/")                    # loads with AutoModelForCausalLM.from_pretrained
    model = from_hf(GPT2LMHeadModel.from_pretrained("gpt2"))

Departures from GPT-2: a ``bias=False`` model is exported with zero biases; a padded vocabulary's extra rows
are real rows of the exported embedding (HF ``vocab_size`` = embedding rows).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.config import ModelConfig
from pipeline.model import GPT, LN_EPS

__all__ = ["to_hf_config", "to_hf_state_dict", "from_hf", "model_config_from_hf", "save_hf"]

logger = logging.getLogger(__name__)

_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
"""GPT-2 stores these projections as Conv1D, with (in, out) weights: transposed both ways."""


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (torch.compile's ``_orig_mod.``, DDP's ``module.``)."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def to_hf_config(model_cfg: ModelConfig, **extra: Any) -> GPT2Config:
    """The ``GPT2Config`` whose ``GPT2LMHeadModel`` has exactly this GPT's shape and function.

    Args:
        model_cfg: our config, ``vocab_size`` resolved (the padded embedding rows).
        **extra: more config fields (``bos_token_id``, ``eos_token_id``, ``pad_token_id``...). Shape and
            function fields may be repeated only with the same value.

    Raises:
        ValueError: unresolved ``model.vocab_size`` or an ``extra`` field contradicting the model.
    """
    if model_cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size must be resolved (> 0) to build a GPT2Config, got {model_cfg.vocab_size}")
    fixed = dict(
        vocab_size=model_cfg.vocab_size,
        n_positions=model_cfg.block_size,
        n_embd=model_cfg.n_embd,
        n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head,
        n_inner=None,  # 4 * n_embd
        activation_function="gelu_new",
        layer_norm_epsilon=LN_EPS,
        tie_word_embeddings=True,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        add_cross_attention=False,
    )
    for k, v in extra.items():
        if k in fixed and fixed[k] != v:
            raise ValueError(f"to_hf_config: {k}={v!r} contradicts the model ({k}={fixed[k]!r})")
    fields: dict[str, Any] = dict(
        resid_pdrop=model_cfg.dropout,
        embd_pdrop=model_cfg.dropout,
        attn_pdrop=model_cfg.dropout,
        bos_token_id=None,  # GPT2Config defaults to 50256, outside small vocabularies; the caller sets ids
        eos_token_id=None,
        architectures=["GPT2LMHeadModel"],
    )
    fields.update(extra)
    fields.update(fixed)
    return GPT2Config(**fields)


def to_hf_state_dict(model: GPT | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under GPT2LMHeadModel's names and layouts (new tensors, on CPU).

    GPT-2 stores its projections as Conv1D with (in, out) weights, so those are transposed. Without
    biases (``bias=False``) zero biases are written: GPT-2 always has them, and zeros change nothing.

    Args:
        model: a GPT, or its state dict (``_orig_mod.`` / ``module.`` prefixes are stripped).

    Returns:
        The state dict for ``GPT2LMHeadModel.load_state_dict`` (``lm_head.weight`` equals the tied wte).
    """
    state = _strip_prefixes(model.state_dict() if isinstance(model, nn.Module) else dict(model))
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        out[k] = v.t().contiguous() if k.endswith(_CONV1D) else v.clone()
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    for k in list(out):  # zero biases for a bias-free model: Linear and LayerNorm
        if k.endswith(".weight") and k != "lm_head.weight" and not k.startswith(("transformer.wte", "transformer.wpe")):
            b = k[: -len("weight")] + "bias"
            if b not in out:
                w = out[k]
                out[b] = w.new_zeros(w.shape[1] if k.endswith(_CONV1D) else w.shape[0])
    return out


def model_config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    """Our ``ModelConfig`` for a GPT-2 config (``bias=True``; ``overrides`` win).

    Raises:
        ValueError: a GPT-2 variant this GPT does not implement (other activation, inner size, attention scaling).
    """
    problems = []
    if getattr(hf_config, "model_type", "gpt2") != "gpt2":
        problems.append(f"model_type={hf_config.model_type!r} (need 'gpt2')")
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={hf_config.activation_function!r} (need gelu_new)")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        problems.append(f"n_inner={hf_config.n_inner} (need 4 * n_embd)")
    if hf_config.scale_attn_by_inverse_layer_idx or not hf_config.scale_attn_weights:
        problems.append("non-standard attention scaling")
    if abs(hf_config.layer_norm_epsilon - LN_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon={hf_config.layer_norm_epsilon} (need {LN_EPS})")
    if problems:
        raise ValueError("cannot map this Hugging Face config onto the GPT: " + "; ".join(problems))
    fields = dict(
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        dropout=hf_config.resid_pdrop,
        bias=True,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def from_hf(hf_model_or_state_dict: Any, model_cfg: ModelConfig | None = None) -> GPT:
    """Build a GPT from GPT-2 weights (the inverse of :func:`to_hf_state_dict`).

    Args:
        hf_model_or_state_dict: a ``GPT2LMHeadModel`` / ``GPT2Model``, or a state dict with GPT-2 names
            (with or without the ``transformer.`` prefix).
        model_cfg: the target shape. None: derived from the HF model's config. ``vocab_size=0``: the
            checkpoint's embedding rows. With ``bias=False`` every bias in the checkpoint must be zero.

    Returns:
        A GPT on CPU, in the checkpoint's dtype.

    Raises:
        ValueError: missing/unexpected keys, shape mismatches (each named), non-zero biases with bias=False.
    """
    if isinstance(hf_model_or_state_dict, nn.Module):
        if model_cfg is None:
            model_cfg = model_config_from_hf(hf_model_or_state_dict.config)
        raw = hf_model_or_state_dict.state_dict()
    else:
        raw = dict(hf_model_or_state_dict)
    if model_cfg is None:
        raise ValueError("from_hf: pass model_cfg when converting a bare state dict")
    state: dict[str, torch.Tensor] = {}
    for k, v in _strip_prefixes(raw).items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of older checkpoints
            continue
        state[k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k] = v.detach().cpu()
    wte = state.get("transformer.wte.weight")
    if wte is None:
        raise ValueError("from_hf: the checkpoint has no transformer.wte.weight")
    if model_cfg.vocab_size <= 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=wte.shape[0])
    head = state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, wte):
        raise ValueError("from_hf: lm_head.weight differs from transformer.wte.weight; this GPT ties them")
    if not model_cfg.bias:
        for k in [k for k in state if k.endswith(".bias")]:
            if torch.count_nonzero(state[k]):
                raise ValueError(f"from_hf: {k} is non-zero but model.bias=False cannot represent biases")
            del state[k]
    model = GPT(model_cfg).to(wte.dtype)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    for k, shape in expected.items():
        if k in state:
            got = state[k].shape[::-1] if k.endswith(_CONV1D) else state[k].shape
            if got != shape:
                problems.append(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(shape)}")
    if problems:
        raise ValueError("from_hf: checkpoint does not fit the model config: " + "; ".join(problems))
    converted = {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in state.items()}
    model.load_state_dict(converted, strict=False)  # lm_head.weight is tied to wte
    return model


def save_hf(
    model: GPT,
    out_dir: str | Path,
    extra_config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a ``GPT2LMHeadModel`` directory (config.json, model.safetensors,
    generation_config.json). Tokenizer files are the caller's.

    Args:
        model: the GPT (unwrapped; under ZeRO-3 gather its parameters first).
        out_dir: target folder (created).
        extra_config: more GPT2Config fields, e.g. ``{"eos_token_id": 0, "pad_token_id": 1}``.
        generation_config: GenerationConfig fields to set, e.g. ``{"eos_token_id": [5, 0]}``.

    Returns:
        The output folder.
    """
    out = Path(out_dir)
    config = to_hf_config(model.config, **(extra_config or {}))
    hf = GPT2LMHeadModel(config).to(next(model.parameters()).dtype)
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    for k, v in (generation_config or {}).items():
        setattr(hf.generation_config, k, v)
    hf.save_pretrained(out)  # transformers 5 always writes safetensors
    logger.info("saved GPT2LMHeadModel (%d params) to %s", sum(p.numel() for p in hf.parameters()), out)
    return out
