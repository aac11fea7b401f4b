"""The stage folder's lock: one process at a time works on a stage; a second is refused at once, naming the
holder; the lock goes with the holder's death (SIGKILL included); FORCE never moves a folder another process holds.

The holder is a real second process (``python holder.py <stage folder>``) that takes the lock through the same
API a stage uses and sleeps.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.lineage import all_fingerprints
from pipeline.orchestrate import RunOptions, run_pipeline
from pipeline.runs import LOCK_FILE, StageDir, StageLocked, lock_holder
from pipeline.status import run_status

REPO = Path(__file__).resolve().parents[1]
HOLDER = """\
import sys, time
from pipeline.runs import StageDir
sd = StageDir(__import__("pathlib").Path(sys.argv[1]))
if len(sys.argv) > 2:
    sd.begin(sys.argv[2], "from: holder\\n")  # what a stage's main process does: lock, then write
else:
    sd.lock()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def hold(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start a process holding a stage folder's lock: ``hold(root)``, or ``hold(root, fingerprint)`` to ``begin``."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    procs: list[subprocess.Popen] = []

    def start(root: Path, fingerprint: str | None = None) -> subprocess.Popen:
        cmd = [sys.executable, str(script), str(root), *([fingerprint] if fingerprint else [])]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _stale_stage(root: Path) -> StageDir:
    """A done stage made with fingerprint fp1 (stale for fp2)."""
    sd = StageDir(root)
    sd.begin("fp1", "a: 1\n")
    sd.artifact.mkdir()
    (sd.artifact / "weights").write_text("w")
    sd.write_manifest("fp1", {}, {}, {"train_loss": 1.0}, 1.0)
    sd.unlock()
    return sd


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path, hold):
    sd = StageDir.of(tmp_path / "runs/tiny", "sft")
    proc = hold(sd.root)
    t0 = time.time()
    with pytest.raises(StageLocked) as e:
        sd.begin("fp", "a: 1\n")
    assert time.time() - t0 < 1.0  # at once: no waiting for the holder
    msg = str(e.value)
    assert re.fullmatch(
        rf"{re.escape(str(sd.root))} is in use by PID {proc.pid} \(\S*python\S* \S*holder\.py {re.escape(str(sd.root))}\) "
        r"since \d\d:\d\d:\d\d; wait for it or stop it",
        msg,
    ), msg
    assert e.value.holder is not None and e.value.holder.pid == proc.pid
    assert not sd.fingerprint_path.exists() and not (sd.root / "config.yaml").exists()  # nothing written
    assert lock_holder(sd.root).pid == proc.pid and sd.holder().pid == proc.pid


def test_the_lock_file_records_pid_command_and_start_time(tmp_path, hold):
    root = tmp_path / "sft"
    before = time.time()
    proc = hold(root)
    rec = json.loads((root / LOCK_FILE).read_text())
    assert rec["pid"] == proc.pid
    assert rec["argv"] == [str(tmp_path / "holder.py"), str(root)]
    assert rec["command"].endswith(f"holder.py {root}") and "python" in rec["command"]
    assert before - 2 <= datetime.fromisoformat(rec["started_at"]).timestamp() <= time.time()
    assert rec["host"]


def test_the_lock_goes_with_a_sigkilled_holder(tmp_path, hold):
    sd = StageDir(tmp_path / "sft")
    proc = hold(sd.root)
    with pytest.raises(StageLocked):
        sd.lock()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (sd.root / LOCK_FILE).exists()  # the file outlives its holder; it means nothing unlocked
    assert lock_holder(sd.root) is None
    assert sd.begin("fp", "a: 1\n") == "missing"  # taken at once
    assert json.loads(sd.lock_path.read_text())["pid"] == os.getpid()
    sd.unlock()
    assert lock_holder(sd.root) is None


