"""The pretraining loop: our own loop on accelerate (one CPU, DDP, DeepSpeed ZeRO-2/3).

nanoGPT's recipe, made resumable and distributed:
- batches are random windows of the token shards drawn from ONE generator shared by all processes: each
  micro-step draws ``world_size * batch_size`` windows and process r takes slice r, so a 2-process run sees
  exactly the data a 1-process run with twice the accumulation sees (testable), and the generator's state
  is the data position saved in checkpoints;
- AdamW with weight decay on matrices only, linear warmup then cosine decay to ``min_lr`` (a pure function of
  the step, so it needs no scheduler state), gradient clipping, accumulation through accelerate;
- or (``optimizer: muon``) torch's Muon for the 2-D matrices inside the blocks and AdamW for the rest, as in
  modded-nanogpt (:func:`build_optimizers`); the one schedule scales both learning rates (:func:`set_schedule`);
  both optimizers' states are in every checkpoint;
- bf16 autocast when the stage resolves ``dtype`` so (``pipeline.precision``), optional ``torch.compile``;
- the loss is copied to the host only every ``log_interval`` steps (no per-step sync): a NaN/inf is detected
  there and stops the stage before the next checkpoint, so the last good checkpoint stays;
- SIGTERM/SIGINT set a flag (``pipeline.training.StopSignal``); the loop saves a checkpoint at the next step
  boundary and raises ``pipeline.training.Interrupted``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .checkpoint import generator_state, load_checkpoint, save_checkpoint, set_generator_state
from .config import ConfigError, ModelConfig, PretrainConfig
from .runs import StageDir, StageError
from .training import Interrupted, StopSignal

__all__ = [
    "lr_at",
    "muon_momentum_at",
    "muon_parameters",
    "build_optimizers",
    "set_schedule",
    "resolve_model_config",
    "PretrainResult",
    "train",
    "peak_flops_for",
]

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``.

    >>> c = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    >>> lr_at(0, c), lr_at(9, c), round(lr_at(60, c), 3), lr_at(110, c)
    (0.1, 1.0, 0.55, 0.1)
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


MUON_MOMENTUM_START = 0.85
"""Muon's momentum at step 0 when ``muon_momentum_warmup_steps`` > 0 (modded-nanogpt)."""


def muon_momentum_at(step: int, cfg: PretrainConfig) -> float:
    """Muon's momentum for optimizer step ``step``: linear from 0.85 to ``muon_momentum`` over
    ``muon_momentum_warmup_steps`` (modded-nanogpt), constant without warmup.

    >>> c = PretrainConfig(muon_momentum=0.95, muon_momentum_warmup_steps=10)
    >>> round(muon_momentum_at(0, c), 3), round(muon_momentum_at(5, c), 3), muon_momentum_at(10, c)
    (0.85, 0.9, 0.95)
    """
    if step >= cfg.muon_momentum_warmup_steps:
        return cfg.muon_momentum
    frac = step / cfg.muon_momentum_warmup_steps
    return (1 - frac) * MUON_MOMENTUM_START + frac * cfg.muon_momentum


