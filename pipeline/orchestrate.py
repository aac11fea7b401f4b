"""Pipeline orchestration: which stages a target needs, what state each is in, and launching them.

``python -m pipeline run ppo --config configs/tiny.yaml`` (or ``make ppo``) walks the stages ``ppo`` needs
in order (``lineage.stage_inputs``), and for each:

- **done** (manifest fingerprint matches): skipped, with a one-line message; nothing is imported or launched;
- **missing** or **partial** (checkpoints, no manifest): launched as a subprocess, which starts or resumes;
- **stale** (made with another config or other inputs): stops with a message naming each changed key
  (``sft.lr: 0.0005 -> 0.0001``) or input, unless forced (``FORCE=1``), which moves the old folder
  aside (``<stage>.old-<time>``) and never deletes anything;
- **broken** (artifact gone) or **corrupt** (unreadable manifest): stops naming the file, unless forced (moved aside);
- **running** (another process holds the stage folder's lock): stops at once naming that process
  (``runs.StageLocked``), forced or not.

The orchestrator takes no stage lock itself: the stage process it launches takes its own (``StageDir.begin``), and
moving a folder aside (``StageDir.move_aside``) takes it for the moment of the rename, so it is refused while
another process works on the stage.

Training stages run under ``accelerate launch`` with ``configs/accelerate/<launch>.yaml``; ``launch="cpu"``
and the tokenizer/export stages run as plain ``python -m stages.<stage>`` (fast start-up). A stage's state and
why it is stale come from ``pipeline.status``; a partial stage's checkpoint is checked (``pipeline.filecheck``)
before it resumes, and under ``launch=zero2|zero3`` its resume is refused before launching unless
``run.allow_pickle_checkpoints=true`` (DeepSpeed's checkpoint loader unpickles: ``pipeline.checkpoint``).

This module imports no torch: deciding that everything is done takes well under a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import pickle_resume_error
from .config import ConfigError, RunConfig, load_config
from .lineage import all_fingerprints, stage_inputs
from .publish import check_export_dir, missing_gguf, publish
from .runs import KEY_METRICS, STAGES, StageDir, StageError, StageLocked
from .status import StageStatus, format_value, run_status, stage_status

__all__ = [
    "LAUNCHES",
    "RunOptions",
    "plan",
    "stage_command",
    "run_pipeline",
    # re-exported for pipeline.report (their home: runs.KEY_METRICS, pipeline.status)
    "KEY_METRICS",
    "format_value",
    "run_status",
]

log = logging.getLogger(__name__)

LAUNCHES = ("cpu", "ddp", "zero2", "zero3")
_DEEPSPEED = ("zero2", "zero3")
"""Launches whose stage processes run DeepSpeed (its checkpoint loader unpickles: ``pipeline.checkpoint``)."""
_SINGLE_PROCESS = ("tokenizer", "export")
"""Stages that never need a distributed launcher."""


@dataclass(frozen=True)
class RunOptions:
    """How ``run_pipeline`` launches stages."""

    config_path: str | None = None
    overrides: tuple[str, ...] = ()
    launch: str = "cpu"
    """cpu | ddp | zero2 | zero3 (``configs/accelerate/<launch>.yaml``)."""
    nproc: int = 0
    """Processes per launch (0: the accelerate config's own ``num_processes``)."""
    force: bool = False
    """Move stale stage folders aside and run them again."""
    python: str = sys.executable
    module_prefix: str = "stages"
    """Package holding one entry module per stage (tests point this at fakes)."""
    accelerate_dir: str = "configs/accelerate"
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the stage processes."""


# ----------------------------------------------------------------------------- planning


def plan(cfg: RunConfig, target: str) -> list[str]:
    """The stages ``target`` needs, upstream first, ending with ``target`` ('all' = every stage).

    Raises:
        ConfigError: unknown target.
    """
    if target == "all":
        target = STAGES[-1]
    if target not in STAGES:
        raise ConfigError(f"unknown stage '{target}'; choose one of: all, {', '.join(STAGES)}")
    needed: set[str] = set()

    def visit(stage: str) -> None:
        if stage not in needed:
            needed.add(stage)
            for up in stage_inputs(cfg, stage):
                visit(up)

    visit(target)
    return [s for s in STAGES if s in needed]


# ----------------------------------------------------------------------------- launching


def stage_command(stage: str, opts: RunOptions, force: bool = False) -> list[str]:
    """The command line that runs ``stage`` under ``opts`` (see module docstring)."""
    if opts.launch not in LAUNCHES:
        raise ConfigError(f"LAUNCH={opts.launch!r} is not one of {', '.join(LAUNCHES)}")
    if opts.launch == "cpu" and opts.nproc > 1:
        raise ConfigError(f"LAUNCH=cpu runs one process (NPROC={opts.nproc}); use LAUNCH=ddp NPROC={opts.nproc}")
    args = ["--config", opts.config_path] if opts.config_path else []
    args += ["--force"] if force else []
    args += list(opts.overrides)
    module = f"{opts.module_prefix}.{stage}"
    if opts.launch == "cpu" or stage in _SINGLE_PROCESS:
        return [opts.python, "-m", module, *args]
    launcher = [
        opts.python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"{opts.accelerate_dir}/{opts.launch}.yaml",
    ]
    if opts.nproc > 0:
        launcher += ["--num_processes", str(opts.nproc)]
    return [*launcher, "-m", module, *args]


def _stale_error(st: StageStatus) -> StageError:
    changes = "\n".join(f"  - {c}" for c in st.changes)
    return StageError(
        f"stage '{st.stage}' in {st.path} was made with a different config or inputs; nothing was changed:\n{changes}\n"
        f"To make it again with the current config, run with FORCE=1 (`make {st.stage} FORCE=1`, or --force): the old "
        f"folder is moved aside to {st.path.name}.old-<time>/ (never deleted). Or choose another run.name."
    )


def _check_resumable(cfg: RunConfig, st: StageStatus, opts: RunOptions) -> None:
    """Refuse to resume from a corrupt latest checkpoint (with ``opts.force``, move the stage folder aside instead),
    and refuse a resume the launch would hand to DeepSpeed's unpickling loader unless
    ``run.allow_pickle_checkpoints`` (``pipeline.checkpoint.pickle_resume_error``: the stage process says the same,
    on every rank, when launched by hand)."""
    if st.state != "partial":
        return
    sd = StageDir.of(cfg.run_dir, st.stage)
    err = sd.corrupt_resume_error()
    if err is not None:
        if not opts.force:
            raise err
        log.info("%-9s corrupt checkpoint: stage folder moved aside to %s", st.stage, sd.move_aside())
        st.state, st.step = "missing", None
        return
    deepspeed = opts.launch in _DEEPSPEED and st.stage not in _SINGLE_PROCESS
    err = pickle_resume_error(sd, cfg.run.allow_pickle_checkpoints, deepspeed)
    if err is not None:
        raise err


def run_pipeline(target: str, opts: RunOptions) -> int:
    """Bring ``target`` (a stage or 'all') and everything it needs up to date.

    Returns:
        0 when every needed stage is done.

    Raises:
        ConfigError: bad config, override or launch option (``pretrain.optimizer=muon`` under ZeRO when pretraining
            has to run).
        StageError: a stale stage (without force), a broken done stage, a corrupt manifest or checkpoint, a resume
            under DeepSpeed without ``run.allow_pickle_checkpoints``, a stage that exited 0 without writing its
            manifest, or a failed stage (then ``returncode`` holds its exit code, 128+N when signal N stopped it).
    """
    cfg = load_config(opts.config_path, opts.overrides)
    fps = all_fingerprints(cfg)
    if target in ("all", "export") and cfg.export.dir:
        check_export_dir(cfg.export.dir, cfg.run_dir)  # before any stage runs
    stages = plan(cfg, target)
    launch_problems = cfg.pretrain.launch_problems(deepspeed=opts.launch in _DEEPSPEED)
    if launch_problems and "pretrain" in stages and stage_status(cfg, "pretrain", fps).state != "done":
        raise ConfigError("; ".join(launch_problems))  # before anything is launched; a done pretraining is skipped
    t_start = time.time()
    for stage in stages:
        st = stage_status(cfg, stage, fps)
        lacking = missing_gguf(cfg) if stage == "export" and st.state == "done" else []
        if st.state == "done" and not lacking:
            log.info("%-9s done, skipped (%s)", stage, st.path / "manifest.json")
            continue
        if lacking:  # `make export FORMAT=gguf` after `make all`: the stage adds them to the done export
            log.info("%-9s done; adding the GGUF files it lacks (%s)", stage, ", ".join(lacking))
        if st.holder is not None:  # the stage process would be refused too; say so before launching it
            raise StageLocked(st.path, st.holder)
        if st.state in ("broken", "corrupt"):
            if not opts.force:
                raise StageError(
                    f"stage '{stage}': {st.changes[0]}. Nothing was changed. Use FORCE=1 to move {st.path} aside "
                    f"(to {st.path.name}.old-<time>/, never deleted) and make the stage again."
                )
            log.info("%-9s %s, moved aside to %s", stage, st.state, StageDir.of(cfg.run_dir, stage).move_aside())
        if st.state == "stale" and not opts.force:
            raise _stale_error(st)
        _check_resumable(cfg, st, opts)
        cmd = stage_command(stage, opts, force=st.state == "stale")
        what = {
            "partial": f"resuming at step {st.step}"
            if st.step
            else "starting again (stopped before its first checkpoint)",
            "stale": "forced: moving the old folder aside",
            "done": "adding GGUF files",
        }.get(st.state, "starting")
        log.info("%-9s %s: %s", stage, what, " ".join(cmd))
        t0 = time.time()
        rc = _run_child(cmd, {**os.environ, **opts.env}, stage)
        if rc != 0:
            rc = 128 - rc if rc < 0 else rc
            raise _StageFailed(stage, rc, _disk_hint(cfg))
        after = stage_status(cfg, stage, fps)
        still = missing_gguf(cfg) if stage == "export" and after.state == "done" else []
        if still:
            raise StageError(f"stage 'export' exited 0 without the GGUF files {still} in {after.path}")
        if after.state != "done":
            raise StageError(
                f"stage '{stage}' exited 0 but is {after.state}: no manifest with fingerprint {fps[stage]} in {after.path}"
            )
        log.info("%-9s done in %.1fs -> %s", stage, time.time() - t0, after.path / "artifact")
    if target in ("all", "export") and cfg.export.dir:
        publish(StageDir.of(cfg.run_dir, "export").artifact, Path(cfg.export.dir), cfg.run_dir)
    log.info("%s: up to date (%.1fs)", target, time.time() - t_start)
    return 0


def _run_child(cmd: list[str], env: dict[str, str], stage: str) -> int:
    """Run a stage process to its end. Ctrl-C reaches it too (same process group): wait while it saves a
    checkpoint rather than killing it (what ``subprocess.run`` does); a second Ctrl-C terminates it, a third
    kills it. SIGTERM sent to this process is passed on, so the stage checkpoints and stops."""
    proc = subprocess.Popen(cmd, env=env)
    forward = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)) if forward else None
    interrupts = 0
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                interrupts += 1
                log.warning(
                    "%s: interrupted, waiting for the stage to save a checkpoint (Ctrl-C again to stop it)", stage
                )
                if interrupts == 2:
                    proc.terminate()
                elif interrupts > 2:
                    proc.kill()
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)


class _StageFailed(StageError):
    """A stage process ended with exit code ``rc`` != 0; above 128 a signal stopped it (after a checkpoint when
    it was SIGTERM/SIGINT: ``pipeline.training.Interrupted``), which needs no fix, only a new run."""

    def __init__(self, stage: str, rc: int, hint: str) -> None:
        if rc > 128:
            msg = (
                f"stage '{stage}' was interrupted by signal {rc - 128} (exit code {rc}){hint}; run the same command "
                f"again to resume. Earlier stages and its completed checkpoints are kept."
            )
        else:
            msg = (
                f"stage '{stage}' failed with exit code {rc}{hint}. Earlier stages and its completed checkpoints are "
                f"kept; fix the cause and run the same command again to resume."
            )
        super().__init__(msg)
        self.returncode = rc


def _disk_hint(cfg: RunConfig) -> str:
    try:
        root = cfg.run_dir if cfg.run_dir.exists() else Path(".")
        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    return f" (only {free / 2**20:.0f} MiB free on the disk holding {cfg.run_dir})" if free < 256 * 2**20 else ""
