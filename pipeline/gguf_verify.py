"""Proof that the GGUF files run in llama.cpp as the Hugging Face export runs in transformers.

``verify_gguf`` runs llama.cpp (llama-cpp-python) in a fresh interpreter that imports only ``llama_cpp`` (any
Python: pass the interop venv's) and compares what it reports with transformers in this process:

- tokenisation: llama.cpp's ids for every text of a test corpus (``pipeline.gguf_export.probe_corpus`` plus
  the caller's texts) equal our tokenizer's;
- greedy chat generation: each prompt goes through the chat template stored in the GGUF, rendered by
  llama-cpp-python's own chat formatter, and is tokenised by llama.cpp; the prompt ids and the greedy
  continuation (up to the end-of-turn token) of the f32 GGUF must equal transformers' token for token;
- quantisation: with checkable prompts (the generated tasks), the q8_0 (and f16) files' checker accuracy must be
  within ``max_accuracy_drop`` (2 points) of the f32 file's.

Issue 16's mismatch ("What is 2 + 3?": 3 in llama.cpp, 5 in transformers) is numerics, not the chat rendering nor
a BOS token: llama-cpp-python renders our template to the same ids as transformers, and llama.cpp adds no BOS for
the ``gpt-2`` pre-tokenizer (the GGUF also says ``add_bos_token = false``). Measured on the tiny run's SFT model,
40 prompts, largest |logit difference| from transformers: f32 GGUF with an f32 KV cache 1.4e-3 (llama.cpp's GELU
goes through an f16 table); with llama.cpp's default f16 KV cache 1.3e-2; an f16 GGUF (``convert_hf_to_gguf.py``'s
default output type) 7.6e-3, 1.4e-2 with the f16 cache. A small model's greedy choice between two answers is
often closer than that. So the identity check runs the f32 file with an f32 KV cache (``type_k``/``type_v``), and a
generation that parts where transformers' own top-2 margin is below :data:`TIE_TOLERANCE` counts as a near-tie
(reported, with the margin), not as a difference; quantised files are held to checker accuracy instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data.tasks import check_answer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["llama_cpp_available", "run_llama_cpp", "verify_gguf", "MAX_ACCURACY_DROP", "TIE_TOLERANCE"]

MAX_ACCURACY_DROP = 0.02
"""Largest checker-accuracy drop allowed from the f32 GGUF to a quantised one (2 points)."""

TIE_TOLERANCE = 5e-3
"""Greedy decoding cannot agree where the top two logits are closer than the two runtimes' numerical difference:
llama.cpp's f32 GELU goes through an f16 table, and its logits differ from transformers' by up to 1.4e-3 with an f32
KV cache (1.3e-2 with its default f16 cache), measured on the tiny run's SFT model. A generation that parts from
transformers' where transformers' own margin is below this is a near-tie, not a mismatch."""

_LLAMA_SCRIPT = r'''
"""Fresh-process llama.cpp run of GGUF files: imports only llama_cpp."""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

req = json.load(open(sys.argv[1]))
res = {"llama_cpp": llama_cpp.__version__, "files": {}}
F32 = 0  # GGML_TYPE_F32
for path in req["files"]:
    kv = {} if req["kv_cache"] == "default" else {"type_k": F32, "type_v": F32}
    llm = Llama(model_path=path, n_ctx=req["n_ctx"], n_batch=req["n_ctx"], n_threads=req["n_threads"],
                logits_all=True, verbose=False, seed=0, **kv)
    vocab = llm._model.vocab
    out = {"metadata": {k: v for k, v in llm.metadata.items() if not k.startswith("tokenizer.ggml.token")},
           "add_bos": llm._model.add_bos_token(), "tokens": [], "prompts": [], "generated": [], "margins": []}
    out["tokens"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in req["texts"]]
    bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
    eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
    for p in req["prompts"]:
        r = fmt(messages=[{"role": "user", "content": p}])
        ids = llm.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True)
        llm.reset()
        llm.eval(ids)
        gen, margins = [], []
        for _ in range(req["max_new_tokens"]):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            top = np.argsort(-logits)[:2]
            margins.append(float(logits[top[0]] - logits[top[1]]))
            tok = int(top[0])
            gen.append(tok)
            if llama_cpp.llama_token_is_eog(vocab, tok) or llm.n_tokens >= req["n_ctx"]:
                break
            llm.eval([tok])
        out["prompts"].append(ids)
        out["generated"].append(gen)
        out["margins"].append(margins)
    res["files"][path] = out
    del llm
json.dump(res, open(sys.argv[2], "w"))
'''


def llama_cpp_available(python: str = sys.executable) -> bool:
    """Whether ``python`` can import ``llama_cpp`` (checked in a child process: importing it loads a C library)."""
    if python == sys.executable:
        import importlib.util

        return importlib.util.find_spec("llama_cpp") is not None
    try:
        proc = subprocess.run(
            [os.path.abspath(python), "-c", "import llama_cpp"], capture_output=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def run_llama_cpp(
    files: Sequence[Path],
    texts: Sequence[str] = (),
    prompts: Sequence[str] = (),
    python: str = sys.executable,
    max_new_tokens: int = 32,
    n_ctx: int = 256,
    kv_cache: str = "f32",
    timeout_s: float = 1200,
) -> dict[str, Any]:
    """Run GGUF ``files`` in llama.cpp in a fresh ``python`` process.

    Args:
        files: GGUF files.
        texts: tokenised with ``special=True`` (special tokens in the text are parsed, as transformers does).
        prompts: user messages, each rendered with the file's chat template and generated from greedily.
        python: an interpreter that has llama-cpp-python.
        max_new_tokens: greedy generation stops there or at an end-of-generation token (which is kept).
        n_ctx: llama.cpp's context (at most the model's).
        kv_cache: ``f32`` or ``default`` (llama.cpp's f16 cache).
        timeout_s: limit for the child process.

    Returns:
        ``{"llama_cpp": version, "files": {path: {"tokens", "prompts", "generated", "margins", "metadata",
        "add_bos"}}}``: ``margins`` are llama.cpp's top-1 minus top-2 logits at each generated token.

    Raises:
        RuntimeError: the child failed (its stderr is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="gguf-verify-") as tmp:
        req = {
            "files": [str(Path(f).resolve()) for f in files],
            "texts": list(texts),
            "prompts": list(prompts),
            "max_new_tokens": max_new_tokens,
            "n_ctx": n_ctx,
            "n_threads": max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)),
            "kv_cache": kv_cache,
        }
        (Path(tmp) / "req.json").write_text(json.dumps(req))
        (Path(tmp) / "run.py").write_text(_LLAMA_SCRIPT)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        cmd = [os.path.abspath(python) if os.sep in python else python, "-I", str(Path(tmp) / "run.py")]
        cmd += [str(Path(tmp) / "req.json"), str(Path(tmp) / "res.json")]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp run with {python} failed:\n{proc.stderr[-3000:]}")
        return json.loads((Path(tmp) / "res.json").read_text())


