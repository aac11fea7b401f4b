"""Export stage: the aligned model as a standard Hugging Face model directory, proven in a fresh process, and
with ``export.formats=[hf,gguf]`` as GGUF files for llama.cpp, proven in llama.cpp when it is importable.

    python -m stages.export --config configs/tiny.yaml [export.dtype=bfloat16 export.dir=/some/where]
    python -m stages.export export.formats=[hf,gguf] export.gguf_verify_with=.venv-interop/bin/python

Writes runs/<run>/export/artifact/, runs/<run>/export/<run>-<type>.gguf (and copies beside ``export.dir`` when
set); see ``pipeline.export``, ``pipeline.gguf_export`` and ``pipeline.gguf_verify``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.data.tasks import generate_tasks
from pipeline.export import export_model
from pipeline.export_verify import verify_export
from pipeline.gguf_export import probe_corpus, write_ggufs
from pipeline.gguf_verify import llama_cpp_available, verify_gguf
from pipeline.publish import check_export_dir, missing_gguf, publish
from pipeline.runs import STAGES, StageDir, StageError, atomic_write_json
from pipeline.stage import StageContext, StageResult, run_stage

log = logging.getLogger(__name__)


def _body(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    if cfg.export.dir:
        check_export_dir(cfg.export.dir, cfg.run_dir)  # before any work: a bad target is refused at once
    manifests = {s: m for s in STAGES[:-1] if (m := StageDir.of(cfg.run_dir, s).manifest()) is not None}
    info, model, tokenizer = export_model(cfg, ctx.dir.artifact, manifests)
    checks = [verify_export(info.dir, model, tokenizer)]
    checks += [verify_export(info.dir, model, tokenizer, python=py) for py in cfg.export.verify_with]
    failed = [c for c in checks if not c["ok"]]
    if failed:
        raise StageError(
            f"export: {info.dir} failed verification with {failed[0]['python']}: " + "; ".join(failed[0]["problems"])
        )
    gguf = _gguf(cfg, ctx.dir.root, info.dir, model, tokenizer) if "gguf" in cfg.export.formats else None
    if cfg.export.dir:
        publish(info.dir, Path(cfg.export.dir), cfg.run_dir)
    metrics = {
        "max_abs_logit_diff": max(c["max_abs_logit_diff"] for c in checks),
        "n_params": info.n_params,
        "size_bytes": sum(info.files.values()),
    }
    extra = {
        "export": {"dir": str(info.dir), "copy": cfg.export.dir or None, "files": info.files, "dtype": info.dtype},
        "verification": [{k: c.get(k) for k in _REPORTED} for c in checks],
    }
    if gguf is not None:
        extra["gguf"] = gguf
    return StageResult(metrics=metrics, extra=extra)


def _gguf(cfg: RunConfig, out_dir: Path, hf_dir: Path, model: Any, tokenizer: Any) -> dict[str, Any]:
    """GGUF files beside the HF directory, proven in llama.cpp when ``llama_cpp`` can be imported (else the
    manifest says the checks were skipped, and why); files that fail the proof are removed."""
    written = write_ggufs(hf_dir, out_dir, cfg.run.name, cfg.export.gguf_types, cfg.export.license)
    out: dict[str, Any] = {
        "files": {i.path.name: i.size_bytes for i in written.values()},
        "pre_tokenizer": next(iter(written.values())).pre_tokenizer,
    }
    python = cfg.export.gguf_verify_with or sys.executable
    if not llama_cpp_available(python):
        out["verification"] = {
            "skipped": f"{python} cannot import llama_cpp; `make test-interop` builds .venv-interop, with which "
            "`make export FORMAT=gguf` proves the GGUF files in llama.cpp"
        }
        return out
    records = generate_tasks(cfg.data.tasks).ppo_eval[: cfg.export.gguf_n_prompts]
    files = {t: i.path for t, i in written.items()}
    check = verify_gguf(files, model, tokenizer, probe_corpus(), records, python)
    out["verification"] = check
    if not check["ok"]:
        for path in files.values():
            path.unlink(missing_ok=True)
        raise StageError("export: the GGUF files failed verification in llama.cpp: " + "; ".join(check["problems"]))
    return out


_REPORTED = ("ok", "python", "transformers", "model_class", "tokenizer_class", "model_max_length", "n_positions",
             "dtype", "eos_token_id", "pad_token_id", "max_abs_logit_diff", "pipeline_reply")  # fmt: skip


def _add_gguf(ctx: StageContext) -> None:
    """A done export that lacks GGUF files the config asks for (``make export FORMAT=gguf`` after ``make all``):
    write them from its HF directory, prove them like :func:`_body` does, and record them in its manifest. The HF
    directory and the stage's fingerprint are unchanged."""
    cfg = ctx.cfg
    lacking = missing_gguf(cfg)  # empty without gguf in export.formats
    if not lacking:
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx.dir.lock()  # held until this process exits; a second process is refused, naming this one
    log.info("export: done; adding the GGUF files it lacks (%s)", ", ".join(lacking))
    model = AutoModelForCausalLM.from_pretrained(ctx.dir.artifact, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ctx.dir.artifact)
    gguf = _gguf(cfg, ctx.dir.root, ctx.dir.artifact, model, tokenizer)
    manifest = ctx.dir.manifest() or {}
    atomic_write_json(ctx.dir.manifest_path, {**manifest, "gguf": gguf})


def main(argv: list[str] | None = None) -> int:
    return run_stage("export", argv, _body, on_done=_add_gguf)


if __name__ == "__main__":
    raise SystemExit(main())
