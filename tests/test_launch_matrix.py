"""The same micro run under every launch (issue 17): one CPU process, DDP, DeepSpeed ZeRO-2 and ZeRO-3.

- The resume refusal (fast, in-process): under DeepSpeed a resume goes through DeepSpeed's checkpoint loader,
  which unpickles (``torch.load(weights_only=False)``, hard-coded in its checkpoint engine; its optimizer files
  hold pickled DeepSpeed objects). ``run_stage`` refuses it before the stage body (so before any load) unless
  ``run.allow_pickle_checkpoints=true``; a fresh start, or a resume without DeepSpeed, is not refused.
- The matrix (slow): ``python -m pipeline run all --launch <cpu|ddp|zero2|zero3>`` on the micro config of
  ``test_e2e`` (2 processes, 1 for cpu). Every stage finishes with its manifest, and every stage's artifact has
  the cpu run's format: the same files, the same safetensors tensor names, shapes and dtypes, the same
  ``config.json``.
- Two processes against one: ``pretrain.batch_size`` is per process (each micro-step draws
  ``world_size * batch_size`` windows from one generator shared by all processes, process r takes slice r), so
  the multi-process runs use half the batch size: the same windows, the same global batch, the same math. The
  pretrain weights of DDP, ZeRO-2 and ZeRO-3 then match the one-process run's to float32 summation order.
- A ZeRO-2 resume of every training stage, refused without the key (by the orchestrator, before it launches
  anything: exit 2, the message once) and done with it, to the uninterrupted run's weights.
- Export from a raw DeepSpeed ZeRO checkpoint (fast, in-process): DeepSpeed's ``zero_to_fp32`` unpickles too, so it
  is refused before it is called unless the key is set.

The stage processes run from a snapshot of pipeline/, stages/ and configs/ taken once per module, so that files
edited meanwhile in the working tree do not mix into one run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.checkpoint import ALLOW_PICKLE_KEY, refuse_pickle_resume
from pipeline.config import load_config
from pipeline.lineage import all_fingerprints
from pipeline.runs import STAGES, Interrupted, StageDir, StageError
from pipeline.stage import StageContext, StageResult, run_stage
from tests.helpers_launch import child_env
from tests.test_e2e import MICRO, _micro_config

REPO = Path(__file__).resolve().parents[1]
TRAINING_STAGES = ("pretrain", "sft", "reward", "ppo")
"""The stages that checkpoint and resume (and run under the launcher)."""

# ----------------------------------------------------------------------------- the refusal, in-process


@pytest.fixture
def _single_process(monkeypatch):
    """No launcher in this process; ``run_stage`` sets ``ACCELERATE_USE_CPU``: restored afterwards."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    for key in ("ACCELERATE_USE_DEEPSPEED", "LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def _partial_sft(tmp_path: Path) -> tuple[list[str], StageDir]:
    """An sft stage (from a local model folder: no upstream stage) stopped after a complete checkpoint."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"n_layer": 1}')
    overrides = [f"run.root={tmp_path / 'runs'}", f"sft.init_from={model}"]

    def stopped(ctx: StageContext) -> StageResult:
        tmp = ctx.dir.checkpoint_tmp(5)
        (tmp / "trainer_state.json").write_text('{"step": 5}')
        ctx.dir.publish_checkpoint(tmp, 5, keep=2)
        raise Interrupted(ctx.stage, 5, signal.SIGTERM, ctx.dir.checkpoints)

    assert run_stage("sft", overrides, stopped) == 128 + signal.SIGTERM
    sd = StageDir.of(load_config(None, overrides).run_dir, "sft")
    assert sd.latest_checkpoint() == sd.checkpoint_path(5) and sd.manifest() is None
    return overrides, sd


def _recording_body(calls: list[str]):
    def body(ctx: StageContext) -> StageResult:
        calls.append(ctx.state)
        ctx.dir.artifact.mkdir(parents=True, exist_ok=True)
        return StageResult(metrics={})

    return body


def test_a_deepspeed_resume_is_refused_before_the_stage_body_unless_allowed(
    tmp_path, monkeypatch, capsys, _single_process
):
    overrides, sd = _partial_sft(tmp_path)
    capsys.readouterr()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with zero2/zero3 sets
    calls: list[str] = []

    assert run_stage("sft", overrides, _recording_body(calls)) == 2  # a stage error's exit code
    err = capsys.readouterr().err
    assert calls == []  # refused before the body: nothing was loaded
    assert f"error: stage 'sft' would resume from {sd.checkpoint_path(5)} under DeepSpeed" in err
    assert "weights_only=False" in err and f"{ALLOW_PICKLE_KEY}=true" in err and str(sd.checkpoints) in err
    assert sd.latest_checkpoint() == sd.checkpoint_path(5) and sd.manifest() is None  # nothing was changed

    assert run_stage("sft", [*overrides, f"{ALLOW_PICKLE_KEY}=true"], _recording_body(calls)) == 0
    assert calls == ["partial"]  # the opt-in resumes
    assert sd.manifest() is not None


def test_a_fresh_start_under_deepspeed_and_a_resume_without_it_are_not_refused(tmp_path, monkeypatch, _single_process):
    overrides, sd = _partial_sft(tmp_path)
    refuse_pickle_resume(sd, allow_pickle=False)  # no DeepSpeed: accelerate's and the Trainer's safe loaders

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(StageError, match=r"run\.allow_pickle_checkpoints=true"):
        refuse_pickle_resume(sd, allow_pickle=False)
    refuse_pickle_resume(sd, allow_pickle=True)
    refuse_pickle_resume(StageDir.of(tmp_path / "runs" / "tiny", "ppo"), allow_pickle=False)  # no checkpoint

    calls: list[str] = []
    fresh = [f"run.root={tmp_path / 'fresh'}", *overrides[1:]]
    assert run_stage("sft", fresh, _recording_body(calls)) == 0  # a fresh start needs no key
    assert calls == ["missing"]


def _fake_zero_to_fp32(monkeypatch, state: dict) -> list[str]:
    """DeepSpeed's ``zero_to_fp32`` (and its packages) replaced in ``sys.modules``: records its calls."""
    import types

    calls: list[str] = []
    fake = types.ModuleType("deepspeed.utils.zero_to_fp32")
    fake.get_fp32_state_dict_from_zero_checkpoint = lambda d: calls.append(d) or dict(state)
    for name in ("deepspeed", "deepspeed.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", fake)
    return calls


