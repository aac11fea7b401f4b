"""Export stage: the aligned model as a standard Hugging Face model directory, proven in a fresh process.

    python -m stages.export --config configs/tiny.yaml [export.dtype=bfloat16 export.dir=/some/where]

Writes runs/<run>/export/artifact/ (and a copy in ``export.dir`` when set); see ``pipeline.export``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.export import export_model
from pipeline.export_verify import verify_export
from pipeline.publish import check_export_dir, publish
from pipeline.runs import STAGES, StageDir, StageError
from pipeline.stage import StageContext, StageResult, run_stage


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
    return StageResult(metrics=metrics, extra=extra)


_REPORTED = ("ok", "python", "transformers", "model_class", "tokenizer_class", "model_max_length", "n_positions",
             "dtype", "eos_token_id", "pad_token_id", "max_abs_logit_diff", "pipeline_reply")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_stage("export", argv, _body)


if __name__ == "__main__":
    raise SystemExit(main())
