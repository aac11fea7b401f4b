"""Plumbing shared by the stages built on the Hugging Face ``Trainer`` (SFT and reward).

- device: without GPUs, tell the Trainer to use the CPU (accelerate's gloo mode), except under DeepSpeed,
  which needs a gloo process group of its own (see ``pipeline.stage.use_cpu_when_no_gpu``);
- checkpoints: the Trainer writes ``checkpoint-N`` folders in place, so a kill mid-write would leave a
  folder that looks like a checkpoint. ``CheckpointMarker`` writes a ``COMPLETE`` file once every process
  has finished saving; only marked folders are resumed from, unmarked ones are removed before training.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

__all__ = [
    "CHECKPOINT_MARKER",
    "CheckpointMarker",
    "checkpoint_step",
    "context_length",
    "cpu_without_deepspeed",
    "deepspeed_launch",
    "deepspeed_on_cpu_state",
    "latest_complete_checkpoint",
    "remove_incomplete_checkpoints",
]

log = logging.getLogger(__name__)
CHECKPOINT_MARKER = "COMPLETE"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def context_length(model: Any) -> int | None:
    """The model's maximum sequence length from its config (GPT-2's n_positions, or max_position_embeddings)."""
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def cpu_without_deepspeed() -> bool:
    """Whether the Trainer should be told to use the CPU.

    Without a GPU, accelerate forms a multi-process (gloo) group only when told to use the CPU. Under
    DeepSpeed (``ACCELERATE_USE_DEEPSPEED``) it must not be: DeepSpeed brings its own CPU accelerator and
    process group, and a "cpu" state would silently fall back to plain DDP (ZeRO-2) or crash TRL's ZeRO-3
    paths. So under DeepSpeed the harness's ``ACCELERATE_USE_CPU=true`` is turned off for this process.
    """
    if torch.cuda.is_available():
        return False
    if deepspeed_launch():
        os.environ["ACCELERATE_USE_CPU"] = "false"
        return False
    return True


def deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_on_cpu_state() -> dict[str, Any]:
    """SFTConfig options that let DeepSpeed run on CPU processes (CI), or {} elsewhere.

    accelerate sets up DeepSpeed's process group with the backend of the device it finds, and on a machine
    without GPUs it finds none: the state then says "one process" while two run, and the first collective
    fails. So the state is configured here first with gloo, and the Trainer is told to use it.
    """
    if torch.cuda.is_available() or not deepspeed_launch() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return {}
    from accelerate import PartialState

    PartialState(backend="gloo")
    return {"accelerator_config": {"use_configured_state": True}}


class CheckpointMarker(TrainerCallback):
    """Mark ``checkpoint-N`` complete once every rank has finished writing it (see module docstring)."""

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                for p in ckpt.rglob("*"):
                    if p.is_file():
                        with open(p, "rb") as f:
                            os.fsync(f.fileno())
                (ckpt / CHECKPOINT_MARKER).write_text(f"{time.time()}\n")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_complete_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` holding the ``COMPLETE`` marker (and ``trainer_state.json``), or None."""
    done = [
        p
        for _, p in _checkpoints(Path(ckpt_dir))
        if (p / CHECKPOINT_MARKER).is_file() and (p / "trainer_state.json").is_file()
    ]
    return done[-1] if done else None


def remove_incomplete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Delete ``checkpoint-N`` folders without the marker (a write cut off by a kill); returns them."""
    removed = []
    for _, p in _checkpoints(Path(ckpt_dir)):
        if not (p / CHECKPOINT_MARKER).is_file():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.warning("removed %d incomplete checkpoint(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def checkpoint_step(path: Path) -> int:
    m = _CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else 0
