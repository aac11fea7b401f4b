"""The plumbing every trainer shares (pipeline/training.py): stop signal, interruption, launch kind, resume point,
metrics callback, checkpoint marker. Unit tests, milliseconds each."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl

from pipeline.runs import StageDir, StageError
from pipeline.stage import StageResult, run_stage
from pipeline.training import (
    CheckpointMarker,
    Interrupted,
    MetricsCallback,
    StopSignal,
    clean_hf_artifact,
    context_length,
    launch_kind,
    resume_point,
    trainer_device_args,
)


def test_stop_signal_catches_sigterm_and_restores_handlers():
    def previous(signum, frame):  # pragma: no cover - must not be called
        raise AssertionError("the previous handler ran")

    old = signal.signal(signal.SIGTERM, previous)
    sigint_before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or some CI runners, else Python's default
    try:
        with StopSignal() as stop:
            assert stop.signum == 0 and stop.stopped_by is None
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and stop.stopped_by == "SIGTERM"
            assert stop.any_process(SimpleNamespace(num_processes=1)) == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        signal.signal(signal.SIGTERM, old)


def test_stop_signal_restores_handlers_when_the_block_raises():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), StopSignal():
        assert signal.getsignal(signal.SIGTERM) is not before
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_signal_as_callback_asks_for_save_and_stop():
    stop, control = StopSignal(), TrainerControl()
    stop.on_step_end(None, None, control)
    assert not control.should_save and not control.should_training_stop
    with stop:
        os.kill(os.getpid(), signal.SIGINT)
    stop.on_step_end(None, None, control)
    assert control.should_save and control.should_training_stop and stop.stopped_by == "SIGINT"


def test_interrupted_exit_code_and_message(tmp_path):
    e = Interrupted("sft", 40, signal.SIGTERM, tmp_path / "checkpoints")
    assert e.exit_code == 128 + 15 and e.step == 40 and e.stage == "sft"
    assert str(e) == (
        f"sft stopped by SIGTERM at step 40; a checkpoint was saved in {tmp_path / 'checkpoints'}. "
        "Run the same command again to resume."
    )


def test_run_stage_turns_interrupted_into_its_exit_code(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # run_stage sets it for this process

    def body(ctx):
        raise Interrupted(ctx.stage, 3, signal.SIGTERM, ctx.dir.checkpoints)

    assert run_stage("tokenizer", [f"run.root={tmp_path}"], body) == 143
    err = capsys.readouterr().err
    assert "interrupted: tokenizer stopped by SIGTERM at step 3; a checkpoint was saved in" in err
    assert not (tmp_path / "tiny/tokenizer/manifest.json").exists()


def test_launch_kind_and_trainer_device_args(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key in ("ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    assert launch_kind() == "cpu-single" and trainer_device_args() == {"use_cpu": True}
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_kind() == "cpu-ddp" and trainer_device_args() == {"use_cpu": True}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert launch_kind() == "cpu-deepspeed" and trainer_device_args() == {"use_cpu": False}
    assert os.environ["ACCELERATE_USE_CPU"] == "false"  # "CPU" would silently drop DeepSpeed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launch_kind() == "gpu" and trainer_device_args() == {"use_cpu": False}


def _args_state(tmp_path: Path, step: int, main: bool = True) -> tuple[SimpleNamespace, SimpleNamespace]:
    return SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=step, is_world_process_zero=main)


_KEYS = {"loss": "train/loss", "eval_loss": "val/loss", "learning_rate": "train/lr", "epoch": "train/epoch"}


def test_metrics_callback_renames_keys_and_skips_epoch_only_logs(tmp_path):
    lines: list[dict] = []
    cb = MetricsCallback(lines.append, _KEYS, "sft")
    args, state = _args_state(tmp_path, 4)
    cb.on_log(args, state, None, logs={"loss": 1.5, "learning_rate": 1e-4, "epoch": 0.5, "grad_norm": 2.0})
    cb.on_log(args, state, None, logs={"epoch": 1.0, "train_runtime": 3.0})  # the Trainer's final summary
    cb.on_log(args, _args_state(tmp_path, 4, main=False)[1], None, logs={"loss": 1.0})  # other processes
    assert lines == [{"step": 4, "train/loss": 1.5, "train/lr": 1e-4, "train/epoch": 0.5}]


@pytest.mark.parametrize("key", ["loss", "eval_loss"])
def test_metrics_callback_stops_on_non_finite_loss(tmp_path, key):
    lines: list[dict] = []
    cb = MetricsCallback(lines.append, _KEYS, "reward")
    with pytest.raises(StageError, match=rf"reward: {key} is nan at step 7; stopping.*{tmp_path}"):
        cb.on_log(*_args_state(tmp_path, 7), None, logs={key: math.nan})
    assert lines == []


def _checkpoint(root: Path, name: str, marker: bool = True, trainer_state: bool = True) -> Path:
    p = root / name
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(b"x")
    if marker:
        (p / "COMPLETE").write_text("1\n")
    if trainer_state:
        (p / "trainer_state.json").write_text(json.dumps({"max_steps": 12}))
    return p


def test_resume_point_picks_the_newest_complete_checkpoint_and_truncates_metrics(tmp_path):
    sd = StageDir(tmp_path / "sft")
    _checkpoint(sd.checkpoints, "checkpoint-2")
    newest = _checkpoint(sd.checkpoints, "checkpoint-5")
    cut_off = _checkpoint(sd.checkpoints, "checkpoint-7", marker=False)  # killed while the Trainer wrote it
    no_state = _checkpoint(sd.checkpoints, "checkpoint-9", trainer_state=False)
    for step in range(1, 10):
        sd.append_metrics({"step": step, "train/loss": 1.0 / step})
    assert resume_point(sd, "missing") is None and cut_off.exists()
    assert resume_point(sd, "partial") == newest
    assert not cut_off.exists() and not no_state.exists()
    assert [r["step"] for r in sd.read_metrics()] == [1, 2, 3, 4, 5]
    assert sd.progress() == (5, 12)


def test_resume_point_of_a_partial_stage_without_checkpoint(tmp_path):
    sd = StageDir(tmp_path / "reward")
    sd.append_metrics({"step": 1, "train/loss": 1.0})
    _checkpoint(sd.checkpoints, "checkpoint-3", marker=False)
    assert resume_point(sd, "partial") is None
    assert sd.read_metrics() == [] and sd.find_checkpoints() == []


def test_checkpoint_marker_marks_the_trainer_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path, "checkpoint-3", marker=False)
    CheckpointMarker().on_save(*_args_state(tmp_path, 3), None)
    assert (ckpt / "COMPLETE").is_file()
    other = _checkpoint(tmp_path / "x", "checkpoint-4", marker=False)
    CheckpointMarker().on_save(*_args_state(tmp_path / "x", 4, main=False), None)
    assert not (other / "COMPLETE").exists()  # only the main process marks


def test_clean_hf_artifact_and_context_length(tmp_path):
    for name in ("training_args.bin", "chat_template.jinja", "model.safetensors"):
        (tmp_path / name).write_text("x")
    clean_hf_artifact(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    clean_hf_artifact(tmp_path)  # nothing left to remove: no error
    gpt2 = SimpleNamespace(config=SimpleNamespace(n_positions=128))
    llama = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))
    assert context_length(gpt2) == 128 and context_length(llama) == 4096
    assert context_length(SimpleNamespace(config=SimpleNamespace())) is None


def test_run_stage_shuts_the_process_group_down(tmp_path, monkeypatch):
    """A stage's process group (gloo, one process here) is shut down before run_stage returns, on success and on
    failure alike, and a process without one is left as it is."""
    import torch.distributed as dist

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    seen = []

    def body(ctx, fail=False):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg-{len(seen)}", rank=0, world_size=1)
        t = torch.ones(2)
        dist.all_reduce(t)
        seen.append(dist.is_initialized())
        if fail:
            raise StageError("the body failed")
        return StageResult(metrics={"sum": t.sum().item()})

    try:
        assert run_stage("tokenizer", [f"run.root={tmp_path}"], body) == 0
        assert seen == [True] and not dist.is_initialized()
        assert run_stage("tokenizer", [f"run.root={tmp_path}/b"], lambda ctx: body(ctx, fail=True)) == 2
        assert seen == [True, True] and not dist.is_initialized()
        assert run_stage("tokenizer", [f"run.root={tmp_path}/c"], lambda ctx: StageResult(metrics={})) == 0
    finally:  # a failure here must not leave a process group to the tests after it
        if dist.is_initialized():
            dist.destroy_process_group()
