"""The run folder and the stage contract (see DESIGN.md).

    runs/<run>/<stage>/
      checkpoints/step_000400/   resumable state; written as step_000400.tmp, then renamed; last K kept
      artifact/                  the stage's output
      manifest.json              written last, atomically: the stage is done only when it exists
      metrics.jsonl, tb/         metrics as they happen

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
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .provenance import git_revision, package_versions

__all__ = [
    "STAGES",
    "KEY_METRICS",
    "CHECKPOINT_MARKER",
    "Checkpoint",
    "StageError",
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
_STEP_RE = re.compile(r"^step_(\d{6,})(\.tmp)?$")
_HF_RE = re.compile(r"^checkpoint-(\d+)$")


class StageError(RuntimeError):
    """A stage cannot run as asked (stale, missing input, corrupt checkpoint...); the message says why."""


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
        """Fingerprint of the config that started this (possibly partial) stage."""
        return self.root / "fingerprint.json"

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
        if not self.fingerprint_path.is_file():
            return None
        return json.loads(self.fingerprint_path.read_text()).get("fingerprint")

    def begin(self, fingerprint: str, config_yaml: str, force: bool = False) -> str:
        """Prepare the stage folder for a run with ``fingerprint``; returns the state found.

        done -> nothing to do (caller returns); stale or corrupt -> error unless ``force`` (then the old
        folder is moved aside, never deleted); partial with another fingerprint -> the same; missing with files
        left by a start with another fingerprint -> they are moved aside.
        """
        state = self.state(fingerprint)
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
        atomic_write_json(self.fingerprint_path, {"fingerprint": fingerprint})
        atomic_write_text(self.root / "config.yaml", config_yaml)
        return state

    def _leftovers(self) -> list[Path]:
        """What a failed start left besides its bookkeeping (kept: it may be someone's data)."""
        ours = {self.fingerprint_path.name, "config.yaml", self.metrics_path.name, self.tb.name}
        return [p for p in self.root.iterdir() if p.name not in ours] if self.root.is_dir() else []

    def _found_fingerprint(self) -> str:
        m = self.manifest()
        if m is not None:
            return str(m.get("fingerprint"))
        return str(self.started_fingerprint())

    def move_aside(self) -> Path:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = self.root.with_name(f"{self.root.name}.old-{stamp}")
        n = 1
        while dest.exists():
            dest = self.root.with_name(f"{self.root.name}.old-{stamp}-{n}")
            n += 1
        os.replace(self.root, dest)
        return dest

    def write_manifest(
        self,
        fingerprint: str,
        inputs: dict[str, str],
        config: dict[str, Any],
        metrics: dict[str, Any],
        wall_time_s: float,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        manifest = {
            "stage": self.stage,
            "fingerprint": fingerprint,
            "inputs": inputs,
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
