"""The run folder and the stage contract (see DESIGN.md).

    runs/<run>/<stage>/
      .lock                      held (flock) by the process working on the stage: PID, command, start time
      fingerprint.json           the fingerprint of the start, its upstream fingerprints and user-file hashes
      checkpoints/step_000400/   resumable state; written as step_000400.tmp, then renamed; last K kept
      artifact/                  the stage's output
      manifest.json              written last, atomically: the stage is done only when it exists
      metrics.jsonl, tb/         metrics as they happen
    runs/<run>/.input_hashes.json  content hashes of the user's files, by path, size and mtime (pipeline.lineage)

A stage is *done* when its manifest fingerprint matches, *stale* when a manifest exists with another
fingerprint (or a partial run was started with another one), *partial* when checkpoints exist without a
manifest, *corrupt* when its manifest cannot be read, *missing* otherwise: a folder with neither checkpoint nor
manifest (a start that failed before its first checkpoint) is fresh whatever its ``fingerprint.json`` says.

Checkpoints: ``StageDir`` alone names, finds, ranks and removes them. Two kinds live in ``checkpoints/``:

- ``step_000400/``: our own loops (pretrain, PPO), written as ``step_000400.tmp/`` and renamed once complete
  (:meth:`StageDir.writing_checkpoint`); the step is zero-padded to 6 digits;
- ``checkpoint-400/``: a Hugging Face ``Trainer``'s (SFT, reward), which names and writes them itself, in place.
  Mapping: ``checkpoint-N`` is step N, like ``step_N``; it counts as complete once ``CheckpointMarker``
  (``pipeline.training``) has written the ``COMPLETE`` marker into it and the Trainer's ``trainer_state.json``
  is there.

Either kind is complete only with the ``COMPLETE`` marker; anything else there (a ``.tmp`` folder, an unmarked
``checkpoint-N``) is incomplete: never resumed from, removed by :meth:`StageDir.remove_incomplete_checkpoints`.

The lock: one process at a time works on a stage folder. :meth:`StageDir.begin` (the main process of a stage,
before its first write) and :meth:`StageDir.move_aside` (``FORCE=1``) take ``<stage>/.lock`` with
``flock(LOCK_EX | LOCK_NB)``; the lock file holds the holder's PID, command line and start time. A second
process is refused at once with :class:`StageLocked`, naming them (``runs/tiny/sft is in use by PID 1234
(python -m stages.sft ...) since 12:01:02; wait for it or stop it``). The kernel drops the lock when the holder
exits, however it exits (SIGKILL included): the file left behind means nothing unless locked. Only the main
process (rank 0) of a distributed launch takes it; the orchestrator never does (it launches the stage, which
does). :func:`lock_holder` tells who holds it without taking it (``make status``: ``running (PID n)``).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .filecheck import check_checkpoint
from .provenance import git_revision, package_versions

__all__ = [
    "STAGES",
    "KEY_METRICS",
    "CHECKPOINT_MARKER",
    "LOCK_FILE",
    "Checkpoint",
    "StageError",
    "StageLocked",
    "LockHolder",
    "lock_holder",
    "Interrupted",
    "signal_name",
    "StageDir",
    "hf_checkpoint_dir",
    "atomic_write_text",
    "atomic_write_json",
]

log = logging.getLogger(__name__)

STAGES = ("tokenizer", "pretrain", "sft", "reward", "ppo", "export")
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("vocab_size",),
    "pretrain": ("train_loss", "val_loss", "tokens", "tokens_per_s"),
    "sft": ("train_loss", "val_loss", "checker_accuracy"),
    "reward": ("pair_accuracy",),
    "ppo": ("reward_mean", "sft_reward_mean", "kl", "checker_accuracy"),
    "export": ("max_abs_logit_diff", "n_params"),
}
"""The metrics each stage's manifest reports under fixed names (DESIGN.md), for tools: status, report, model card."""
CHECKPOINT_MARKER = "COMPLETE"
"""File written into a checkpoint folder once it is complete."""
TRAINER_STATE = "trainer_state.json"
"""The loop state in a checkpoint: ours (``pipeline.checkpoint``) and the HF Trainer's share the name."""
LOCK_FILE = ".lock"
"""The stage folder's lock file (see the module docstring)."""
_STEP_RE = re.compile(r"^step_(\d{6,})(\.tmp)?$")
_HF_RE = re.compile(r"^checkpoint-(\d+)$")


