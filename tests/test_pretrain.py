"""The pretraining stage: artifact, skip-when-done, bit-identical resume after SIGKILL/SIGTERM, bad input,
and (slow) 2-process DDP and DeepSpeed ZeRO-2 on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import ALLOW_PICKLE_KEY
from pipeline.config import ConfigError, PretrainConfig, load_config
from pipeline.pretrain import lr_at, resolve_model_config
from pipeline.runs import StageDir, StageError
from tests.helpers_launch import accelerate_launch, child_env

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

MICRO = """
run: {{name: {name}, root: {root}, seed: 1}}
tokenizer: {{kind: bpe, vocab_size: 300}}
data:
  corpus: {{source: files, paths: [{text}], txt_document_separator: "\\n\\n", max_tokens: 60000, num_proc: 1}}
model: {{n_layer: 2, n_head: 2, n_embd: 32, block_size: 32}}
pretrain: {{batch_size: 4, max_steps: {steps}, eval_interval: 10, eval_iters: 2, log_interval: 5, ckpt_interval: 5,
           warmup_steps: 5, sample_tokens: 8, keep_checkpoints: 2, num_threads: 1}}
ppo: {{max_prompt_length: 16, max_new_tokens: 16}}  # within model.block_size (checked at load)
"""


def _env() -> dict[str, str]:
    return child_env(PIPELINE_PROGRESS="0")


def _text() -> Path:
    """The shared reference text (../shared/data/tinyshakespeare.txt) when the checkout has it; else a
    synthetic text of the embedded word list, the same bytes at the same path on every call, so that
    every test's config (and fingerprint) is the same."""
    if TEXT.is_file():
        return TEXT
    from pipeline.data.tasks import load_words

    path = Path(tempfile.gettempdir()) / "pipeline-test-pretrain-corpus-v1.txt"
    if not path.is_file():
        rng, words = random.Random(0), load_words()
        paras = [" ".join(rng.choices(words, k=rng.randint(20, 60))).capitalize() + "." for _ in range(2500)]
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n\n".join(paras) + "\n")
        os.replace(tmp, path)
    return path


def _write_cfg(tmp: Path, name: str, steps: int = 30) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(MICRO.format(name=name, root=tmp / "runs", text=_text(), steps=steps))
    return p


def _stage(stage: str, cfg: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--config", str(cfg), *extra],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """One tokenizer stage, copied into each test's run (same config -> same fingerprint)."""
    tmp = tmp_path_factory.mktemp("tok")
    cfg = _write_cfg(tmp, "base")
    r = _stage("tokenizer", cfg)
    assert r.returncode == 0, r.stderr
    return tmp / "runs" / "base" / "tokenizer"


def _run_dir(tmp: Path, tokenized: Path, name: str, steps: int = 30) -> tuple[Path, Path]:
    cfg = _write_cfg(tmp, name, steps)
    shutil.copytree(tokenized, tmp / "runs" / name / "tokenizer")
    return cfg, tmp / "runs" / name


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "pretrain" / "artifact" / "model.safetensors")


def test_lr_schedule():
    c = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    lrs = [lr_at(s, c) for s in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55)  # cosine midpoint = (1 + 0.1) / 2
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay
    assert lrs[14] == lrs[15] == 0.1


def test_block_size_larger_than_model_allows():
    with pytest.raises(ConfigError, match=r"pretrain.block_size=128 exceeds model.block_size=64"):
        load_config(None, ["model.block_size=64", "pretrain.block_size=128", "ppo.max_prompt_length=32"])
    cfg = load_config(None, ["model.block_size=64", "pretrain.block_size=64", "ppo.max_prompt_length=32"])
    with pytest.raises(
        StageError, match=r"pretrain.block_size=128 is larger than the model allows \(model.block_size=64\)"
    ):
        resolve_model_config(cfg.model, 300, 128)  # the stage's own check stays, for a config built in code
    assert resolve_model_config(cfg.model, 300, 64).vocab_size == 320  # rounded up to a multiple of 64