def muon_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters Muon trains: the 2-D weight matrices inside the transformer blocks (attention ``c_attn`` and
    ``c_proj``, MLP ``c_fc`` and ``c_proj``). Embeddings, the (tied) LM head, LayerNorms and biases stay with AdamW:
    Muon orthogonalises hidden-layer updates, which suits neither a lookup table nor the output layer (Keller
    Jordan's Muon post; modded-nanogpt)."""
    return [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]


def build_optimizers(model: torch.nn.Module, cfg: PretrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
    """The optimizers of ``cfg.optimizer``, AdamW first (its state is ``optimizer.bin`` in every checkpoint).

    Args:
        model: the unprepared GPT (``configure_optimizer`` gives AdamW and its weight-decay rule).
        cfg: ``optimizer``, ``lr``, betas, ``weight_decay`` and the ``muon_*`` keys.
        device_type: ``cuda`` lets AdamW use its fused kernel.

    Returns:
        ``[AdamW]``, or ``[AdamW over the rest, Muon over muon_parameters(model)]``; every trainable parameter is
        in exactly one of them. Learning rates and momentum are set each step by :func:`set_schedule`.
    """
    adamw = model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device_type)
    if cfg.optimizer == "adamw":
        return [adamw]
    matrices = muon_parameters(model)
    taken = {id(p) for p in matrices}
    for group in adamw.param_groups:  # AdamW keeps its decay rule for what Muon does not take (it holds no state yet)
        group["params"] = [p for p in group["params"] if id(p) not in taken]
    muon = torch.optim.Muon(
        matrices, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum, nesterov=True
    )
    log.info(
        "Muon: %d matrices (%d params); AdamW: %d tensors (%d params)",
        len(matrices),
        sum(p.numel() for p in matrices),
        sum(len(g["params"]) for g in adamw.param_groups),
        sum(p.numel() for g in adamw.param_groups for p in g["params"]),
    )
    return [adamw, muon]


def set_schedule(optimizers: list[Any], step: int, cfg: PretrainConfig) -> float:
    """Set every optimizer's learning rate (and Muon's momentum) for optimizer step ``step``; returns AdamW's lr.

    One schedule for both: Muon's lr is ``lr_at(step) * muon_lr / lr``, so warmup and cosine decay scale both alike.
    """
    lr = lr_at(step, cfg)
    for opt in optimizers:
        is_muon = isinstance(getattr(opt, "optimizer", opt), torch.optim.Muon)  # accelerate wraps optimizers
        for group in opt.param_groups:
            if is_muon:
                group["lr"] = lr * cfg.muon_lr / cfg.lr
                group["momentum"] = muon_momentum_at(step, cfg)
            else:
                group["lr"] = lr
    return lr


def resolve_model_config(cfg: ModelConfig, tokenizer_vocab: int, seq_len: int) -> ModelConfig:
    """Fill ``vocab_size`` from the tokenizer (rounded up) and check the sequence length fits."""
    problems = []
    vocab = cfg.vocab_size
    if vocab == 0:
        m = cfg.pad_vocab_multiple
        vocab = ((tokenizer_vocab + m - 1) // m) * m
    elif vocab < tokenizer_vocab:
        problems.append(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab} tokens")
    if seq_len > cfg.block_size:
        problems.append(
            f"pretrain.block_size={seq_len} is larger than the model allows (model.block_size={cfg.block_size})"
        )
    if problems:
        raise StageError("; ".join(problems))
    return replace(cfg, vocab_size=vocab)


@dataclass
class PretrainResult:
    metrics: dict[str, Any]
    samples: list[dict[str, str]] = field(default_factory=list)
    prior_wall_time_s: float = 0.0


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    """Seconds spent in training steps only (no eval, no checkpoints): the tokens/s denominator."""
    last_train_loss: float = float("nan")
    last_val_loss: float = float("nan")


def _estimate_val_loss(model: Any, accelerator: Any, val: Any, cfg: PretrainConfig, seq_len: int, seed: int) -> float:
    """Mean loss over ``eval_iters`` fixed validation batches (the same batches at every evaluation)."""
    g = torch.Generator().manual_seed(seed + 7919)
    world, rank = accelerator.num_processes, accelerator.process_index
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            x, y = val.sample_batch(world * cfg.batch_size, seq_len, g)
            sl = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
            with accelerator.autocast():
                _, loss = model(x[sl].to(accelerator.device), y[sl].to(accelerator.device))
            total += loss.detach().float()
    model.train()
    total = accelerator.reduce(total, reduction="mean")
    return float(total) / cfg.eval_iters


def train(
    accelerator: Any,
    model: torch.nn.Module,
    train_data: Any,
    val_data: Any,
    cfg: PretrainConfig,
    seq_len: int,
    seed: int,
    stage_dir: StageDir,
    resume: bool,
    sample_fn: Callable[[torch.nn.Module], str] | None = None,
    peak_flops: float = 0.0,
    progress: bool = True,
) -> PretrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps, checkpointing into ``stage_dir``.

    Args:
        accelerator: an ``accelerate.Accelerator`` built with ``gradient_accumulation_steps=cfg.grad_accum``.
        model: the (unprepared) GPT; it must expose ``configure_optimizer``, ``transformer.h`` (the blocks, for
            Muon) and ``flops_per_token``.
        train_data / val_data: token shards with ``sample_batch(n, seq_len, generator) -> (x, y)``.
        seq_len: tokens per sequence.
        resume: continue from the latest complete checkpoint in ``stage_dir``.
        sample_fn: produces a text sample from the unwrapped model at each evaluation (main process).
        peak_flops: the accelerator's peak FLOP/s for MFU (0: MFU not reported).

    Returns:
        Final metrics (``train_loss``, ``val_loss``, ``tokens``, ``tokens_per_s``, ``mfu`` when known) and samples.

    Raises:
        ConfigError: ``optimizer=muon`` under DeepSpeed (before anything is built).
        StageError: non-finite loss (naming the steps).
        Interrupted: a stop signal reached a process; a checkpoint was saved first.
    """
    launch_problems = cfg.launch_problems(deepspeed=getattr(accelerator.state, "deepspeed_plugin", None) is not None)
    if launch_problems:
        raise ConfigError("; ".join(launch_problems))
    device_type = accelerator.device.type
    flops_per_token = model.flops_per_token(seq_len) if hasattr(model, "flops_per_token") else 0.0
    optimizers = build_optimizers(model, cfg, device_type)
    if cfg.compile:
        model = torch.compile(model)
    _fill_deepspeed_auto(accelerator, cfg)
    model, *optimizers = accelerator.prepare(model, *optimizers)

    data_gen = torch.Generator().manual_seed(seed)
    st = _State()
    if resume and (ckpt := stage_dir.latest_checkpoint()) is not None:
        saved = load_checkpoint(accelerator, ckpt)
        set_generator_state(data_gen, saved["data_generator"])
        st = _State(**{k: saved[k] for k in _State.__dataclass_fields__ if k in saved})
        if accelerator.is_main_process:
            stage_dir.truncate_metrics_after(st.step)
    prior_wall = st.wall_time_s
    t_start = time.time()

    def checkpoint() -> None:
        st.wall_time_s = prior_wall + time.time() - t_start
        state = {"data_generator": generator_state(data_gen), **st.__dict__}
        save_checkpoint(accelerator, stage_dir, st.step, cfg.keep_checkpoints, state)

    tb = _tensorboard(stage_dir) if accelerator.is_main_process else None
    bar = _progress(cfg.max_steps, st.step, progress and accelerator.is_main_process)
    world, rank = accelerator.num_processes, accelerator.process_index
    B, sl = cfg.batch_size, slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    tokens_per_step = world * B * seq_len * cfg.grad_accum
    loss_acc = torch.zeros((), device=accelerator.device)
    window_steps, window_train_s = 0, 0.0
    samples: list[dict[str, str]] = []

    model.train()
    with StopSignal() as stop:
        while st.step < cfg.max_steps:
            t0 = time.time()
            lr = set_schedule(optimizers, st.step, cfg)
            for _ in range(cfg.grad_accum):
                x, y = train_data.sample_batch(world * B, seq_len, data_gen)
                x, y = x[sl].to(accelerator.device, non_blocking=True), y[sl].to(accelerator.device, non_blocking=True)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        _, loss = model(x, y)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    for opt in optimizers:
                        opt.step()
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                loss_acc += loss.detach().float()
            st.step += 1
            st.tokens += tokens_per_step
            window_steps += 1
            last = st.step == cfg.max_steps
            logging_now = st.step % cfg.log_interval == 0 or last or st.step % cfg.ckpt_interval == 0
            evaluating = st.step % cfg.eval_interval == 0 or last
            if device_type == "cuda" and (logging_now or evaluating):
                torch.cuda.synchronize()  # queued kernels count as training time, not as the log's, eval's or save's
            dt = time.time() - t0
            window_train_s += dt
            st.train_time_s += dt
            bar.update(1)

            if logging_now:
                train_loss = float(accelerator.reduce(loss_acc, reduction="mean")) / (window_steps * cfg.grad_accum)
                if not math.isfinite(train_loss):
                    raise StageError(
                        f"non-finite training loss ({train_loss}) between steps {st.step - window_steps + 1} and "
                        f"{st.step}; the last good checkpoint stays in {stage_dir.checkpoints}. Lower pretrain.lr "
                        f"or raise pretrain.warmup_steps."
                    )
                tok_s = window_steps * tokens_per_step / max(window_train_s, 1e-9)
                rec: dict[str, Any] = {
                    "step": st.step,
                    "train/loss": train_loss,
                    "lr": lr,
                    "tokens": st.tokens,
                    "tokens_per_s": tok_s,
                    "ms_per_step": 1000 * window_train_s / window_steps,
                }
                if peak_flops and flops_per_token:
                    rec["mfu"] = tok_s * flops_per_token / peak_flops
                st.last_train_loss = train_loss
                _log(accelerator, stage_dir, tb, rec)
                bar.set_postfix(
                    loss=f"{train_loss:.4f}",
                    tok_s=f"{tok_s:,.0f}",
                    **({"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {}),
                )
                loss_acc.zero_()
                window_steps, window_train_s = 0, 0.0

            if evaluating:
                st.last_val_loss = _estimate_val_loss(model, accelerator, val_data, cfg, seq_len, seed)
                rec = {"step": st.step, "val/loss": st.last_val_loss, "train_time_s": st.train_time_s}
                if sample_fn is not None and accelerator.is_main_process:
                    text = sample_fn(accelerator.unwrap_model(model))
                    rec["sample"] = text
                    samples.append({"step": str(st.step), "text": text})
                _log(accelerator, stage_dir, tb, rec)
                bar.write(f"step {st.step}: val loss {st.last_val_loss:.4f}")

            signum = stop.any_process(accelerator)
            if st.step % cfg.ckpt_interval == 0 or last or signum:
                checkpoint()
            if signum:
                bar.close()
                raise Interrupted("pretrain", st.step, signum, stage_dir.checkpoints)
    bar.close()
    if tb is not None:
        tb.close()

    st.wall_time_s = prior_wall + time.time() - t_start
    metrics = {
        "train_loss": st.last_train_loss,
        "val_loss": st.last_val_loss,
        "tokens": st.tokens,
        "tokens_per_s": st.tokens / max(st.train_time_s, 1e-9),
        "steps": st.step,
        "world_size": world,
    }
    if peak_flops and flops_per_token:
        metrics["mfu"] = metrics["tokens_per_s"] * flops_per_token / peak_flops
    return PretrainResult(metrics=metrics, samples=samples, prior_wall_time_s=prior_wall)


def _fill_deepspeed_auto(accelerator: Any, cfg: PretrainConfig) -> None:
    """Our loop has no DataLoader for accelerate to read batch sizes from: fill DeepSpeed's "auto" values."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    ds["gradient_clipping"] = cfg.grad_clip if cfg.grad_clip > 0 else 0.0
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = accelerator.mixed_precision == "bf16"


def _log(accelerator: Any, stage_dir: StageDir, tb: Any, rec: dict[str, Any]) -> None:
    if not accelerator.is_main_process:
        return
    stage_dir.append_metrics(rec)
    if tb is not None:
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, rec["step"])
            elif k == "sample":
                tb.add_text("sample", str(v), rec["step"])


def _tensorboard(stage_dir: StageDir) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(str(stage_dir.tb))


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def write(self, s: str) -> None:
        log.info(s)

    def close(self) -> None: ...


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True, mininterval=1.0)


def peak_flops_for(device: torch.device, bf16: bool) -> float:
    """Dense peak FLOP/s of known GPUs (for MFU); 0 when unknown (CPU)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
    for key, flops in table.items():
        if key in name:
            return flops if bf16 else flops / 2  # tf32 ~ half of bf16 on these parts
    return 0.0
