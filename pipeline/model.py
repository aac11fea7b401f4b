"""The from-scratch GPT (nanoGPT-style, one file).

Architecture (GPT-2 / nanoGPT): token + learned position embeddings, dropout, ``n_layer`` pre-LayerNorm
blocks (LN -> causal self-attention -> residual; LN -> 4x MLP with tanh-GELU -> residual), a final LN and
an LM head tied to the token embedding. Parameter names are GPT-2's (``transformer.h.0.attn.c_attn``...),
so the mapping onto a Hugging Face ``GPT2LMHeadModel`` (``pipeline.gpt2_weights``) is one to one.

Usage::

    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64))
    logits, loss = model(idx, targets)             # idx, targets: (B, T) int64; targets -100 = ignored
    out = model.generate(prompt, 20, temperature=0.8, top_p=0.9, eos_token_id=[3, 0])

Departures from GPT-2 / nanoGPT:
    - ``bias=False`` drops biases from Linear and LayerNorm (nanoGPT option); the HF export writes zeros.
    - The vocabulary may be padded to a multiple of ``pad_vocab_multiple``; the padded rows are real rows of
      the exported embedding (HF ``vocab_size`` = embedding rows).
    - Generation never slides the context window: prompt + new tokens must fit ``block_size``
      (an error otherwise), so the KV-cache and recompute paths are exactly comparable.
"""

from __future__ import annotations

import inspect
import logging
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from pipeline.config import ModelConfig

__all__ = ["GPT", "KVCache", "LN_EPS"]

logger = logging.getLogger(__name__)

LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon
IGNORE_INDEX = -100  # targets with this value carry no loss (HF / torch convention)


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
