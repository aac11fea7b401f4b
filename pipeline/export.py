"""Hugging Face export of a stage's model: weights, config, tokenizer, generation settings, model card, proof.

``export_model`` turns the source stage's artifact (``export.source``, default ``ppo``) into a standard model
directory that plain ``transformers`` loads, 5.x and the last 4.x alike:

- weights: safetensors, cast to ``export.dtype``, sharded above ``export.max_shard_size`` (with an index);
- ``config.json`` (GPT-2 architecture, every key GPT-2's Hub configs have, ``n_ctx`` included, and
  ``use_cache: true``) and ``generation_config.json``: ``eos_token_id`` = [``<|end|>``,
  ``<|endoftext|>``] so chat generation stops at the end of the turn, ``pad_token_id``, and the sampling
  settings the source stage used (PPO's rollout temperature/top-k/top-p and response length; greedy for SFT);
- tokenizer files written so both majors read them: ``tokenizer_class: PreTrainedTokenizerFast`` (5.x writes
  ``TokenizersBackend``, unknown to 4.x) and ``additional_special_tokens`` (5.x writes a list under
  ``extra_special_tokens``, which 4.x reads as a dict), ``model_max_length`` = the model's ``n_positions``,
  and the chat template in ``chat_template.jinja``;
- ``README.md``: a model card whose YAML metadata gives license, datasets, the lineage stage by stage
  (fingerprints, metrics) and a model-index. It holds no wall times, so an export is a pure function of the
  run's config and weights (byte-identical across interrupted and uninterrupted runs).

ZeRO-3: the training stages save consolidated weights (``accelerator.get_state_dict`` gathers the shards), so the
source artifact is normally a plain HF directory. If it holds a DeepSpeed ZeRO checkpoint instead (a ``latest``
file and ``global_step*/`` shards, no weight file), it is consolidated to fp32 with DeepSpeed's
``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` before the dtype cast. That reader unpickles the shards
(``torch.load(weights_only=False)``), so it is refused unless ``run.allow_pickle_checkpoints=true``, as a resume
under DeepSpeed is (``pipeline.checkpoint``).

Its card comes from ``pipeline.model_card``, its proof from ``pipeline.export_verify`` (a fresh process that
loads it without this project and compares logits).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import ALLOW_PICKLE_KEY
from .config import RunConfig
from .filecheck import check_file
from .model_card import model_card
from .runs import StageDir, StageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["GPT2_HUB_CONFIG_KEYS", "ExportInfo", "load_source_model", "export_model"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass
class ExportInfo:
    """What ``export_model`` wrote."""

    dir: Path
    n_params: int
    files: dict[str, int]
    """File name -> size in bytes."""
    dtype: str
    model_max_length: int
    eos_token_id: list[int]


# ----------------------------------------------------------------------------- loading the source


def load_source_model(src: Path, allow_pickle: bool = False) -> PreTrainedModel:
    """Load a causal LM artifact in float32, consolidating a DeepSpeed ZeRO checkpoint when that is what it holds.

    Args:
        src: the model folder (a stage's artifact).
        allow_pickle: ``run.allow_pickle_checkpoints``: whether a raw ZeRO checkpoint may be read (DeepSpeed's
            ``zero_to_fp32`` unpickles its files); weight files are read safely either way.

    Raises:
        StageError: missing folder or config, a truncated/corrupt weight file (named), unloadable weights, or a
            raw ZeRO checkpoint without ``allow_pickle`` (before anything of it is read).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(src)
    if not (src / "config.json").is_file():
        raise StageError(f"export: {src} holds no model (no config.json); is the source stage done?")
    weights = sorted(src.glob("*.safetensors")) + sorted(src.glob("pytorch_model*.bin"))
    for w in weights:
        _check_weight_file(w)
    if weights:
        try:
            return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        except (OSError, ValueError, RuntimeError) as e:
            raise StageError(f"export: cannot load the model in {src}: {e}") from None
    zero_dir = _zero_checkpoint_dir(src)
    if zero_dir is None:
        raise StageError(f"export: {src} has a config.json but no weights (*.safetensors) nor a DeepSpeed checkpoint")
    if not allow_pickle:
        raise StageError(
            f"export: {src} holds no weight file, only a DeepSpeed ZeRO checkpoint in {zero_dir}, whose reader "
            f"(zero_to_fp32) unpickles its files (torch.load with weights_only=False: a tampered checkpoint can run "
            f"code). Nothing was loaded. If you trust that folder, run the same command again with "
            f'{ALLOW_PICKLE_KEY}=true (make ... ARGS="{ALLOW_PICKLE_KEY}=true").'
        )
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    log.info("consolidating the DeepSpeed ZeRO checkpoint in %s to fp32", zero_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(str(zero_dir))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise StageError(
            f"export: ZeRO checkpoint in {zero_dir} does not match {src}/config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    return model.eval()


def _tied_keys(model: PreTrainedModel) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if isinstance(tied, (list, tuple, set)) else tied.keys())


def _zero_checkpoint_dir(src: Path) -> Path | None:
    for d in (src, *sorted(p for p in src.iterdir() if p.is_dir())):
        if (d / "latest").is_file():
            return d
    return None


def _check_weight_file(path: Path) -> None:
    problems = check_file(path)
    if problems:
        raise StageError(
            f"export: the source weights are corrupt: {problems[0]}. Make the source stage again (FORCE=1)."
        )


def _load_tokenizer(src: Path, cfg: RunConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    for d in (src, StageDir.of(cfg.run_dir, "tokenizer").artifact):
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(d)
            if tok.chat_template:
                return tok
    raise StageError(f"export: no tokenizer with a chat template in {src} or the run's tokenizer stage")


# ----------------------------------------------------------------------------- writing


def export_model(
    cfg: RunConfig, out_dir: Path, manifests: dict[str, dict[str, Any]]
) -> tuple[ExportInfo, PreTrainedModel, PreTrainedTokenizerBase]:
    """Write the HF model directory for ``cfg.export.source`` into ``out_dir`` (atomically: via ``<out>.tmp``).

    Args:
        cfg: the run config (export section, and the source stage's generation settings).
        out_dir: destination; replaced when it exists.
        manifests: stage -> manifest of every stage in the source's lineage (for the model card).

    Returns:
        What was written, and the source model (cast to the export dtype) and tokenizer, for ``verify_export``.

    Raises:
        StageError: bad source (see ``load_source_model``), or a write failure such as a full disk; a failed
            write leaves ``out_dir`` as it was.
    """
    import torch

    src = StageDir.of(cfg.run_dir, cfg.export.source).artifact
    model = load_source_model(src, allow_pickle=cfg.run.allow_pickle_checkpoints)
    tokenizer = _load_tokenizer(src, cfg)
    model = model.to(getattr(torch, _DTYPES[cfg.export.dtype]))
    n_positions = int(getattr(model.config, "n_positions", 0) or model.config.max_position_embeddings)
    gen = _generation_config(cfg, tokenizer)
    model.generation_config = gen
    _complete_config(model.config, n_positions)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, max_shard_size=cfg.export.max_shard_size)
        tokenizer.model_max_length = n_positions
        tokenizer.save_pretrained(tmp)
        _make_tokenizer_portable(tmp, tokenizer, n_positions)
        gen.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(cfg, manifests, model.num_parameters(), n_positions, gen.to_dict()))
        _fsync_dir(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except Exception as e:  # OSError, or safetensors' own error type for a failed write (e.g. a full disk)
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out_dir.parent).free if out_dir.parent.exists() else 0
        raise StageError(
            f"export: writing {out_dir} failed: {type(e).__name__}: {e} ({free / 2**20:.1f} MiB free there). "
            f"Nothing earlier was changed; fix the cause (e.g. free disk space) and run again."
        ) from None
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    return ExportInfo(out_dir, model.num_parameters(), files, cfg.export.dtype, n_positions, eos), model, tokenizer


GPT2_HUB_CONFIG_KEYS = (
    "activation_function", "architectures", "attn_pdrop", "bos_token_id", "embd_pdrop", "eos_token_id",
    "initializer_range", "layer_norm_epsilon", "model_type", "n_ctx", "n_embd", "n_head", "n_layer", "n_positions",
    "resid_pdrop", "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "vocab_size",
)  # fmt: skip
"""The keys of the GPT-2 configs on the Hub (openai-community/gpt2 and its sizes, distilgpt2; less their
``task_specific_params``, which would change what ``pipeline()`` generates). Tools written against those files read
them: llama.cpp's ``convert_hf_to_gguf.py`` reads ``n_ctx``, which transformers itself no longer writes."""


def _complete_config(config: Any, n_positions: int) -> None:
    """Give ``config.json`` every key of GPT-2's Hub configs, and ``use_cache: true`` (training stages turn the KV
    cache off; a user's ``generate`` should not be quadratically slow by default)."""
    config.n_ctx = n_positions
    config.use_cache = True
    missing = [k for k in GPT2_HUB_CONFIG_KEYS if k not in config.to_dict()]
    if missing:
        raise StageError(f"export: the model config lacks GPT-2's keys {missing}; is it a GPT-2 model?")


def _fsync_dir(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            p.chmod(0o644)  # safetensors writes 0600; an export is meant to be shared
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _generation_config(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    """Stop at ``<|end|>`` or ``<|endoftext|>``; sample as the source stage did (see module docstring)."""
    from transformers import GenerationConfig

    end = tokenizer.convert_tokens_to_ids("<|end|>")
    eos = [i for i in (end, tokenizer.eos_token_id) if isinstance(i, int) and i != tokenizer.unk_token_id]
    ids = {"eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.eos_token_id}
    src = cfg.export.source
    if src == "ppo":
        p = cfg.ppo
        return GenerationConfig(
            do_sample=True,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            max_new_tokens=p.max_new_tokens,
            **ids,
        )
    if src == "sft":
        return GenerationConfig(do_sample=False, max_new_tokens=cfg.sft.max_new_tokens, **ids)
    return GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=cfg.pretrain.sample_tokens, **ids
    )


def _make_tokenizer_portable(d: Path, tokenizer: PreTrainedTokenizerBase, n_positions: int) -> None:
    """Rewrite tokenizer_config.json in the subset of keys transformers 4.x and 5.x both read the same way."""
    path = d / "tokenizer_config.json"
    conf = json.loads(path.read_text())
    for junk in ("backend", "is_local", "local_files_only", "name_or_path", "_commit_hash"):
        conf.pop(junk, None)  # 5.x writes its load arguments and backend name; 4.x has no use for them
    extra = conf.pop("extra_special_tokens", None)
    named = {tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token, tokenizer.unk_token}
    if isinstance(extra, dict):  # named extras; keep them as plain additional tokens
        extra = list(extra.values())
    specials = [t for t in (extra or conf.get("additional_special_tokens") or []) if t not in named]
    specials += [t for t in tokenizer.all_special_tokens if t not in named and t not in specials]
    conf.update(
        tokenizer_class="PreTrainedTokenizerFast",
        additional_special_tokens=specials,
        model_max_length=n_positions,
        clean_up_tokenization_spaces=False,
    )
    if not (d / "chat_template.jinja").is_file():
        (d / "chat_template.jinja").write_text(tokenizer.chat_template)
    conf.pop("chat_template", None)  # one source of truth: chat_template.jinja (read by 4.43+ and 5.x)
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
