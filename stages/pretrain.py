"""Pretrain the from-scratch GPT on the tokenised corpus.

    accelerate launch --config_file configs/accelerate/cpu.yaml -m stages.pretrain --config configs/tiny.yaml
    make pretrain [CONFIG=configs/gpt2-124m.yaml LAUNCH=ddp|zero2|zero3] [ARGS="pretrain.lr=3e-4"]

Reads runs/<run>/tokenizer/artifact (tokenizer files + shards/), writes runs/<run>/pretrain/artifact
(a GPT2LMHeadModel in safetensors + tokenizer files), checkpoints every pretrain.ckpt_interval steps.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.data.shards import TokenShards
from pipeline.gpt2_weights import from_hf, save_hf
from pipeline.model import GPT
from pipeline.model_source import check_model_sources
from pipeline.precision import resolve_dtype
from pipeline.pretrain import PretrainResult, peak_flops_for, resolve_model_config, train
from pipeline.stage import StageContext, StageResult, run_stage
from pipeline.tokenizer import SPECIAL_TOKENS, load_tokenizer
from pipeline.training import is_zero3, make_accelerator

log = logging.getLogger("stages.pretrain")


def _accelerator(cfg: RunConfig):
    from accelerate.utils import set_seed

    dtype = resolve_dtype(cfg.pretrain.dtype, "pretrain")
    log.info("pretrain %s", dtype.describe())
    use_bf16 = dtype.bf16
    if cfg.pretrain.num_threads:
        torch.set_num_threads(cfg.pretrain.num_threads)
    acc = make_accelerator(
        gradient_accumulation_steps=cfg.pretrain.grad_accum, mixed_precision="bf16" if use_bf16 else "no"
    )
    set_seed(cfg.run.seed)  # same init weights on every process
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return acc, dtype


def _full_state_dict(acc: Any, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trained model's complete weights on the main process (None on the others); call on every process.

    ``train`` prepares ``model`` in place (DDP and DeepSpeed keep training this very module), so its weights
    are the trained ones, except under ZeRO-3, where each process holds a shard of every parameter: there the
    DeepSpeed engine that accelerate made of ``model`` gathers them, a collective every process must enter
    (accelerate's ``get_state_dict`` needs the engine, not the module it wraps).
    """
    if is_zero3(acc):
        engine = acc.deepspeed_engine_wrapped.engine
        state = acc.get_state_dict(engine)  # rank 0 gets the full dict, the others None
    elif acc.is_main_process:
        state = acc.get_state_dict(model)
    else:
        return None
    if state is None:
        return None
    prefix = "_orig_mod."  # a torch.compile wrapper (pretrain.compile) inside the engine
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _body(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    check_model_sources(cfg, "pretrain")  # a missing or broken pretrain.init_from, named, before any work
    tok_dir = ctx.upstream("tokenizer").artifact
    tokenizer = load_tokenizer(tok_dir)
    seq_len = cfg.pretrain.block_size or cfg.model.block_size
    model_cfg = resolve_model_config(cfg.model, len(tokenizer), seq_len)
    train_data = TokenShards(tok_dir / "shards", "train")
    val_data = TokenShards(tok_dir / "shards", "val")

    acc, dtype = _accelerator(cfg)
    model = GPT(model_cfg)
    if cfg.pretrain.init_from:
        from transformers import AutoModelForCausalLM

        model = from_hf(AutoModelForCausalLM.from_pretrained(cfg.pretrain.init_from), model_cfg)
    log.info("model: %.2fM parameters (%s)", model.num_params() / 1e6, model_cfg)

    prompt_ids = tokenizer.encode(cfg.pretrain.sample_prompt) or [tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[0])]
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def sample(m: torch.nn.Module) -> str:
        g = torch.Generator(device=acc.device).manual_seed(cfg.run.seed)
        idx = torch.tensor([prompt_ids], device=acc.device)
        n_new = max(0, min(cfg.pretrain.sample_tokens, model_cfg.block_size - idx.shape[1]))
        out = m.generate(idx, n_new, temperature=0.8, top_k=50, eos_token_id=eot, generator=g)
        return tokenizer.decode(out[0].tolist())

    result: PretrainResult = train(
        acc,
        model,
        train_data,
        val_data,
        cfg.pretrain,
        seq_len,
        cfg.run.seed,
        ctx.dir,
        resume=ctx.state == "partial",
        sample_fn=sample,
        peak_flops=peak_flops_for(acc.device, dtype.bf16),
        progress=os.environ.get("PIPELINE_PROGRESS", "1") != "0",
    )  # a stop signal raises pipeline.training.Interrupted (after a checkpoint): run_stage exits 128+signal

    state = _full_state_dict(acc, model)  # on every process: under ZeRO-3 the gather is a collective
    if acc.is_main_process:
        trained = GPT(model_cfg)  # float32 on the CPU whatever the launch (DeepSpeed may hold 16-bit weights)
        trained.load_state_dict(state)
        pad = tokenizer.pad_token_id
        save_hf(
            trained,
            ctx.dir.artifact,
            extra_config={"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": pad},
            generation_config={"bos_token_id": eot, "eos_token_id": [eot], "pad_token_id": pad},
        )
        tokenizer.model_max_length = model_cfg.block_size
        tokenizer.save_pretrained(ctx.dir.artifact)
    acc.wait_for_everyone()
    return StageResult(
        metrics=result.metrics,
        extra={
            "samples": result.samples[-3:],
            "model": {k: getattr(model_cfg, k) for k in model_cfg.__dataclass_fields__},
            "dtype": dtype.record(),
        },
        prior_wall_time_s=result.prior_wall_time_s,
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage("pretrain", argv, _body)


if __name__ == "__main__":
    raise SystemExit(main())