class StageError(RuntimeError):
    """A stage cannot run as asked (stale, missing input, corrupt checkpoint...); the message says why."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a stage folder's lock, as its lock file records it."""

    pid: int | None
    command: str
    """The holder's command line (``sys.orig_argv``), shell-quoted."""
    started_at: str
    """When it took the lock: ISO 8601 with the UTC offset ('' when unknown)."""
    host: str = ""

    def describe(self) -> str:
        """``PID 1234 (python -m stages.sft --config c.yaml) since 12:01:02``; the date too when not today, the
        host when not this one."""
        pid = f"PID {self.pid}" if self.pid is not None else "another process"
        out = f"{pid} ({self.command or 'command unknown'})"
        if self.host and self.host != socket.gethostname():
            out += f" on {self.host}"
        try:
            when = _dt.datetime.fromisoformat(self.started_at).astimezone()
        except (TypeError, ValueError):
            return out
        today = when.date() == _dt.datetime.now().astimezone().date()
        return out + f" since {when.strftime('%H:%M:%S' if today else '%Y-%m-%d %H:%M:%S')}"


class StageLocked(StageError):
    """Another process holds the stage folder's lock: ``runs/tiny/sft is in use by PID 1234 (python -m
    stages.sft --config c.yaml) since 12:01:02; wait for it or stop it``."""

    def __init__(self, root: Path, holder: LockHolder | None) -> None:
        who = holder.describe() if holder else "another process"
        super().__init__(f"{root} is in use by {who}; wait for it or stop it")
        self.root = Path(root)
        self.holder = holder


class Interrupted(Exception):
    """A stop signal ended training early; a checkpoint was saved first.

    ``run_stage`` prints ``interrupted: <message>`` to stderr, e.g. ``interrupted: sft stopped by SIGTERM at step
    40; a checkpoint was saved in runs/tiny/sft/checkpoints. Run the same command again to resume.``, and exits
    with :attr:`exit_code` (128 + the signal number, as a shell reports a process killed by that signal), so
    the orchestrator knows the stage can resume.
    """

    def __init__(self, stage: str, step: int, signum: int, checkpoint_dir: Path | str) -> None:
        super().__init__(
            f"{stage} stopped by {signal_name(signum)} at step {step}; a checkpoint was saved in "
            f"{checkpoint_dir}. Run the same command again to resume."
        )
        self.stage = stage
        self.step = step
        self.signum = signum
        self.checkpoint_dir = Path(checkpoint_dir)
        self.exit_code = 128 + signum


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15; ``"signal N"`` for a number that names no signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ----------------------------------------------------------------------------- the stage lock

_LOCK_TRIES = 6
_LOCK_RETRY_S = 0.05
"""A refused attempt is tried again for a quarter of a second: :func:`lock_holder`'s probe holds a shared lock
for microseconds, which must not make a stage fail; a real holder holds it for minutes."""


@dataclass
class _Held:
    fd: int
    path: Path


_held: dict[str, _Held] = {}
"""Stage folders (real path) whose lock this process holds: taking it again is a no-op (a second ``flock`` on
another descriptor would refuse this very process)."""


def _lock_key(root: Path) -> str:
    return os.path.realpath(root)


def _holder_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "argv": list(sys.argv),
        "started_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
    }


def _parse_holder(text: str) -> LockHolder | None:
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    pid = rec.get("pid")
    return LockHolder(
        pid if isinstance(pid, int) else None,
        str(rec.get("command", "")),
        str(rec.get("started_at", "")),
        str(rec.get("host", "")),
    )