def _greedy_transformers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (through the chat template) and greedy continuations, one prompt at a time (no padding)."""
    import torch

    end = tokenizer.convert_tokens_to_ids("<|end|>")
    eos = [i for i in (end, tokenizer.eos_token_id) if isinstance(i, int)]
    n_ctx = int(model.config.n_positions)
    ids_all, gens = [], []
    for p in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=min(max_new_tokens, n_ctx - len(ids)),
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                top_k=None,
                top_p=None,
                temperature=None,
            )
        ids_all.append(ids)
        gens.append(out[0, len(ids) :].tolist())
    return ids_all, gens


def verify_gguf(
    files: dict[str, Path],
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    records: Sequence[dict[str, Any]],
    python: str = sys.executable,
    max_new_tokens: int = 32,
    min_identical: int = 50,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    tie_tolerance: float = TIE_TOLERANCE,
) -> dict[str, Any]:
    """Prove GGUF ``files`` (output type -> path) in llama.cpp against ``reference`` in transformers.

    Args:
        files: must hold ``f32`` for the token-identity check; other types are checked for accuracy.
        reference: the exported model (computed in float32).
        tokenizer: the exported tokenizer.
        texts: the tokenisation corpus.
        records: held-out prompts (``prompt``; ``task``/``answer`` when a checker exists).
        python: an interpreter with llama-cpp-python.
        max_new_tokens: generation length.
        min_identical: at least this many prompts must be token-identical (f32).
        max_accuracy_drop: largest checker-accuracy drop from f32 to another type.
        tie_tolerance: a prompt whose generations part where transformers' top-2 logits are closer than this is
            a near-tie (reported under ``ties``), not a difference.

    Returns:
        ``{"ok", "problems", "llama_cpp", "n_texts", "n_tokens", "tokenisation_equal", "n_prompts",
        "n_identical", "ties", "differences", "accuracy": {type: acc}, ...}``.
    """
    prompts = [r["prompt"] for r in records]
    n_ctx = int(reference.config.n_positions)
    order = sorted(files, key=lambda t: t != "f32")
    res_ll = run_llama_cpp([files[t] for t in order], texts, prompts, python, max_new_tokens, n_ctx)
    by_type = {t: res_ll["files"][str(Path(files[t]).resolve())] for t in order}
    problems: list[str] = []
    ours_tok = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    first = by_type[order[0]]
    bad_texts = [i for i, (a, b) in enumerate(zip(ours_tok, first["tokens"])) if a != b]
    if bad_texts:
        i = bad_texts[0]
        problems.append(
            f"tokenisation differs on {len(bad_texts)} of {len(texts)} texts, first {texts[i][:60]!r}: "
            f"ours {ours_tok[i][:12]} vs llama.cpp {first['tokens'][i][:12]}"
        )
    report: dict[str, Any] = {
        "llama_cpp": res_ll["llama_cpp"],
        "python": python,
        "pre_tokenizer": first["metadata"].get("tokenizer.ggml.pre"),
        "add_bos": first["add_bos"],
        "n_texts": len(texts),
        "n_tokens": sum(len(t) for t in ours_tok),
        "tokenisation_equal": not bad_texts,
        "n_prompts": len(prompts),
    }
    ref_ids, ref_gen = _greedy_transformers(reference.float(), tokenizer, prompts, max_new_tokens)
    if "f32" in by_type:
        f32 = by_type["f32"]
        ties, differ = [], []
        for i, (a, b, c, d) in enumerate(zip(ref_ids, f32["prompts"], ref_gen, f32["generated"])):
            if a == b and c == d:
                continue
            margin = _tie_margin(reference, a, c, d) if a == b else None
            entry = {"prompt": prompts[i], "transformers": c, "llama_cpp": d, "transformers_margin": margin}
            (ties if margin is not None and margin <= tie_tolerance else differ).append(entry)
        report.update(n_identical=len(prompts) - len(ties) - len(differ), ties=ties, differences=differ[:5])
        if differ:
            e = differ[0]
            problems.append(
                f"f32 greedy generations differ from transformers' on {len(differ)} of {len(prompts)} prompts "
                f"(not near-ties), first {e['prompt']!r}: {e['transformers'][:10]} vs llama.cpp {e['llama_cpp'][:10]}"
            )
        if report["n_identical"] < min_identical:
            problems.append(f"only {report['n_identical']} prompts token-identical (need >= {min_identical})")
    else:
        report["identity"] = (
            "not checked: export.gguf_types has no f32 (greedy tokens are compared on f32 only; quantised types are "
            "held to transformers' accuracy instead)"
        )
    checkable = [r for r in records if r.get("task") and r.get("answer") is not None]
    if len(checkable) == len(records) and records:
        acc = {"transformers": _accuracy(records, ref_gen, tokenizer, check_answer)}
        for t, out in by_type.items():
            acc[t] = _accuracy(records, out["generated"], tokenizer, check_answer)
        report["accuracy"] = acc
        base = "f32" if "f32" in acc else "transformers"  # without an f32 file, against the model itself
        for t in by_type:
            if t != base and acc[base] - acc[t] > max_accuracy_drop:
                problems.append(
                    f"{t} checker accuracy {acc[t]:.3f} is more than {max_accuracy_drop:.2f} below {base}'s "
                    f"{acc[base]:.3f}"
                )
    report.update(ok=not problems, problems=problems)
    return report


def _tie_margin(model: PreTrainedModel, prompt: list[int], ours: list[int], theirs: list[int]) -> float | None:
    """Where the generations first part: transformers' logit of its token minus its logit of llama.cpp's token
    (both greedy from the same prefix); None when one generation is a prefix of the other."""
    import torch

    k = next((j for j, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
    if k is None:
        return None
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours[:k]])).logits[0, -1]
    return round(float(logits[ours[k]] - logits[theirs[k]]), 6)


def _accuracy(records: Sequence[dict[str, Any]], gens: Sequence[list[int]], tokenizer: Any, check: Any) -> float:
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gens]
    return round(sum(check(r, t) for r, t in zip(records, texts)) / max(1, len(records)), 4)
