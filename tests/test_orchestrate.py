"""Orchestration: plans, done/partial/stale detection, skipping, resuming, forcing, errors.

Stages here are fakes (tests/fake_stages) around the real harness, so each run takes about a second.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest

from pipeline.__main__ import main as cli
from pipeline.config import ConfigError, load_config
from pipeline.filecheck import check_checkpoint
from pipeline.lineage import all_fingerprints
from pipeline.orchestrate import RunOptions, plan, run_pipeline, stage_command
from pipeline.runs import STAGES, StageDir, StageError
from pipeline.status import run_status
from tests.fake_stages.disk import small_disk  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


def _opts(tmp_path: Path, *overrides: str, force: bool = False, **env: str) -> RunOptions:
    env = {"PYTHONPATH": str(REPO), "FAKE_LOG": str(tmp_path / "launches.log"), **env}
    return RunOptions(
        None, (f"run.root={tmp_path / 'runs'}", *overrides), force=force, module_prefix="tests.fake_stages", env=env
    )


def _launches(tmp_path: Path) -> list[str]:
    log = tmp_path / "launches.log"
    return log.read_text().splitlines() if log.exists() else []


def _states(opts: RunOptions) -> dict[str, str]:
    return {s.stage: s.state for s in run_status(load_config(None, opts.overrides))}


def test_plan_follows_lineage():
    cfg = load_config(None)
    assert plan(cfg, "ppo") == ["tokenizer", "pretrain", "sft", "reward", "ppo"]
    assert plan(cfg, "all") == list(STAGES)
    assert plan(cfg, "tokenizer") == ["tokenizer"]
    assert plan(load_config(None, ["sft.init_from=gpt2"]), "sft") == ["sft"]
    assert plan(load_config(None, ["export.source=sft"]), "export") == ["tokenizer", "pretrain", "sft", "export"]
    with pytest.raises(ConfigError, match="unknown stage 'sfft'"):
        plan(cfg, "sfft")


def test_stage_command_per_launch():
    opts = RunOptions("c.yaml", ("sft.lr=1e-4",), python="py")
    assert stage_command("sft", opts) == ["py", "-m", "stages.sft", "--config", "c.yaml", "sft.lr=1e-4"]
    ddp = RunOptions("c.yaml", (), launch="ddp", nproc=2, python="py")
    assert stage_command("ppo", ddp, force=True) == [
        "py", "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
        "--num_processes", "2", "-m", "stages.ppo", "--config", "c.yaml", "--force",
    ]  # fmt: skip
    # tokenizer and export never need a distributed launcher
    assert stage_command("export", RunOptions(None, (), launch="zero3", python="py")) == ["py", "-m", "stages.export"]
    with pytest.raises(ConfigError, match="LAUNCH=ddp NPROC=2"):
        stage_command("sft", RunOptions(None, (), launch="cpu", nproc=2))


def test_all_then_again_trains_nothing(tmp_path):
    opts = _opts(tmp_path)
    assert run_pipeline("all", opts) == 0
    assert [x.split()[0] for x in _launches(tmp_path)] == list(STAGES)
    fps = all_fingerprints(load_config(None, opts.overrides))
    for stage in STAGES:
        m = json.loads((tmp_path / "runs/tiny" / stage / "manifest.json").read_text())
        assert m["fingerprint"] == fps[stage] and m["stage"] == stage and m["metrics"]
    t0 = time.time()
    assert run_pipeline("all", opts) == 0
    assert time.time() - t0 < 2.0
    assert len(_launches(tmp_path)) == len(STAGES)  # nothing launched the second time
    assert set(_states(opts).values()) == {"done"}


def test_changed_sft_key_marks_downstream_stale_and_force_moves_aside(tmp_path):
    run_pipeline("all", _opts(tmp_path))
    changed = _opts(tmp_path, "sft.lr=0.0001")
    statuses = {s.stage: s for s in run_status(load_config(None, changed.overrides))}
    assert {k: v.state for k, v in statuses.items()} == {
        "tokenizer": "done", "pretrain": "done", "sft": "stale", "reward": "stale", "ppo": "stale", "export": "stale",
    }  # fmt: skip
    assert statuses["sft"].changes == ["sft.lr: 0.0005 -> 0.0001"]
    assert statuses["reward"].changes == ["input 'sft' changed (sft.lr: 0.0005 -> 0.0001)"]
    with pytest.raises(StageError) as e:
        run_pipeline("ppo", changed)
    assert "sft.lr: 0.0005 -> 0.0001" in str(e.value) and "FORCE=1" in str(e.value)
    assert len(_launches(tmp_path)) == len(STAGES)  # nothing ran, nothing moved
    assert not list((tmp_path / "runs/tiny").glob("*.old-*"))

    forced = _opts(tmp_path, "sft.lr=0.0001", force=True)
    assert run_pipeline("all", forced) == 0
    assert [x.split()[0] for x in _launches(tmp_path)[len(STAGES) :]] == ["sft", "reward", "ppo", "export"]
    moved = sorted(p.name.split(".old-")[0] for p in (tmp_path / "runs/tiny").glob("*.old-*"))
    assert moved == ["export", "ppo", "reward", "sft"]
    old_sft = next((tmp_path / "runs/tiny").glob("sft.old-*"))
    assert (old_sft / "manifest.json").exists() and (old_sft / "artifact/weights.txt").exists()
    assert set(_states(forced).values()) == {"done"}


def test_killed_stage_resumes_and_reports_progress(tmp_path, capsys):
    dying = _opts(tmp_path, FAKE_DIE="pretrain:2")
    with pytest.raises(StageError, match="stage 'pretrain' failed with exit code 9") as e:
        run_pipeline("sft", dying)
    assert e.value.returncode == 9
    assert _states(dying)["tokenizer"] == "done" and _states(dying)["pretrain"] == "partial"
    assert cli(["status", *[f"{o}" for o in dying.overrides]]) == 0
    out = capsys.readouterr().out
    assert "partial (at step 2 of 3)" in out and "tokenizer" in out and "vocab_size=300" in out
    assert run_pipeline("sft", _opts(tmp_path)) == 0
    assert _launches(tmp_path) == ["tokenizer 0", "pretrain 0", "pretrain 2", "sft 0"]


def test_failing_stage_exit_code_is_propagated(tmp_path):
    opts = _opts(tmp_path, FAKE_FAIL="sft")
    with pytest.raises(StageError, match="stage 'sft' failed with exit code 7") as e:
        run_pipeline("all", opts)
    assert e.value.returncode == 7
    assert _states(opts)["pretrain"] == "done" and _states(opts)["reward"] == "missing"


def test_corrupt_checkpoint_is_refused_with_the_file_named(tmp_path):
    with pytest.raises(StageError):
        run_pipeline("pretrain", _opts(tmp_path, FAKE_DIE="pretrain:2"))
    ckpt = tmp_path / "runs/tiny/pretrain/checkpoints/step_000002"
    blob = _safetensors_bytes()
    (ckpt / "model.safetensors").write_bytes(blob[: len(blob) - 10])  # truncated
    with pytest.raises(StageError, match=r"corrupt:\n  - .*model.safetensors: truncated") as e:
        run_pipeline("pretrain", _opts(tmp_path))
    assert "mv " in str(e.value) and (ckpt / "model.safetensors").exists()
    assert run_pipeline("pretrain", _opts(tmp_path, force=True)) == 0  # moved aside, made again from scratch
    assert _launches(tmp_path)[-1] == "pretrain 0"
    (old,) = (tmp_path / "runs/tiny").glob("pretrain.old-*")
    assert (old / "checkpoints/step_000002/model.safetensors").stat().st_size == len(blob) - 10


def _safetensors_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.arange(16, dtype=torch.float32)})


def test_check_checkpoint_finds_truncated_files(tmp_path):
    import torch

    torch.save({"w": torch.zeros(100)}, tmp_path / "optimizer.pt")
    (tmp_path / "state.json").write_text('{"step": 3}')
    (tmp_path / "random_states_0.pkl").write_bytes(pickle.dumps({"python": [1, 2, 3]}))
    assert check_checkpoint(tmp_path) == []
    data = (tmp_path / "optimizer.pt").read_bytes()
    (tmp_path / "optimizer.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "state.json").write_text('{"step": ')
    (tmp_path / "random_states_0.pkl").write_bytes(pickle.dumps({"python": [1, 2, 3]})[:-3])
    problems = check_checkpoint(tmp_path)
    assert len(problems) == 3 and "optimizer.pt: unreadable" in problems[0]
    assert "random_states_0.pkl: truncated" in problems[1] and "state.json" in problems[2]


def test_missing_upstream_artifact_is_a_clear_error(tmp_path):
    run_pipeline("sft", _opts(tmp_path))
    artifact = tmp_path / "runs/tiny/pretrain/artifact"
    (artifact / "weights.txt").unlink()
    artifact.rmdir()
    with pytest.raises(StageError, match=r"stage 'pretrain': the manifest says done but .*artifact is missing"):
        run_pipeline("reward", _opts(tmp_path))
    assert (tmp_path / "runs/tiny/sft/manifest.json").exists()
    assert run_pipeline("pretrain", _opts(tmp_path, force=True)) == 0
    assert len(list((tmp_path / "runs/tiny").glob("pretrain.old-*"))) == 1


def test_run_folder_from_another_config(tmp_path):
    run_pipeline("pretrain", _opts(tmp_path, "run.seed=1", "model.n_layer=2"))
    other = _opts(tmp_path, "run.seed=2", "model.n_layer=2")
    st = {s.stage: s for s in run_status(load_config(None, other.overrides))}
    assert st["tokenizer"].changes == ["run.seed: 1 -> 2"]
    assert st["pretrain"].changes[0] == "run.seed: 1 -> 2"
    with pytest.raises(StageError, match=r"stage 'tokenizer' .* different config.*\n  - run.seed: 1 -> 2"):
        run_pipeline("pretrain", other)
    assert StageDir.of(tmp_path / "runs/tiny", "pretrain").manifest() is not None


def test_full_disk_during_a_checkpoint_keeps_the_earlier_ones(small_disk, tmp_path):  # noqa: F811 (fixture)
    opts = RunOptions(None, (f"run.root={small_disk}",), module_prefix="tests.fake_stages",
                      env={"PYTHONPATH": str(REPO), "FAKE_PAYLOAD": "pretrain:400000"})  # fmt: skip
    with pytest.raises(StageError, match=r"stage 'pretrain' failed with exit code 1 \(only 0 MiB free") as e:
        run_pipeline("pretrain", opts)
    assert "run the same command again to resume" in str(e.value)
    ckpts = small_disk / "tiny/pretrain/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001", "step_000002"]  # no half-written step 3
    assert check_checkpoint(ckpts / "step_000002") == []
    assert StageDir.of(small_disk / "tiny", "tokenizer").manifest() is not None
    freed = RunOptions(None, opts.overrides, module_prefix="tests.fake_stages", env={"PYTHONPATH": str(REPO)})
    assert run_pipeline("pretrain", freed) == 0


def test_a_failed_first_start_runs_again_with_the_fixed_config_without_force(tmp_path):
    with pytest.raises(StageError, match="stage 'sft' failed with exit code 7"):
        run_pipeline("sft", _opts(tmp_path, "sft.lr=0.5", FAKE_FAIL="sft"))  # e.g. a config error in the body
    fixed = _opts(tmp_path, "sft.lr=0.0001")
    assert _states(fixed)["sft"] == "missing"
    assert run_pipeline("sft", fixed) == 0
    assert _launches(tmp_path)[-1] == "sft 0" and _states(fixed)["sft"] == "done"
    assert not list((tmp_path / "runs/tiny").glob("*.old-*"))


def test_a_corrupt_manifest_is_shown_by_status_and_cleared_by_force(tmp_path, capsys):
    opts = _opts(tmp_path)
    run_pipeline("all", opts)
    manifest = tmp_path / "runs/tiny/sft/manifest.json"
    cut = manifest.read_text()[:40]
    manifest.write_text(cut)  # cut off
    capsys.readouterr()
    assert cli(["status", *opts.overrides]) == 0
    out = capsys.readouterr().out
    (sft,) = [line for line in out.splitlines() if line.startswith("sft ")]
    assert "corrupt" in sft and str(manifest) in sft and "FORCE=1" in sft
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["done", "done", "corrupt", "done", "done", "done"]
    with pytest.raises(StageError, match=r"manifest.json.*FORCE=1"):
        run_pipeline("sft", opts)
    assert manifest.exists()  # nothing moved without force
    assert run_pipeline("sft", _opts(tmp_path, force=True)) == 0
    (old,) = (tmp_path / "runs/tiny").glob("sft.old-*")
    assert (old / "manifest.json").read_text() == cut  # moved aside, not deleted
    assert _launches(tmp_path)[-1] == "sft 0" and _states(opts)["sft"] == "done"


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
def test_a_stage_run_as_a_module_refuses_a_truncated_checkpoint_like_the_orchestrator(stage, tmp_path, capsys):
    """``python -m stages.<stage>`` gave a PytorchStreamReader traceback from torch.load (issue 17): it now gives the
    orchestrator's message, with the mv fix, and changes nothing; with --force the folder is moved aside."""
    import importlib

    import torch

    from tests.fake_stages.artifacts import make_fake_run

    upstream = {"pretrain": ("tokenizer",), "sft": ("tokenizer", "pretrain"), "reward": ("tokenizer", "pretrain", "sft"),
                "ppo": ("tokenizer", "pretrain", "sft", "reward")}[stage]  # fmt: skip
    cfg = make_fake_run(tmp_path, stages=upstream)
    sd = StageDir.of(cfg.run_dir, stage)
    name = "step_000004" if stage in ("pretrain", "ppo") else "checkpoint-4"
    ckpt = sd.checkpoints / name
    ckpt.mkdir(parents=True)
    torch.save({"w": torch.zeros(1000)}, ckpt / "optimizer.pt")
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])  # cut off by a full disk
    (ckpt / "trainer_state.json").write_text('{"step": 4, "global_step": 4}')
    (ckpt / "COMPLETE").write_text("")
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))
    main = importlib.import_module(f"stages.{stage}").main
    assert main([f"run.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"stage '{stage}' would resume from {ckpt}, which is corrupt" in err and "optimizer.pt" in err
    assert f"mv {ckpt} {ckpt}.corrupt" in err and "Traceback" not in err
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*")) == before


def test_a_deepspeed_resume_is_refused_before_launching_unless_allowed(tmp_path, monkeypatch, capsys):
    """Under ``--launch zero2|zero3`` a partial stage would resume through DeepSpeed's checkpoint loader, which
    unpickles: the orchestrator refuses it before launching anything, with the stage process's own message and exit
    code 2 (not torchrun's 1 and one message per rank); ``run.allow_pickle_checkpoints=true`` lets it resume."""
    import dataclasses

    import pipeline.orchestrate as orchestrate
    from pipeline.checkpoint import ALLOW_PICKLE_KEY

    with pytest.raises(StageError, match="stage 'pretrain' failed with exit code 9"):
        run_pipeline("sft", _opts(tmp_path, FAKE_DIE="pretrain:2"))
    sd = StageDir.of(tmp_path / "runs/tiny", "pretrain")
    ckpt = sd.checkpoint_path(2)
    assert sd.latest_checkpoint() == ckpt and sd.manifest() is None
    # the fakes run as plain processes (no accelerate, no DeepSpeed): only the orchestrator's own check is tested
    launched: list[list[str]] = []
    real_command, real_run = orchestrate.stage_command, orchestrate._run_child
    monkeypatch.setattr(
        orchestrate,
        "stage_command",
        lambda s, o, force=False: real_command(s, dataclasses.replace(o, launch="cpu"), force),
    )
    monkeypatch.setattr(orchestrate, "_run_child", lambda cmd, *a: launched.append(cmd) or real_run(cmd, *a))
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))

    for launch in ("zero2", "zero3"):
        with pytest.raises(StageError) as e:
            run_pipeline("sft", dataclasses.replace(_opts(tmp_path), launch=launch))
        assert getattr(e.value, "returncode", 2) == 2
        msg = str(e.value)
        assert msg.startswith(f"stage 'pretrain' would resume from {ckpt} under DeepSpeed")
        assert "weights_only=False" in msg and f"{ALLOW_PICKLE_KEY}=true" in msg and str(sd.checkpoints) in msg
    assert launched == []  # nothing was launched
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*")) == before

    # the command line: exit 2 and the message once (the orchestrator needs no stage module to refuse)
    args = ["run", "sft", "--launch", "zero2", "--nproc", "2", f"run.root={tmp_path / 'runs'}"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.count(f"error: stage 'pretrain' would resume from {ckpt} under DeepSpeed") == 1
    assert "failed with exit code" not in err and launched == []

    allowed = dataclasses.replace(_opts(tmp_path, f"{ALLOW_PICKLE_KEY}=true"), launch="zero2")
    assert run_pipeline("sft", allowed) == 0
    assert [c[2] for c in launched] == ["tests.fake_stages.pretrain", "tests.fake_stages.sft"]
    assert _launches(tmp_path)[-2:] == ["pretrain 2", "sft 0"]  # resumed at step 2


def test_a_resume_without_deepspeed_needs_no_key(tmp_path):
    """cpu and DDP resume through accelerate's and the Trainer's safe loaders (``weights_only=True``)."""
    import dataclasses

    from pipeline.orchestrate import _check_resumable
    from pipeline.status import stage_status

    with pytest.raises(StageError):
        run_pipeline("pretrain", _opts(tmp_path, FAKE_DIE="pretrain:2"))
    cfg = load_config(None, _opts(tmp_path).overrides)
    st = stage_status(cfg, "pretrain", all_fingerprints(cfg))
    assert st.state == "partial"
    for launch in ("cpu", "ddp"):
        _check_resumable(cfg, st, dataclasses.replace(_opts(tmp_path), launch=launch))  # no error
    with pytest.raises(StageError, match=r"run\.allow_pickle_checkpoints=true"):
        _check_resumable(cfg, st, dataclasses.replace(_opts(tmp_path), launch="zero3"))