def _read_holder(path: Path) -> LockHolder | None:
    """The lock file's record; tried a few times, as a holder writes it just after taking the lock."""
    for attempt in range(_LOCK_TRIES):
        try:
            holder = _parse_holder(path.read_text())
        except OSError:
            holder = None
        if holder is not None and holder.pid is not None:
            return holder
        if attempt < _LOCK_TRIES - 1:
            time.sleep(_LOCK_RETRY_S)
    return None


def _take_lock(root: Path) -> _Held:
    """Take ``root/.lock`` (creating ``root``) or raise :class:`StageLocked`; write this process's record into it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    for attempt in range(_LOCK_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if attempt < _LOCK_TRIES - 1:
                time.sleep(_LOCK_RETRY_S)
                continue
            raise StageLocked(root, _read_holder(path)) from None
        try:  # the folder may have been moved aside between open() and flock(): lock the file there now
            st = os.stat(path)
            same = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        data = (json.dumps(_holder_record(), indent=2) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return _Held(fd, path)
    raise StageLocked(root, _read_holder(path))


def lock_holder(root: str | Path) -> LockHolder | None:
    """Who holds ``root/.lock`` now (this process included), or None when nobody does. Takes nothing for more
    than a moment (a shared lock, released at once), and creates nothing."""
    path = Path(root) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(path) or LockHolder(None, "", "")
    finally:
        os.close(fd)  # closing the only descriptor of this open file releases the probe's shared lock
    return None


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder found in ``checkpoints/``."""

    step: int
    path: Path
    kind: str
    """``step`` (ours: ``step_000400``) or ``hf`` (a Trainer's ``checkpoint-400``)."""
    complete: bool


