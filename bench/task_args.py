"""The options the task-accuracy benchmarks share (``rl_headroom.py``, ``greedy_perturbation.py``,
``reward_shortcuts.py``): which generated task prompts to answer, how long the answers may be (unused by
``reward_shortcuts.py``, which generates nothing), and how many CPU threads to use."""

from __future__ import annotations

import argparse
from typing import Any


def add_task_arguments(ap: argparse.ArgumentParser) -> None:
    """``--n``, ``--max-new-tokens``, ``--threads``, ``--config`` and the positional config ``overrides``."""
    ap.add_argument("--n", type=int, default=200, help="prompts")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="configs/tiny.yaml", help="run config whose data.tasks made the model(s)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.tasks.max_operand=19")


def task_records(args: argparse.Namespace, split: str) -> list[dict[str, Any]]:
    """The first ``--n`` records of a generated set (``ppo_eval``, ``ppo_train``, ...) of the run config."""
    from pipeline.config import load_config
    from pipeline.data.tasks import generate_tasks

    return getattr(generate_tasks(load_config(args.config, args.overrides).data.tasks), split)[: args.n]
