"""The from-scratch GPT (nanoGPT-style, one file) and its one-to-one mapping onto Hugging Face GPT-2.

Architecture (GPT-2 / nanoGPT): token + learned position embeddings, dropout, ``n_layer`` pre-LayerNorm
blocks (LN -> causal self-attention -> residual; LN -> 4x MLP with tanh-GELU -> residual), a final LN and
an LM head tied to the token embedding. Parameter names are GPT-2's (``transformer.h.0.attn.c_attn``...),
so :func:`to_hf_state_dict` only transposes the Conv1D matrices and a ``GPT2LMHeadModel`` built from
:func:`to_hf_config` gives the same logits.

Usage::

    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64))
    logits, loss = model(idx, targets)             # idx, targets: (B, T) int64; targets -100 = ignored
    out = model.generate(prompt, 20, temperature=0.8, top_p=0.9, eos_token_id=[3, 0])
    save_hf(model, "artifact/")                    # loads with AutoModelForCausalLM.from_pretrained

Departures from GPT-2 / nanoGPT:
    - ``bias=False`` drops biases from Linear and LayerNorm (nanoGPT option); the HF export writes zeros.
    - The vocabulary may be padded to a multiple of ``pad_vocab_multiple``; the padded rows are real rows of
      the exported embedding (HF ``vocab_size`` = embedding rows).
    - Generation never slides the context window: prompt + new tokens must fit ``block_size``
      (an error otherwise), so the KV-cache and recompute paths are exactly comparable.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from pipeline.config import ModelConfig

if TYPE_CHECKING:
    from transformers import GPT2Config

__all__ = ["GPT", "KVCache", "to_hf_config", "to_hf_state_dict", "from_hf", "model_config_from_hf", "save_hf"]

logger = logging.getLogger(__name__)

LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon
IGNORE_INDEX = -100  # targets with this value carry no loss (HF / torch convention)
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


class KVCache:
    """Keys and values of every layer for incremental decoding; allocated lazily on first use.

    Each layer holds ``k, v`` of shape (B, n_head, max_len, head_dim); ``pos`` is the number of
    positions already written (the same for all rows: prompts in a batch have equal length).
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.pos = 0
        self._k: list[torch.Tensor | None] = [None] * n_layer
        self._v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, hd) at positions ``pos..pos+T`` and return all cached k, v up to there."""
        B, H, T, hd = k.shape
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} positions exceed its length {self.max_len}")
        if self._k[layer] is None:
            self._k[layer] = k.new_empty(B, H, self.max_len, hd)
            self._v[layer] = v.new_empty(B, H, self.max_len, hd)
        ck, cv = self._k[layer], self._v[layer]
        ck[:, :, self.pos : self.pos + T] = k
        cv[:, :, self.pos : self.pos + T] = v
        return ck[:, :, : self.pos + T], cv[:, :, : self.pos + T]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.layer_idx = cfg.n_head, cfg.n_embd, layer_idx
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        mask, is_causal = None, True
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)
            if past > 0:
                is_causal = False  # SDPA's is_causal aligns top-left, wrong when queries start at `past`
                if T > 1:  # query i sits at absolute position past + i and sees keys 0..past + i
                    q_pos = torch.arange(past, past + T, device=x.device)[:, None]
                    mask = q_pos >= torch.arange(past + T, device=x.device)[None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal and T > 1
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh approximation = GPT-2's "gelu_new", so HF export gives identical activations
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2-shaped decoder-only transformer.

    Args:
        config: model shape; ``vocab_size`` must already be resolved (> 0).

    Raises:
        ValueError: ``model.vocab_size`` is not resolved.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size must be resolved to the (padded) tokenizer vocabulary size before building "
                f"the GPT, got {config.vocab_size}"
            )
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=LN_EPS, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017, GPT-2)
        self.apply(self._init_weights)
        # GPT-2 paper: scale residual projections by 1/sqrt(N), N = 2 residual adds per layer
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_logits_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model.

        Args:
            idx: (B, T) token ids. With ``kv_cache``, the positions continue from ``kv_cache.pos``.
            targets: (B, T) next-token ids, ``-100`` where no loss is taken; None for no loss.
            kv_cache: cache to read past keys/values from and append this call's to (advanced by T).
            last_logits_only: return logits of the last position only (generation).

        Returns:
            ``(logits, loss)``: logits (B, T, V) or (B, 1, V) with ``last_logits_only``; loss is the mean
            cross entropy over non-ignored targets, or None without targets.

        Raises:
            ValueError: the sequence (plus cached positions) is longer than ``model.block_size``.
        """
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            what = f"sequence length {T}" if start == 0 else f"cached {start} + new {T} positions"
            raise ValueError(f"{what} exceeds model.block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)
        if last_logits_only and targets is None:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    # ------------------------------------------------------------------ generation

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to ``max_len`` positions (default ``block_size``)."""
        return KVCache(self.config.n_layer, max_len or self.config.block_size)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue the prompts ``idx`` (B, T) by up to ``max_new_tokens`` tokens.

        The prompt is prefilled into a KV cache, then one token is decoded per step (``use_cache=False``
        recomputes the whole prefix each step instead: slower, same result). The model runs in eval mode
        for the call and its previous mode is restored. All prompts share one length (no padding).

        Args:
            idx: (B, T) prompt token ids.
            max_new_tokens: tokens to generate at most.
            temperature: 0 = greedy (argmax); else logits are divided by it before sampling.
            top_k: keep only the k most likely tokens (0 = off).
            top_p: nucleus sampling, keep the smallest set of tokens whose probability sums to >= top_p
                (1.0 = off).
            eos_token_id: id(s) that end a sequence. A finished row is filled with the first of these ids;
                generation stops once every row has finished.
            generator: random generator for sampling (reproducible samples).
            use_cache: use the KV cache.

        Returns:
            (B, T + n) token ids, prompt included, with n <= max_new_tokens.

        Raises:
            ValueError: prompt length + ``max_new_tokens`` exceeds ``model.block_size`` (the context is
                never cropped; shorten the prompt or generate fewer tokens), or bad sampling settings.
        """
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt length {T} + max_new_tokens {max_new_tokens} = {T + max_new_tokens} exceeds "
                f"model.block_size {self.config.block_size}; shorten the prompt or generate fewer tokens"
            )
        if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        eos_t = torch.tensor(eos, dtype=torch.long, device=idx.device)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        was_training = self.training
        self.eval()
        try:
            cache = self.new_kv_cache(T + max_new_tokens) if use_cache else None
            step_input = idx
            for _ in range(max_new_tokens):
                logits, _ = self(step_input if use_cache else idx, kv_cache=cache, last_logits_only=True)
                nxt = self._pick(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B,)
                if eos:
                    nxt = torch.where(finished, eos_t[0], nxt)
                    finished |= torch.isin(nxt, eos_t)
                idx = torch.cat([idx, nxt[:, None]], dim=1)
                step_input = nxt[:, None]
                if eos and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return idx

    @staticmethod
    def _pick(
        logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Choose the next token from (B, V) logits: argmax when temperature is 0, else filtered sampling."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
            drop = probs.cumsum(dim=-1) - probs >= top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    # ------------------------------------------------------------------ training helpers

    def configure_optimizer(
        self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings (>= 2-D) only, none on biases and LayerNorm.

        Args:
            weight_decay: decay for the >= 2-D parameters (GPT-3 / nanoGPT: 0.1).
            lr: learning rate.
            betas: Adam betas (GPT-3: (0.9, 0.95)).
            device_type: "cuda" enables the fused kernel when this torch has it.

        Returns:
            The optimizer, with two parameter groups (decayed first).
        """
        params = [p for p in self.parameters() if p.requires_grad]  # tied weights appear once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        logger.info(
            "AdamW: %d decayed tensors (%d params), %d not decayed (%d params), fused=%s",
            len(decay),
            sum(p.numel() for p in decay),
            len(no_decay),
            sum(p.numel() for p in no_decay),
            fused,
        )
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters; ``non_embedding`` leaves out the position embedding (the token embedding
        counts, being the LM head's weight too), as nanoGPT does."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, forward + backward: 6N + 12 * L * H * Q * T (PaLM appendix B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (e.g. 989e12 for H100 bf16)."""
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops


# ---------------------------------------------------------------------------- Hugging Face GPT-2 mapping


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
    from transformers import GPT2Config

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
    from transformers import GPT2LMHeadModel

    out = Path(out_dir)
    config = to_hf_config(model.config, **(extra_config or {}))
    hf = GPT2LMHeadModel(config).to(next(model.parameters()).dtype)
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    for k, v in (generation_config or {}).items():
        setattr(hf.generation_config, k, v)
    hf.save_pretrained(out)  # transformers 5 always writes safetensors
    logger.info("saved GPT2LMHeadModel (%d params) to %s", sum(p.numel() for p in hf.parameters()), out)
    return out