def test_export_from_a_raw_zero_checkpoint_is_refused_before_deepspeed_reads_it_unless_allowed(tmp_path, monkeypatch):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.export import load_source_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=32))
    src = tmp_path / "artifact"
    model.config.save_pretrained(src)  # a config and a ZeRO checkpoint, no weight file
    (src / "latest").write_text("global_step4")
    (src / "global_step4").mkdir()
    calls = _fake_zero_to_fp32(monkeypatch, model.state_dict())

    with pytest.raises(StageError, match=r"only a DeepSpeed ZeRO checkpoint .* unpickles") as e:
        load_source_model(src)
    assert f"{ALLOW_PICKLE_KEY}=true" in str(e.value) and "weights_only=False" in str(e.value)
    assert calls == []  # refused before DeepSpeed's reader was called

    loaded = load_source_model(src, allow_pickle=True)
    assert calls == [str(src)]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


# ----------------------------------------------------------------------------- the launch matrix (slow)

LAUNCHES = {"cpu": 1, "ddp": 2, "zero2": 2, "zero3": 2}
"""Launch -> processes (cpu: one)."""
SAME_MATH_ATOL = 1e-4
"""Largest |difference| allowed between a pretrain weight of a 2-process run and the 1-process run's.

At the same global batch the runs see the same windows and average the same per-window losses (the mean of two
half-batch means, by the all-reduce, against one mean), so they differ only in the order of float32 sums: about
1e-7 relative noise on each gradient, which AdamW passes on as weight differences far below one step's size.
Measured after the micro run's 20 steps (lr 1e-3): max 4.1e-6 for DDP, ZeRO-2 and ZeRO-3 alike, while a run at
another global batch (16 instead of 8) differs by 1.7e-2. 1e-4 (a tenth of one step at the peak learning rate)
is 25 times what is seen and 170 times below what a batch mismatch does."""


