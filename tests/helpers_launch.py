"""Environment for the stage processes tests start (``python -m stages.X``, ``accelerate launch``).

In-process code of earlier tests leaves launcher state in ``os.environ``: accelerate's ``ACCELERATE_*``
variables (an in-process ``Accelerator`` sets ``ACCELERATE_USE_CPU``, a DeepSpeed one
``ACCELERATE_USE_DEEPSPEED`` and friends) and torch.distributed's rank variables. A child launched with them
believes it is already inside a launch: ``accelerate launch`` of a ZeRO-2 run then fails in ``Accelerator()``.
The launcher, not the test process, decides these.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_DISTRIBUTED = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"}


def accelerate_launch(config_file: str | Path, nproc: int = 2) -> list[str]:
    """``accelerate launch`` with ``nproc`` processes, ``config_file`` and a free port (no clash with a previous
    launch's port still held); append ``-m stages.<stage> <args>``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0",
            "--num_processes", str(nproc), "--config_file", str(config_file)]  # fmt: skip


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without launcher state, with one thread, offline Hub, this checkout on PYTHONPATH, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k not in _DISTRIBUTED}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env