def hf_checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The folder a Hugging Face ``Trainer`` with ``output_dir`` saves step ``step`` into."""
    return Path(output_dir) / f"checkpoint-{step}"


def _read_checkpoint(p: Path) -> Checkpoint | None:
    if not p.is_dir():
        return None
    marked = (p / CHECKPOINT_MARKER).is_file()
    if m := _STEP_RE.match(p.name):
        return Checkpoint(int(m.group(1)), p, "step", marked and not m.group(2))
    if m := _HF_RE.match(p.name):
        return Checkpoint(int(m.group(1)), p, "hf", marked and (p / TRAINER_STATE).is_file())
    return None


@dataclass(frozen=True)
class StageDir:
    """Paths and state of one stage of one run."""

    root: Path
    """runs/<run>/<stage>"""

    @classmethod
    def of(cls, run_dir: str | Path, stage: str) -> StageDir:
        return cls(Path(run_dir) / stage)

    @property
    def stage(self) -> str:
        return self.root.name

    @property
    def artifact(self) -> Path:
        return self.root / "artifact"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def fingerprint_path(self) -> Path:
        """Fingerprint of the config that started this (possibly partial) stage, and the content hashes of the
        user files it read (``contents``: ``pipeline.lineage.input_contents``)."""
        return self.root / "fingerprint.json"

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    # ------------------------------------------------------------------ the lock

    def lock(self) -> None:
        """Take this stage folder's lock for this process (a no-op when it holds it already), creating the folder.

        Held until :meth:`unlock` or until the process exits (the kernel releases it then, even after SIGKILL).

        Raises:
            StageLocked: another process holds it; the message names the folder, its PID, command and start time.
        """
        key = _lock_key(self.root)
        held = _held.get(key)
        if held is not None:
            try:
                st = os.stat(held.path)
                if (st.st_dev, st.st_ino) == (os.fstat(held.fd).st_dev, os.fstat(held.fd).st_ino):
                    return
            except OSError:
                pass
            self._release(key)  # the folder was moved away under us: lock the one at this path now
        _held[key] = _take_lock(self.root)

    def unlock(self) -> None:
        """Release this process's lock on the folder, if it holds it."""
        self._release(_lock_key(self.root))

    @staticmethod
    def _release(key: str) -> None:
        held = _held.pop(key, None)
        if held is not None:
            os.close(held.fd)  # closing the descriptor releases the flock

    @property
    def holds_lock(self) -> bool:
        """Whether this process holds the folder's lock."""
        return _lock_key(self.root) in _held

    def holder(self) -> LockHolder | None:
        """Another process that holds the folder's lock now, or None (this process's own lock is not reported)."""
        if self.holds_lock:
            return None
        return lock_holder(self.root)

    # ------------------------------------------------------------------ manifest / state

    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StageError(f"{self.manifest_path}: unreadable manifest ({e}); {self.corrupt_fix}") from None
        if not isinstance(m, dict):
            raise StageError(f"{self.manifest_path}: not a manifest (a JSON {type(m).__name__}); {self.corrupt_fix}")
        return m

    @property
    def corrupt_fix(self) -> str:
        return f"move {self.root} aside (mv {self.root} {self.root}.corrupt) or run the stage with FORCE=1 (--force)"

    def state(self, fingerprint: str) -> str:
        """'done', 'stale', 'partial', 'corrupt' or 'missing' for a stage that would run with ``fingerprint``.

        A partial run started with another fingerprint is stale: resuming it would mix two configs. Without a
        checkpoint there is nothing to resume, so the stage is missing whatever ``fingerprint.json`` says.
        """
        try:
            m = self.manifest()
        except StageError:
            return "corrupt"
        if m is not None:
            return "done" if m.get("fingerprint") == fingerprint else "stale"
        if self.latest_checkpoint() is not None:
            return "partial" if self.started_fingerprint() in (None, fingerprint) else "stale"
        return "missing"

    def started_fingerprint(self) -> str | None:
        return self.started().get("fingerprint")

    def started(self) -> dict[str, Any]:
        """``fingerprint.json``: ``fingerprint``, ``inputs`` (upstream stage -> fingerprint) and ``contents`` (user
        file -> content hash); {} without one."""
        if not self.fingerprint_path.is_file():
            return {}
        try:
            rec = json.loads(self.fingerprint_path.read_text())
        except (OSError, ValueError):
            return {}
        return rec if isinstance(rec, dict) else {}

    def begin(
        self,
        fingerprint: str,
        config_yaml: str,
        force: bool = False,
        contents: dict[str, str] | None = None,
        inputs: dict[str, str] | None = None,
    ) -> str:
        """Take the folder's lock, then prepare it for a run with ``fingerprint``; returns the state found.

        done -> nothing to do (caller returns); stale or corrupt -> error unless ``force`` (then the old
        folder is moved aside, never deleted); partial with another fingerprint -> the same; missing with files
        left by a start with another fingerprint -> they are moved aside. ``contents`` (the content hashes of the
        user files the stage reads) and ``inputs`` (the upstream stages' fingerprints it consumes) go into
        ``fingerprint.json`` beside the fingerprint, so ``make status`` can say what changed since, even for a
        stage that never finished.

        Raises:
            StageLocked: another process works on this stage (nothing was changed).
            StageError: stale or corrupt without ``force``.
        """
        if not self.holds_lock and self.state(fingerprint) == "done":
            return "done"  # nothing will be written: no lock needed
        self.lock()
        state = self.state(fingerprint)  # again, under the lock: another process may have changed it
        if state == "corrupt" and not force:
            self.manifest()  # raises, naming the file and the fix
        if state in ("stale", "corrupt"):
            if not force:
                raise StageError(
                    f"stage '{self.stage}' in {self.root} was made with a different config or inputs "
                    f"(fingerprint {self._found_fingerprint()} != {fingerprint}). Nothing was changed. "
                    f"Use FORCE=1 (--force) to move the old folder aside and start again, or choose another run.name."
                )
            self.move_aside()
            state = "missing"
        elif state == "missing" and self._leftovers() and self.started_fingerprint() != fingerprint:
            log.warning("%s: a start with another config left files; moved aside to %s", self.root, self.move_aside())
        if state == "done":
            return state
        self.root.mkdir(parents=True, exist_ok=True)
        if state == "missing":  # a start cut off before its first checkpoint: clear what it half wrote
            self.remove_incomplete_checkpoints()
            self.truncate_metrics_after(0)
        if self.artifact.exists():  # not done, so written by a run cut off before its manifest: never complete
            log.info("%s: removing the artifact an interrupted run left unfinished (%s)", self.stage, self.artifact)
            if self.artifact.is_dir():
                shutil.rmtree(self.artifact)
            else:
                self.artifact.unlink()
        atomic_write_json(
            self.fingerprint_path, {"fingerprint": fingerprint, "inputs": inputs or {}, "contents": contents or {}}
        )
        atomic_write_text(self.root / "config.yaml", config_yaml)
        return state

    def _leftovers(self) -> list[Path]:
        """What a failed start left besides its bookkeeping (kept: it may be someone's data)."""
        ours = {self.fingerprint_path.name, "config.yaml", self.metrics_path.name, self.tb.name, LOCK_FILE}
        return [p for p in self.root.iterdir() if p.name not in ours] if self.root.is_dir() else []

    def _found_fingerprint(self) -> str:
        m = self.manifest()
        if m is not None:
            return str(m.get("fingerprint"))
        return str(self.started_fingerprint())

    def move_aside(self) -> Path:
        """Rename the folder to ``<stage>.old-<time>`` (never delete it) and return the new path.

        Done under the folder's lock: refused while another process holds it. A process that held the lock
        before (a stage forcing itself) holds the lock of a fresh, empty folder at the old path afterwards. A
        folder that had no lock file (never a stage's: ``publish`` moves an export destination aside) is moved
        as it was, without one.

        Raises:
            StageLocked: another process works on this stage (nothing was moved).
        """
        had_lock = self.holds_lock
        lockable = self.root.is_dir()
        created = lockable and not self.lock_path.exists()
        key = _lock_key(self.root)
        if lockable:
            self.lock()
        try:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            dest = self.root.with_name(f"{self.root.name}.old-{stamp}")
            n = 1
            while dest.exists():
                dest = self.root.with_name(f"{self.root.name}.old-{stamp}-{n}")
                n += 1
            os.replace(self.root, dest)
            if created:  # after the rename: anyone who opened it meanwhile finds it gone and looks again
                (dest / LOCK_FILE).unlink()
        except BaseException:
            if not had_lock:
                self.unlock()
            raise
        old = _held.pop(key, None)
        try:
            if had_lock:  # take the new folder's lock before letting go of the old one: no gap for another process
                _held[key] = _take_lock(self.root)
        finally:
            if old is not None:
                os.close(old.fd)
        return dest

    def write_manifest(
        self,
        fingerprint: str,
        inputs: dict[str, str],
        config: dict[str, Any],
        metrics: dict[str, Any],
        wall_time_s: float,
        extra: dict[str, Any] | None = None,
        contents: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Write ``manifest.json`` (last, atomically): ``inputs`` are the upstream stages' fingerprints consumed,
        ``contents`` the content hashes of the user files read (``input_contents``)."""
        manifest = {
            "stage": self.stage,
            "fingerprint": fingerprint,
            "inputs": inputs,
            "input_contents": contents or {},
            "config": config,
            "metrics": metrics,
            "wall_time_s": round(wall_time_s, 3),
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "artifact": str(self.artifact),
            "versions": package_versions(),
            "git_revision": git_revision(),
            **(extra or {}),
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    # ------------------------------------------------------------------ checkpoints

    def find_checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint folder of either kind, complete or not, oldest first (see the module docstring)."""
        if not self.checkpoints.is_dir():
            return []
        found = [c for p in self.checkpoints.iterdir() if (c := _read_checkpoint(p)) is not None]
        return sorted(found, key=lambda c: (c.step, c.kind, c.path.name))

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, folder), oldest first."""
        return [(c.step, c.path) for c in self.find_checkpoints() if c.complete]

    def latest_complete(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        done = [c for c in self.find_checkpoints() if c.complete]
        return done[-1] if done else None

    def latest_checkpoint(self) -> Path | None:
        """The folder of the newest complete checkpoint, or None."""
        ckpt = self.latest_complete()
        return ckpt.path if ckpt else None

    def corrupt_resume_error(self) -> StageError | None:
        """The error to give before resuming from the newest complete checkpoint when its files are cut off or
        corrupt (``pipeline.filecheck``: nothing is loaded), with the fix; None when it looks sound or there is none.
        The orchestrator and a stage run as a module (``python -m stages.sft``) give the same message."""
        ckpt = self.latest_checkpoint()
        problems = check_checkpoint(ckpt) if ckpt is not None else []
        if not problems:
            return None
        return StageError(
            f"stage '{self.stage}' would resume from {ckpt}, which is corrupt:\n  - "
            + "\n  - ".join(problems[:5])
            + f"\nNothing was changed. Move it aside (mv {ckpt} {ckpt}.corrupt) to resume from the checkpoint "
            f"before it, or use FORCE=1 to start the stage again (the old folder is moved aside, not deleted)."
        )

    def remove_incomplete_checkpoints(self) -> list[Path]:
        """Delete incomplete checkpoint folders (writes cut off by a kill); returns them. Main process only."""
        removed = []
        for c in self.find_checkpoints():
            if not c.complete:
                shutil.rmtree(c.path, ignore_errors=True)
                removed.append(c.path)
        if removed:
            log.warning("removed %d incomplete checkpoint(s): %s", len(removed), ", ".join(p.name for p in removed))
        return removed

    def progress(self) -> tuple[int | None, int | None]:
        """(step, total steps) of the newest complete checkpoint, for a partial stage's status line.

        The step is None without a complete checkpoint; the total is the ``max_steps`` its
        ``trainer_state.json`` records (the HF Trainer's does), else None.
        """
        ckpt = self.latest_complete()
        if ckpt is None:
            return None, None
        try:
            total = json.loads((ckpt.path / TRAINER_STATE).read_text()).get("max_steps")
        except (OSError, json.JSONDecodeError, AttributeError):
            total = None
        return ckpt.step, total if isinstance(total, int) and total > 0 else None

    @contextmanager
    def writing_checkpoint(self, step: int, keep: int) -> Iterator[Path]:
        """Yield a temporary folder to write checkpoint ``step`` into; on success it is marked
        complete and renamed into place, then only the newest ``keep`` are kept.

        A crash inside the block leaves only a ``.tmp`` folder, which is never loaded and is
        cleared by the next write.
        """
        tmp = self.checkpoint_tmp(step)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.publish_checkpoint(tmp, step, keep)

    def checkpoint_tmp(self, step: int) -> Path:
        """A fresh temporary folder for checkpoint ``step`` (a leftover one from a crash is cleared)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path(step).with_suffix(".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def publish_checkpoint(self, tmp: Path, step: int, keep: int) -> Path:
        """Fsync ``tmp``, mark it complete, rename it to ``step_NNNNNN`` and keep only the newest ``keep``."""
        final = self.checkpoint_path(step)
        _fsync_tree(tmp)
        (tmp / CHECKPOINT_MARKER).write_text(f"{time.time()}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ours = [c.path for c in self.find_checkpoints() if c.complete and c.kind == "step"]
        for old in ours[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def checkpoint_path(self, step: int) -> Path:
        """Where our own loops' checkpoint of ``step`` goes: ``checkpoints/step_000400``."""
        return self.checkpoints / f"step_{step:06d}"

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop metric lines written after the checkpoint we resume from."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.metrics_path, "".join(x + "\n" for x in keep))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def require_done(stage_dir: StageDir, what: str) -> dict[str, Any]:
    """The manifest of an upstream stage, or a clear error when it has not finished."""
    m = stage_dir.manifest()
    if m is None or not stage_dir.artifact.is_dir():
        raise StageError(
            f"{what} needs the '{stage_dir.stage}' stage's artifact at {stage_dir.artifact}, which does not exist "
            f"(no manifest at {stage_dir.manifest_path}). Run `make {stage_dir.stage}` first, or name a model with init_from."
        )
    return m
