"""How this process was launched, and the one CPU/gloo decision that follows from it.

``launch_kind`` answers once: ``gpu``, ``cpu-single``, ``cpu-ddp`` or ``cpu-deepspeed``. ``configure_process``
(start of every stage, in ``run_stage``) acts on it, and so do ``pipeline.training.make_accelerator`` (our loops)
and ``pipeline.training.trainer_device_args`` (the Hugging Face ``Trainer``'s options).

This module is separate from ``pipeline.training`` (which re-exports it) because every stage process imports it
at start-up, including the tokenizer and export stages: it imports torch and accelerate's process state, not the
``Trainer`` machinery of transformers.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState

from .provenance import deepspeed_launch

__all__ = ["is_main_process", "world_size", "deepspeed_launch", "launch_kind", "configure_process"]


def is_main_process() -> bool:
    """Whether this is the launch's process 0 (from ``RANK``; True outside a distributed launch)."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Processes in the launch (``WORLD_SIZE``; 1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_kind() -> str:
    """How this process was launched, the one decision the device set-up depends on.

    Returns:
        ``gpu`` (CUDA present: accelerate's defaults are right), ``cpu-deepspeed`` (a DeepSpeed launch without
        GPUs), ``cpu-ddp`` (several processes, no GPU, no DeepSpeed) or ``cpu-single``.
    """
    if torch.cuda.is_available():
        return "gpu"
    if deepspeed_launch():
        return "cpu-deepspeed"
    return "cpu-ddp" if world_size() > 1 else "cpu-single"


def configure_process() -> None:
    """Prepare accelerate for :func:`launch_kind`; called once at the start of every stage, before any
    ``Accelerator`` or ``Trainer`` exists.

    - ``cpu-single``/``cpu-ddp``: accelerate picks its multi-process CPU (gloo) mode only when told to use the
      CPU, and the launcher writes ``ACCELERATE_USE_CPU=false`` from config files shared with GPU machines, so
      the variable is set to true.
    - ``cpu-deepspeed``: telling accelerate "CPU" would silently drop DeepSpeed (plain DDP under ZeRO-2, a crash
      in TRL's ZeRO-3 paths), so the variable is left alone; instead the process state is created with the gloo
      backend, which gives DeepSpeed a real process group (without it every process believes it is alone).
    """
    kind = launch_kind()
    if kind in ("cpu-single", "cpu-ddp"):
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif kind == "cpu-deepspeed" and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        PartialState(backend="gloo")