def test_stage_artifact_and_skip(tmp_path, tokenized):
    cfg, run = _run_dir(tmp_path, tokenized, "a")
    r = _stage("pretrain", cfg)
    assert r.returncode == 0, r.stderr
    m = json.loads((run / "pretrain" / "manifest.json").read_text())
    assert set(m["metrics"]) >= {"train_loss", "val_loss", "tokens", "tokens_per_s"}
    assert m["metrics"]["tokens"] == 30 * 4 * 32
    assert m["metrics"]["val_loss"] < math.log(300) - 0.3  # learned something beyond uniform
    assert m["dtype"]["requested"] == "auto" and m["dtype"]["device"] == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if not torch.cuda.is_available():  # auto on a CPU: bf16 autocast where the CPU has native bf16, else float32
        assert m["dtype"]["resolved"] == ("bfloat16" if m["dtype"]["cpu_bf16"] else "float32")
    assert m["inputs"] == {"tokenizer": json.loads((run / "tokenizer" / "manifest.json").read_text())["fingerprint"]}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "pretrain" / "artifact")
    tok = AutoTokenizer.from_pretrained(run / "pretrain" / "artifact")
    assert type(model).__name__ == "GPT2LMHeadModel" and tok.model_max_length == 32
    ids = tok("ROMEO: hello", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    losses = [x["train/loss"] for x in StageDir.of(run, "pretrain").read_metrics() if "train/loss" in x]
    assert losses[-1] < losses[0]
    # done: a second run trains nothing
    before = (run / "pretrain" / "manifest.json").read_text()
    r2 = _stage("pretrain", cfg)
    assert r2.returncode == 0 and "already done" in r2.stderr
    assert (run / "pretrain" / "manifest.json").read_text() == before


def test_sigkill_and_sigterm_resume_bit_identical(tmp_path, tokenized):
    cfg_ref, run_ref = _run_dir(tmp_path, tokenized, "ref")
    assert _stage("pretrain", cfg_ref).returncode == 0
    ref = _weights(run_ref)

    cfg, run = _run_dir(tmp_path, tokenized, "killed")
    ckpts = StageDir.of(run, "pretrain")
    for sig, at in ((signal.SIGKILL, 10), (signal.SIGTERM, 20)):
        p = subprocess.Popen(
            [sys.executable, "-m", "stages.pretrain", "--config", str(cfg)],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline and not any(s >= at for s, _ in ckpts.list_checkpoints()):
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        if sig == signal.SIGTERM:  # saved a checkpoint and exited 128+15 (unless it had already finished)
            assert p.returncode in (128 + signal.SIGTERM, 0), err
        assert not ckpts.manifest_path.exists() or p.returncode == 0
    # a checkpoint cut off mid-write is never loaded
    junk = ckpts.checkpoints / "step_000999.tmp"
    junk.mkdir(exist_ok=True)
    (junk / "model.safetensors").write_bytes(b"\0" * 10)
    r = _stage("pretrain", cfg)
    assert r.returncode == 0, r.stderr
    got = _weights(run)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k  # bit-identical to the run never interrupted
    assert [x["step"] for x in ckpts.read_metrics() if "train/loss" in x] == [5, 10, 15, 20, 25, 30]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tokenized):
    cfg, run = _run_dir(tmp_path, tokenized, "corrupt", steps=10)
    assert _stage("pretrain", cfg).returncode == 0
    sd = StageDir.of(run, "pretrain")
    artifact_before = _weights(run)
    sd.manifest_path.unlink()  # pretend it was killed before the manifest
    latest = sd.latest_checkpoint()
    (latest / "optimizer.bin").write_bytes((latest / "optimizer.bin").read_bytes()[:100])  # truncated
    r = _stage("pretrain", cfg)
    assert r.returncode == 2
    assert f"would resume from {latest}, which is corrupt" in r.stderr and "optimizer.bin" in r.stderr
    assert f"mv {latest} {latest}.corrupt" in r.stderr  # found before torch.load, as the orchestrator finds it
    assert latest.exists() and all(torch.equal(_weights(run)[k], v) for k, v in artifact_before.items())


def test_stale_stage_is_not_overwritten(tmp_path, tokenized):
    cfg, run = _run_dir(tmp_path, tokenized, "stale", steps=5)
    assert _stage("pretrain", cfg).returncode == 0
    before = _weights(run)
    r = _stage("pretrain", cfg, "pretrain.lr=0.01")
    assert r.returncode == 2 and "different config" in r.stderr and "FORCE=1" in r.stderr
    assert all(torch.equal(_weights(run)[k], v) for k, v in before.items())


def _launch(cfg: Path, accel: str, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*accelerate_launch(ROOT / "configs" / "accelerate" / accel, nproc), "-m", "stages.pretrain",
           "--config", str(cfg), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _losses(run: Path) -> list[float]:
    return [x["train/loss"] for x in StageDir.of(run, "pretrain").read_metrics() if "train/loss" in x]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_processes_matches_one_process(tmp_path, tokenized, optimizer):
    # equal global batch: 2 processes x 2 sequences vs 1 process x 2 sequences x 2 accumulation steps;
    # both draw the same windows (one shared sampler), so only float summation order differs. Muon steps on the
    # all-reduced gradients in each process (measured: identical weights).
    # float32: under bf16 autocast (dtype auto on CPUs with native bf16) the two batch splits round differently
    # (measured 5.8e-3 apart in the launch matrix's micro run)
    opt, f32 = f"pretrain.optimizer={optimizer}", "pretrain.dtype=float32"
    cfg1, run1 = _run_dir(tmp_path, tokenized, "one", steps=20)
    r = _stage("pretrain", cfg1, "pretrain.batch_size=2", "pretrain.grad_accum=2", opt, f32)
    assert r.returncode == 0, r.stderr
    cfg2, run2 = _run_dir(tmp_path, tokenized, "two", steps=20)
    r = _launch(cfg2, "ddp.yaml", 2, "pretrain.batch_size=2", opt, f32)
    assert r.returncode == 0, r.stderr[-3000:]
    l1, l2 = _losses(run1), _losses(run2)
    assert len(l1) == len(l2) == 4
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4, (l1, l2)
    w1, w2 = _weights(run1), _weights(run2)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:  # already gone (the caller checks why)
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_checkpoints_and_resumes(tmp_path, tokenized):
    pytest.importorskip("deepspeed")
    cfg, run = _run_dir(tmp_path, tokenized, "zero2", steps=150)
    sd = StageDir.of(run, "pretrain")
    cmd = [
        *accelerate_launch(ROOT / "configs" / "accelerate" / "zero2.yaml"),
        "-m",
        "stages.pretrain",
        "--config",
        str(cfg),
    ]
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 5 for s, _ in sd.list_checkpoints()) and p.poll() is None:
        time.sleep(0.1)
    exited = p.poll()
    _kill_tree(p.pid)  # the launcher and both workers, as a power loss would
    _, err = p.communicate(timeout=60)
    assert exited is None, f"the launcher exited ({exited}) before it was killed:\n{err[-3000:]}"
    assert any(s >= 5 for s, _ in sd.list_checkpoints()), err[-3000:]
    assert not sd.manifest_path.exists()
    # DeepSpeed's checkpoint loader unpickles: refused on every rank before anything is loaded (each rank exits 2,
    # which torchrun reports as its own exit code 1), then allowed by the key
    killed_at = sd.latest_complete().path
    r = _launch(cfg, "zero2.yaml", 2)
    assert r.returncode != 0 and "resumed from" not in r.stderr, r.stderr[-3000:]
    assert f"stage 'pretrain' would resume from {killed_at} under DeepSpeed" in r.stderr, r.stderr[-3000:]
    assert f"{ALLOW_PICKLE_KEY}=true" in r.stderr
    assert sd.latest_complete().path == killed_at and not sd.manifest_path.exists()  # nothing changed
    r = _launch(cfg, "zero2.yaml", 2, f"{ALLOW_PICKLE_KEY}=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    m = json.loads(sd.manifest_path.read_text())
    assert m["metrics"]["steps"] == 150 and m["metrics"]["world_size"] == 2
    assert math.isfinite(m["metrics"]["val_loss"])


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one precision per process: start and leave in-process runs with none set."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_dtype_auto_on_a_bf16_cpu_is_logged_and_recorded_in_the_manifest(
    tmp_path, tokenized, monkeypatch, caplog, fresh_accelerate
):
    """With the CPU features mocked (AMX-BF16), ``auto`` trains in bf16
    autocast on the CPU, and the manifest says what was asked, what it became and why."""
    from accelerate.state import AcceleratorState

    from pipeline import precision
    from stages.pretrain import main

    if torch.cuda.is_available():
        pytest.skip("the CPU rule applies without a GPU")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "amx_tile", "amx_bf16"}))
    monkeypatch.setenv("PIPELINE_PROGRESS", "0")
    monkeypatch.setenv("ACCELERATE_USE_CPU", os.environ.get("ACCELERATE_USE_CPU", "false"))  # the stage sets it
    cfg, run = _run_dir(tmp_path, tokenized, "bf16cpu", steps=5)
    assert main(["--config", str(cfg)]) == 0
    m = json.loads((run / "pretrain" / "manifest.json").read_text())
    assert m["dtype"] == {
        "requested": "auto",
        "resolved": "bfloat16",
        "device": "cpu",
        "cpu_bf16": "amx_bf16",
        "reason": "CPU with native bf16 (amx_bf16); pretrain uses it on amx_bf16",
    }
    assert math.isfinite(m["metrics"]["val_loss"])
    # the same CPU with AMX taken out of the stage's rule: float32, the feature still recorded
    monkeypatch.setitem(precision.CPU_AUTO_BF16, "pretrain", frozenset())
    AcceleratorState._reset_state()  # a new precision in the same process
    cfg, run = _run_dir(tmp_path, tokenized, "f32cpu", steps=5)
    assert main(["--config", str(cfg)]) == 0
    rec = json.loads((run / "pretrain" / "manifest.json").read_text())["dtype"]
    assert (rec["resolved"], rec["cpu_bf16"]) == ("float32", "amx_bf16")


