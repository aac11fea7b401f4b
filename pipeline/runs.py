"""The run folder and the stage contract (see DESIGN.md).

    runs/<run>/<stage>/
      checkpoints/step_000400/   resumable state; written as step_000400.tmp, then renamed; last K kept
      artifact/                  the stage's output
      manifest.json              written last, atomically: the stage is done only when it exists
      metrics.jsonl, tb/         metrics as they happen

A stage is *done* when its manifest fingerprint matches, *stale* when a manifest exists with another
fingerprint, *partial* when checkpoints exist without a manifest, *missing* otherwise.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "STAGES",
    "StageError",
    "StageDir",
    "atomic_write_text",
    "atomic_write_json",
    "package_versions",
    "git_revision",
]

STAGES = ("tokenizer", "pretrain", "sft", "reward", "ppo", "export")
_CKPT_RE = re.compile(r"^step_(\d{6,})$")


class StageError(RuntimeError):
    """A stage cannot run as asked (stale, missing input, corrupt checkpoint...); the message says why."""


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


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "accelerate", "trl", "datasets", "tokenizers", "tiktoken", "deepspeed"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StageError(f"{self.manifest_path}: unreadable manifest ({e}); move the stage folder aside") from None

    def state(self, fingerprint: str) -> str:
        """'done', 'stale', 'partial' or 'missing' for a stage that would run with ``fingerprint``."""
        m = self.manifest()
        if m is not None:
            return "done" if m.get("fingerprint") == fingerprint else "stale"
        if self.latest_checkpoint() is not None or self.fingerprint_path.exists():
            return "partial"
        return "missing"

    def started_fingerprint(self) -> str | None:
        if not self.fingerprint_path.is_file():
            return None
        return json.loads(self.fingerprint_path.read_text()).get("fingerprint")

    def begin(self, fingerprint: str, config_yaml: str, force: bool = False) -> str:
        """Prepare the stage folder for a run with ``fingerprint``; returns the state found.

        done -> nothing to do (caller returns); stale -> error unless ``force`` (then the old
        folder is moved aside, never deleted); partial with another fingerprint -> the same.
        """
        state = self.state(fingerprint)
        if state == "partial" and self.started_fingerprint() not in (None, fingerprint):
            state = "stale"
        if state == "stale":
            if not force:
                raise StageError(
                    f"stage '{self.stage}' in {self.root} was made with a different config or inputs "
                    f"(fingerprint {self._found_fingerprint()} != {fingerprint}). Nothing was changed. "
                    f"Use FORCE=1 (--force) to move the old folder aside and start again, or choose another run.name."
                )
            moved = self.move_aside()
            state = "missing"
            del moved
        if state == "done":
            return state
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.fingerprint_path, {"fingerprint": fingerprint})
        atomic_write_text(self.root / "config.yaml", config_yaml)
        return state

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

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (``.tmp`` folders from interrupted writes are ignored), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / "COMPLETE").exists():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.list_checkpoints()
        return ckpts[-1][1] if ckpts else None

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
        tmp = self.checkpoints / f"step_{step:06d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def publish_checkpoint(self, tmp: Path, step: int, keep: int) -> Path:
        """Fsync ``tmp``, mark it complete, rename it to ``step_NNNNNN`` and keep only the newest ``keep``."""
        final = self.checkpoints / f"step_{step:06d}"
        _fsync_tree(tmp)
        (tmp / "COMPLETE").write_text(f"{time.time()}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in self.list_checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

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


WriteFn = Callable[[Path], None]
