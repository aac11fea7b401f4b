"""Fake stages for orchestration tests: the real harness (run_stage) around a body that takes milliseconds.

Each fake "trains" ``FAKE_STEPS`` (default 3) steps, writing a checkpoint after each, so partial/resume
paths are real. Environment knobs (read by the stage process):

- ``FAKE_DIE=<stage>:<step>``: the process exits abruptly (os._exit(9)) right after checkpoint <step>;
- ``FAKE_FAIL=<stage>``: the stage exits with code 7 before doing anything;
- ``FAKE_LOG=<file>``: each invocation appends "<stage> <start step>" to this file;
- ``FAKE_PAYLOAD=<stage>:<bytes>``: each checkpoint of <stage> also holds a file of that size.
"""

from __future__ import annotations

import json
import os

from pipeline.stage import StageContext, StageResult, run_stage

_METRICS = {
    "tokenizer": {"vocab_size": 300},
    "pretrain": {"train_loss": 2.5, "val_loss": 2.6, "tokens": 1000, "tokens_per_s": 10.0},
    "sft": {"train_loss": 1.5, "val_loss": 1.6, "checker_accuracy": 0.5},
    "reward": {"pair_accuracy": 0.75},
    "ppo": {"reward_mean": 0.3, "sft_reward_mean": 0.1, "kl": 0.02, "checker_accuracy": 0.6},
    "export": {"max_abs_logit_diff": 0.0, "n_params": 123},
}


def _body(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    if os.environ.get("FAKE_FAIL") == stage:
        os._exit(7)
    latest = ctx.dir.latest_checkpoint()
    start = int(json.loads((latest / "trainer_state.json").read_text())["step"]) if latest else 0
    if os.environ.get("FAKE_LOG"):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(f"{stage} {start}\n")
    steps = int(os.environ.get("FAKE_STEPS", "3"))
    die = os.environ.get("FAKE_DIE", "")
    payload_stage, _, payload = os.environ.get("FAKE_PAYLOAD", ":0").partition(":")
    for step in range(start + 1, steps + 1):
        with ctx.dir.writing_checkpoint(step, keep=2) as tmp:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "max_steps": steps}))
            if payload_stage == stage:
                (tmp / "optimizer.bin").write_bytes(b"\0" * int(payload))
        ctx.dir.append_metrics({"step": step, "train/loss": 3.0 / step})
        if die == f"{stage}:{step}":
            os._exit(9)
    ctx.dir.artifact.mkdir(parents=True, exist_ok=True)
    (ctx.dir.artifact / "weights.txt").write_text(f"{stage} {ctx.fingerprint}\n")
    return StageResult(metrics=dict(_METRICS[stage]))


def fake_main(stage: str) -> int:
    return run_stage(stage, None, _body)
