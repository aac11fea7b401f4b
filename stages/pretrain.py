"""Pretrain the from-scratch GPT on the tokenised corpus.

    accelerate launch --config_file configs/accelerate/cpu.yaml -m stages.pretrain --config configs/tiny.yaml
    make pretrain [CONFIG=configs/gpt2-124m.yaml LAUNCH=ddp|zero2|zero3] [ARGS="pretrain.lr=3e-4"]

Reads runs/<run>/tokenizer/artifact (tokenizer files + shards/), writes runs/<run>/pretrain/artifact
(a GPT2LMHeadModel in safetensors + tokenizer files), checkpoints every pretrain.ckpt_interval steps.
"""

from __future__ import annotations

import logging
import os

import torch

from pipeline.config import RunConfig
from pipeline.data.shards import TokenShards
from pipeline.gpt2_weights import from_hf, save_hf
from pipeline.model import GPT
from pipeline.pretrain import PretrainResult, peak_flops_for, resolve_model_config, train
from pipeline.stage import StageContext, StageResult, run_stage
from pipeline.tokenizer import SPECIAL_TOKENS, load_tokenizer
from pipeline.training import make_accelerator

log = logging.getLogger("stages.pretrain")


def _accelerator(cfg: RunConfig):
    from accelerate.utils import set_seed

    use_bf16 = cfg.pretrain.dtype == "bfloat16" or (
        cfg.pretrain.dtype == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    if cfg.pretrain.num_threads:
        torch.set_num_threads(cfg.pretrain.num_threads)
    acc = make_accelerator(
        gradient_accumulation_steps=cfg.pretrain.grad_accum, mixed_precision="bf16" if use_bf16 else "no"
    )
    set_seed(cfg.run.seed)  # same init weights on every process
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return acc, use_bf16


def _body(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    tok_dir = ctx.upstream("tokenizer").artifact
    tokenizer = load_tokenizer(tok_dir)
    seq_len = cfg.pretrain.block_size or cfg.model.block_size
    model_cfg = resolve_model_config(cfg.model, len(tokenizer), seq_len)
    train_data = TokenShards(tok_dir / "shards", "train")
    val_data = TokenShards(tok_dir / "shards", "val")

    acc, use_bf16 = _accelerator(cfg)
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
        peak_flops=peak_flops_for(acc.device, use_bf16),
        progress=os.environ.get("PIPELINE_PROGRESS", "1") != "0",
    )  # a stop signal raises pipeline.training.Interrupted (after a checkpoint): run_stage exits 128+signal

    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        state = acc.get_state_dict(model)  # gathers ZeRO-3 shards
        unwrapped.load_state_dict(state)
        pad = tokenizer.pad_token_id
        save_hf(
            unwrapped,
            ctx.dir.artifact,
            extra_config={"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": pad},
            generation_config={"bos_token_id": eot, "eos_token_id": [eot], "pad_token_id": pad},
        )
        tokenizer.model_max_length = model_cfg.block_size
        tokenizer.save_pretrained(ctx.dir.artifact)
    else:
        acc.get_state_dict(model)  # every process takes part in the gather
    acc.wait_for_everyone()
    return StageResult(
        metrics=result.metrics,
        extra={
            "samples": result.samples[-3:],
            "model": {k: getattr(model_cfg, k) for k in model_cfg.__dataclass_fields__},
        },
        prior_wall_time_s=result.prior_wall_time_s,
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage("pretrain", argv, _body)


if __name__ == "__main__":
    raise SystemExit(main())
