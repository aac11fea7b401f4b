"""Proof that an exported model works without this project.

``verify_export`` proves the result in a fresh interpreter that imports only torch and transformers (any
Python: pass the 4.x venv's): it loads with ``AutoModelForCausalLM``/``AutoTokenizer``, applies the chat
template, runs ``pipeline('text-generation')``, and returns the logits, which are compared here with the
source model's (``max_abs_logit_diff``; must be <= 1e-5). Logits are computed in float32 from the stored weights
on both sides, so a bf16 export is checked for its weights and architecture, not for bf16 kernels (which differ
between library versions by ~1e-3).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["VERIFY_PROMPTS", "TOLERANCE", "verify_export"]

VERIFY_PROMPTS = ("What is 12 + 7?", "Reverse the word 'apple'.", "Hello! Who are you?")
"""Conversations used to compare the exported model's logits with the source's."""
TOLERANCE = 1e-5
"""Largest |logit difference| allowed between the export and its source."""


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
            os.path.abspath(python) if os.sep in python else python,  # the child runs in tmp: a relative path breaks
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
