"""Resumable training state for our own loops (pretrain, PPO), on any accelerate backend.

A checkpoint folder ``checkpoints/step_000400/`` holds what ``accelerator.save_state`` writes (model weights as
safetensors, optimizer, every process's python/numpy/torch/cuda RNG state; a DeepSpeed engine saves its own
sharded state there) plus ``trainer_state.json`` with the loop's own state (step, token count, data-sampler
generator state, wall time...). It is written under ``step_000400.tmp`` by all processes, then marked complete
and renamed by the main process, so an interrupted write is never loaded (see ``StageDir.writing_checkpoint``).

Everything is loaded with ``weights_only=True`` (accelerate's loader) or from JSON.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .runs import TRAINER_STATE, StageDir, StageError, atomic_write_json

__all__ = ["save_checkpoint", "load_checkpoint", "generator_state", "set_generator_state", "TRAINER_STATE"]

log = logging.getLogger(__name__)


def generator_state(g: torch.Generator) -> str:
    """A torch.Generator's state as text (for JSON)."""
    return base64.b64encode(g.get_state().numpy().tobytes()).decode()


def set_generator_state(g: torch.Generator, state: str) -> None:
    raw = base64.b64decode(state.encode())
    g.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def save_checkpoint(accelerator: Any, stage_dir: StageDir, step: int, keep: int, state: dict[str, Any]) -> Path:
    """Save a complete, atomically published checkpoint at ``step``; call on every process.

    Args:
        accelerator: the ``accelerate.Accelerator`` whose prepared model/optimizer are saved.
        stage_dir: the stage folder (checkpoints/ lives there).
        step: optimizer step reached.
        keep: how many complete checkpoints to keep (older ones are removed after the new one is published).
        state: JSON-serialisable loop state, written by the main process as ``trainer_state.json``.

    Returns:
        The published checkpoint folder.
    """
    final = stage_dir.checkpoint_path(step)
    tmp = final.with_suffix(".tmp")
    if accelerator.is_main_process:
        stage_dir.checkpoint_tmp(step)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / TRAINER_STATE, {**state, "step": step})
        stage_dir.publish_checkpoint(tmp, step, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path) -> dict[str, Any]:
    """Restore model, optimizer and RNG states saved by ``save_checkpoint``; return the loop state.

    Raises:
        StageError: the checkpoint is truncated or corrupt (it names the folder and what to do).
    """
    state_file = path / TRAINER_STATE
    try:
        state = json.loads(state_file.read_text())
        accelerator.load_state(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means the files are not a usable checkpoint
        raise StageError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}). Nothing was changed. "
            f"Move that folder out of {path.parent} to resume from the previous checkpoint, "
            f"or use FORCE=1 to start the stage again (the old folder is moved aside)."
        ) from None
    log.info("resumed from %s (step %d)", path, state["step"])
    return state
