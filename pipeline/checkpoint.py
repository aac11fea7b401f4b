"""Resumable training state for our own loops (pretrain, PPO), on any accelerate backend.

A checkpoint folder ``checkpoints/step_000400/`` holds what ``accelerator.save_state`` writes (model weights as
safetensors, optimizer, every process's python/numpy/torch/cuda RNG state; a DeepSpeed engine saves its own
sharded state there) plus ``trainer_state.json`` with the loop's own state (step, token count, data-sampler
generator state, wall time...). It is written under ``step_000400.tmp`` by all processes, then marked complete
and renamed by the main process, so an interrupted write is never loaded (see ``StageDir.writing_checkpoint``).

Everything is loaded with ``weights_only=True`` (accelerate's loader) or from JSON, except under DeepSpeed
(``LAUNCH=zero2|zero3``): there ``accelerator.load_state`` and the Hugging Face ``Trainer``'s resume hand the folder
to DeepSpeed's own loader, which unpickles (``torch.load(weights_only=False)``, hard-coded in its checkpoint engine,
and its optimizer files hold pickled DeepSpeed objects that the safe loader refuses). So a resume under DeepSpeed
is refused before anything is loaded unless the run sets ``run.allow_pickle_checkpoints=true``
(:func:`refuse_pickle_resume`, called by ``pipeline.stage.run_stage`` for every stage; the orchestrator refuses
the same resume with the same message before it launches anything: :func:`pickle_resume_error`).

This module imports no torch at import time (``pipeline.orchestrate`` imports it and must start fast).
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .provenance import deepspeed_launch
from .runs import TRAINER_STATE, StageDir, StageError, atomic_write_json

if TYPE_CHECKING:
    import torch

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "refuse_pickle_resume",
    "pickle_resume_error",
    "generator_state",
    "set_generator_state",
    "TRAINER_STATE",
    "ALLOW_PICKLE_KEY",
]

log = logging.getLogger(__name__)

ALLOW_PICKLE_KEY = "run.allow_pickle_checkpoints"
"""The config key that lets a resume under DeepSpeed unpickle its checkpoint files."""


def generator_state(g: torch.Generator) -> str:
    """A torch.Generator's state as text (for JSON)."""
    return base64.b64encode(g.get_state().numpy().tobytes()).decode()


def set_generator_state(g: torch.Generator, state: str) -> None:
    import torch  # not at import time: see the module docstring

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


def pickle_resume_error(stage_dir: StageDir, allow_pickle: bool, deepspeed: bool) -> StageError | None:
    """The error that refuses resuming ``stage_dir`` under DeepSpeed, or None when the resume may go ahead.

    DeepSpeed loads its checkpoint files (``mp_rank_*_model_states.pt``, ``*_optim_states.pt``) with
    ``torch.load(weights_only=False)`` in every resume path (``accelerator.load_state`` for pretrain and PPO, the
    ``Trainer``'s ``resume_from_checkpoint`` for SFT and reward): a tampered file runs code. The launch, not the
    folder, decides the loader, so any complete checkpoint counts. A stage without one starts afresh and is not
    refused; neither is a launch without DeepSpeed.

    Args:
        stage_dir: the stage folder about to be resumed.
        allow_pickle: ``run.allow_pickle_checkpoints``.
        deepspeed: whether the stage runs (or is about to be launched) under DeepSpeed.

    Returns:
        A ``StageError`` naming the stage, the checkpoint, why, and the key that allows it; None when nothing
        would be unpickled or the run allows it.
    """
    if allow_pickle or not deepspeed:
        return None
    ckpt = stage_dir.latest_complete()
    if ckpt is None:
        return None
    return StageError(
        f"stage '{stage_dir.stage}' would resume from {ckpt.path} under DeepSpeed, whose checkpoint loader unpickles "
        f"its files (torch.load with weights_only=False: a tampered checkpoint can run code). Nothing was loaded. "
        f"If you trust that folder, run the same command again with {ALLOW_PICKLE_KEY}=true "
        f'(make ... ARGS="{ALLOW_PICKLE_KEY}=true"); to start the stage afresh instead, move '
        f"{stage_dir.checkpoints} aside."
    )


def refuse_pickle_resume(stage_dir: StageDir, allow_pickle: bool, deepspeed: bool | None = None) -> None:
    """Refuse to resume ``stage_dir`` under DeepSpeed unless unpickling checkpoints is allowed; call on every
    process of a partial stage, before anything is loaded (see :func:`pickle_resume_error`).

    Args:
        stage_dir: the stage folder about to be resumed.
        allow_pickle: ``run.allow_pickle_checkpoints``.
        deepspeed: whether this process runs under DeepSpeed; None: ``pipeline.provenance.deepspeed_launch``.

    Raises:
        StageError: a DeepSpeed launch would load a checkpoint and ``allow_pickle`` is off (names the stage, the
            folder, why, and the key that allows it).
    """
    if deepspeed is None:
        deepspeed = deepspeed_launch()
    err = pickle_resume_error(stage_dir, allow_pickle, deepspeed)
    if err is not None:
        raise err