@pytest.mark.timeout(60)
def test_time_to_loss_bench_quick_runs_at_a_microscopic_size(tmp_path, monkeypatch):
    """``bench/time_to_loss.py --quick`` end to end (sweep, alternating repeats, summary, JSON, PNG) on a model of
    one 16-wide layer for 6 steps; a few seconds. It checks the procedure, not any timing."""
    spec = importlib.util.spec_from_file_location("time_to_loss", ROOT / "bench" / "time_to_loss.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    args = ["--quick", "--data", str(_text()), "--max-chars", "8000", "--n-layer", "1", "--n-head", "1",
            "--n-embd", "16", "--block", "16", "--batch", "2", "--steps", "6", "--warmup", "2", "--eval-every", "3",
            "--lrs", "3e-3", "1e-2", "--out", str(tmp_path)]  # fmt: skip
    assert bench.main(args) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert [s["lr"] for s in r["sweep"]] == [3e-3, 1e-2]
    assert r["target_loss"] == min(s["final_val_loss"] for s in r["sweep"])
    assert r["best_lr"] == min(r["sweep"], key=lambda s: s["final_val_loss"])["lr"]
    assert list(r["summary"]) == ["reference-adamw-fp32", "adamw-fp32", "adamw-bf16", "muon-fp32", "muon-bf16"]
    assert r["summary"]["reference-adamw-fp32"]["ratio_to_reference"] == 1.0
    assert [run["config"] for run in r["runs"]] == list(r["summary"])  # one repeat, the reference first
    for run in r["runs"]:
        assert [p[0] for p in run["curve"]] == [3, 6] and all(math.isfinite(p[2]) for p in run["curve"])
        assert 0 < run["curve"][0][1] < run["curve"][1][1]  # training seconds grow, evaluation left out
    assert (tmp_path / "val_loss_vs_time.png").stat().st_size > 1000