@dataclass
class Launched:
    launch: str
    overrides: list[str]
    proc: subprocess.CompletedProcess
    wall_s: float


class Matrix:
    """The micro run under each launch, made on first use and kept for the module."""

    def __init__(self, code: Path, folder: Path) -> None:
        self.code, self.folder = code, folder
        self.config = _micro_config(folder / "config")
        # CPUs only, also on a GPU machine: the same float32 math under every launch (no bf16, no GPU kernels)
        self.env = child_env(PIPELINE_PROGRESS="0", PYTHONPATH=str(code), CUDA_VISIBLE_DEVICES="")
        self.runs: dict[str, Launched] = {}

    def overrides(self, launch: str, root: str | None = None) -> list[str]:
        out = [f"run.root={self.folder / 'runs' / (root or launch)}"]
        if LAUNCHES[launch] > 1:  # pretrain.batch_size is per process: the same global batch as one process
            out.append(f"pretrain.batch_size={MICRO['pretrain']['batch_size'] // LAUNCHES[launch]}")
        return out

    def pipeline(self, launch: str, *args: str) -> subprocess.CompletedProcess:
        """``python -m pipeline run <args> --launch <launch>`` (``args``: the target, then overrides)."""
        nproc = [] if launch == "cpu" else ["--nproc", str(LAUNCHES[launch])]
        cmd = [sys.executable, "-m", "pipeline", "run", *args, "--config", str(self.config), "--launch", launch]
        return subprocess.run([*cmd, *nproc], cwd=self.code, env=self.env, capture_output=True, text=True, check=False)

    def get(self, launch: str) -> Launched:
        if launch not in self.runs:
            t0 = time.time()
            proc = self.pipeline(launch, "all", *self.overrides(launch))
            self.runs[launch] = Launched(launch, self.overrides(launch), proc, time.time() - t0)
            print(f"{launch}: run all in {self.runs[launch].wall_s:.0f}s (exit {proc.returncode})")
        assert self.runs[launch].proc.returncode == 0, (
            f"run all --launch {launch}: exit {self.runs[launch].proc.returncode}\n"
            f"{self.runs[launch].proc.stderr[-6000:]}"
        )
        return self.runs[launch]

    def stage_dir(self, overrides: list[str], stage: str) -> StageDir:
        return StageDir.of(load_config(self.config, overrides).run_dir, stage)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Matrix:
    code = tmp_path_factory.mktemp("code")
    for name in ("pipeline", "stages", "configs"):
        shutil.copytree(REPO / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    return Matrix(code, tmp_path_factory.mktemp("matrix"))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _tensor_formats(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # each launch takes 1-3 minutes alone on 2 cores; far more on a loaded machine
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_every_stage_finishes_with_the_formats_of_the_cpu_run(matrix, launch):
    ref, run = matrix.get("cpu"), matrix.get(launch)
    fps = all_fingerprints(load_config(matrix.config, run.overrides))
    problems = []
    for stage in STAGES:
        sd, ref_sd = matrix.stage_dir(run.overrides, stage), matrix.stage_dir(ref.overrides, stage)
        m = sd.manifest()
        assert m is not None and m["stage"] == stage and m["fingerprint"] == fps[stage], (launch, stage)
        if _files(sd.artifact) != _files(ref_sd.artifact):
            problems.append(f"{stage}: files {_files(sd.artifact)} != {_files(ref_sd.artifact)}")
            continue
        for name in _files(ref_sd.artifact):
            if name.endswith(".safetensors"):
                got, want = _tensor_formats(sd.artifact / name), _tensor_formats(ref_sd.artifact / name)
                if got != want:
                    extra, missing = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
                    other = sorted(k for k in got.keys() & want.keys() if got[k] != want[k])
                    problems.append(f"{stage}/{name}: extra {extra}, missing {missing}, other shape/dtype {other}")
            elif name == "config.json":
                config, ref_config = (json.loads((d / name).read_text()) for d in (sd.artifact, ref_sd.artifact))
                if config != ref_config:
                    keys = sorted(k for k in config.keys() | ref_config.keys() if config.get(k) != ref_config.get(k))
                    problems.append(f"{stage}/config.json differs in {keys}")
    assert not problems, f"--launch {launch} against cpu: " + "; ".join(problems)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("launch", ["ddp", "zero2", "zero3"])
def test_two_processes_train_the_one_process_weights(matrix, launch):
    ref, run = matrix.get("cpu"), matrix.get(launch)
    one, two = matrix.stage_dir(ref.overrides, "pretrain"), matrix.stage_dir(run.overrides, "pretrain")
    diff = _max_diff(one.artifact / "model.safetensors", two.artifact / "model.safetensors")
    print(f"pretrain, {launch} with 2 processes against 1: max |weight difference| {diff:.2e}")
    assert diff <= SAME_MATH_ATOL
    m1, m2 = one.manifest()["metrics"], two.manifest()["metrics"]
    assert m1["tokens"] == m2["tokens"]  # the same global batch
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], abs=1e-4)  # the same validation windows, one mean


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_zero2_resume_of_every_training_stage_needs_the_opt_in(matrix):
    """The ZeRO-2 run, copied and cut back as if killed before each training stage's last checkpoint: refused
    without the key, resumed with it (through accelerate's load_state for pretrain and PPO, the Trainer's
    resume for SFT and reward), to the uninterrupted run's weights."""
    run = matrix.get("zero2")
    overrides = matrix.overrides("zero2", root="zero2-resumed")
    shutil.copytree(load_config(matrix.config, run.overrides).run_dir, load_config(matrix.config, overrides).run_dir)
    resume_from = {}
    for stage in TRAINING_STAGES:
        sd = matrix.stage_dir(overrides, stage)
        ckpts = sd.list_checkpoints()
        assert len(ckpts) >= 2, (stage, ckpts)
        shutil.rmtree(ckpts[-1][1])
        sd.manifest_path.unlink()
        resume_from[stage] = ckpts[-2]

    refused = matrix.pipeline("zero2", "all", *overrides)
    assert refused.returncode == 2, refused.stderr[-6000:]  # refused by the orchestrator, before any launch
    pre = matrix.stage_dir(overrides, "pretrain")
    message = f"error: stage 'pretrain' would resume from {resume_from['pretrain'][1]} under DeepSpeed"
    assert refused.stderr.count(message) == 1, refused.stderr[-6000:]
    assert f"{ALLOW_PICKLE_KEY}=true" in refused.stderr and "resuming at step" not in refused.stderr
    assert pre.manifest() is None and pre.latest_checkpoint() == resume_from["pretrain"][1]  # nothing changed

    t0 = time.time()
    resumed = matrix.pipeline("zero2", "all", *overrides, f"{ALLOW_PICKLE_KEY}=true")
    print(f"zero2 resume of {', '.join(TRAINING_STAGES)}: {time.time() - t0:.0f}s")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    for stage in TRAINING_STAGES:
        assert f"{stage:<9} resuming at step {resume_from[stage][0]}" in resumed.stderr, stage
        sd, uninterrupted = matrix.stage_dir(overrides, stage), matrix.stage_dir(run.overrides, stage)
        assert sd.manifest() is not None
        diff = _max_diff(sd.artifact / "model.safetensors", uninterrupted.artifact / "model.safetensors")
        assert diff <= 1e-6, f"{stage}: the resumed weights differ from the uninterrupted run's by {diff}"