def test_force_never_moves_a_folder_another_process_holds(tmp_path, hold):
    sd = _stale_stage(tmp_path / "run/sft")
    proc = hold(sd.root)
    for attempt in (lambda: sd.begin("fp2", "a: 2\n", force=True), sd.move_aside):
        with pytest.raises(StageLocked, match=rf"is in use by PID {proc.pid} .*; wait for it or stop it"):
            attempt()
    assert not list(sd.root.parent.glob("sft.old-*")) and (sd.artifact / "weights").read_text() == "w"
    proc.kill()
    proc.wait()
    assert sd.begin("fp2", "a: 2\n", force=True) == "missing"  # free again: moved aside, never deleted
    assert [p.name.split(".old-")[0] for p in sd.root.parent.glob("sft.old-*")] == ["sft"]
    sd.unlock()


def test_a_stage_that_forces_itself_keeps_the_lock_on_the_new_folder(tmp_path):
    sd = _stale_stage(tmp_path / "sft")
    assert sd.begin("fp2", "a: 2\n", force=True) == "missing"
    assert sd.holds_lock and json.loads(sd.lock_path.read_text())["pid"] == os.getpid()
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from pipeline.runs import lock_holder; print(lock_holder(sys.argv[1]).pid)"]
        + [str(sd.root)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    assert probe.stdout.strip() == str(os.getpid())  # another process sees this one holding the new folder
    old = next(sd.root.parent.glob("sft.old-*"))
    assert lock_holder(old) is None  # the old folder's lock was let go
    sd.unlock()
    assert lock_holder(sd.root) is None


def test_orchestrator_and_status_see_the_running_stage(tmp_path, hold, capsys):
    overrides = (f"run.root={tmp_path / 'runs'}",)
    cfg = load_config(None, overrides)
    tok = StageDir.of(cfg.run_dir, "tokenizer")
    proc = hold(tok.root, all_fingerprints(cfg)["tokenizer"])
    line = {s.stage: s for s in run_status(cfg)}["tokenizer"].line()
    assert line.startswith(f"tokenizer  running (PID {proc.pid})"), line
    log = tmp_path / "launches.log"
    opts = RunOptions(
        None,
        overrides,
        force=True,
        module_prefix="tests.fake_stages",
        env={"PYTHONPATH": str(REPO), "FAKE_LOG": str(log)},
    )
    with pytest.raises(StageLocked, match=rf"{re.escape(str(tok.root))} is in use by PID {proc.pid} "):
        run_pipeline("tokenizer", opts)
    assert not log.exists()  # refused before launching anything


def test_ranks_other_than_the_main_process_take_no_lock(tmp_path, hold, monkeypatch, capsys):
    from pipeline.stage import StageResult, run_stage

    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")  # run_stage sets it: restored afterwards
    overrides = [f"run.root={tmp_path / 'runs'}"]
    cfg = load_config(None, overrides)
    tok = StageDir.of(cfg.run_dir, "tokenizer")
    proc = hold(tok.root, all_fingerprints(cfg)["tokenizer"])  # rank 0: locked, fingerprint.json written
    ran: list[str] = []

    def body(ctx):
        ran.append(ctx.state)
        return StageResult(metrics={})

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_stage("tokenizer", list(overrides), body) == 0  # rank 1 works beside rank 0's lock
    assert ran == ["missing"] and lock_holder(tok.root).pid == proc.pid
    monkeypatch.setenv("RANK", "0")
    assert run_stage("tokenizer", list(overrides), body) == 2  # a second rank 0 (another launch) is refused
    assert f"is in use by PID {proc.pid}" in capsys.readouterr().err and ran == ["missing"]


def test_a_probe_of_status_does_not_make_a_starting_stage_fail(tmp_path):
    """``lock_holder`` holds a shared lock for a moment; a stage taking the lock meanwhile tries again."""
    root = tmp_path / "sft"
    root.mkdir()
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what the probe does, for 0.1 s instead of microseconds
    timer = threading.Timer(0.1, os.close, (fd,))
    timer.start()
    try:
        StageDir(root).lock()
    finally:
        timer.join()
    assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()
    StageDir(root).unlock()


def test_moving_aside_a_folder_that_was_never_a_stage_leaves_no_lock_file_in_it(tmp_path):
    """``publish`` moves an export destination aside: the user's folder goes as it was."""
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "weights").write_text("theirs")
    moved = StageDir(dest).move_aside()
    assert sorted(p.name for p in moved.iterdir()) == ["weights"] and not dest.exists()
    assert not StageDir(dest).holds_lock
