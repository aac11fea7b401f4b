"""The shape every stage entry point shares: parse args, load config, decide done/partial/stale,
run the body, write the manifest last.

    def main(argv=None) -> int:
        return run_stage("sft", argv, _train)     # _train(ctx: StageContext) -> StageResult

Command line of every stage: ``python -m stages.<stage> --config run.yaml [--force] [section.key=value ...]``
(under ``accelerate launch`` for the training stages).

Exit codes: 0 done (or already done); 2 a config error or a ``StageError`` (the message says why), including
another process working on the same stage folder (``runs.StageLocked``: ``runs/tiny/sft is in use by PID 1234
(...) since 12:01:02; wait for it or stop it``); 128+N when signal N interrupted training
(``pipeline.runs.Interrupted``, raised after a checkpoint was saved).

The main process (rank 0, ``launch.is_main_process``) takes the stage folder's lock in ``StageDir.begin``, before
its first write, and keeps it until the stage ends (the kernel drops it if the process dies); the other ranks
of a distributed launch take no lock: they wait for rank 0's ``fingerprint.json`` and write only what rank 0
lets them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .checkpoint import refuse_pickle_resume
from .config import ConfigError, RunConfig, load_config, to_dict, to_yaml
from .launch import configure_process, is_main_process
from .lineage import all_fingerprints, input_contents, stage_inputs
from .runs import Interrupted, StageDir, StageError, require_done

__all__ = ["StageContext", "StageResult", "run_stage", "is_main_process", "setup_logging"]

log = logging.getLogger("pipeline")


def setup_logging() -> None:
    level = logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "Removed shared tensor {'lm_head.weight'} while saving": the tied head is restored on load, by design
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


@dataclass
class StageContext:
    cfg: RunConfig
    stage: str
    dir: StageDir
    fingerprint: str
    inputs: dict[str, str]
    """Upstream stage -> fingerprint of the manifest consumed."""
    state: str
    """State found at start: 'missing' or 'partial' (resume)."""
    config_path: str | None = None
    overrides: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def upstream(self, stage: str) -> StageDir:
        return StageDir.of(self.cfg.run_dir, stage)


@dataclass
class StageResult:
    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    """More manifest fields (e.g. samples, data counts)."""
    prior_wall_time_s: float = 0.0
    """Wall time spent before a resume (from the checkpoint), added to this invocation's."""


def parse_args(stage: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the {stage} stage.")
    p.add_argument("--config", default=None, help="run YAML (default: dataclass defaults)")
    p.add_argument("--force", action="store_true", help="move a stale stage folder aside and start again")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def run_stage(
    stage: str,
    argv: list[str] | None,
    body: Callable[[StageContext], StageResult],
    on_done: Callable[[StageContext], None] | None = None,
) -> int:
    """Run ``body`` as stage ``stage`` under the run-folder contract; returns a process exit code.

    ``on_done``: called (main process) when the stage is already done, for outputs derived from the artifact that
    the current config asks for and the done stage lacks (the export's GGUF files); it takes the folder's lock
    (``StageDir.lock``) before it writes.
    """
    setup_logging()
    configure_process()
    args = parse_args(stage, argv)
    sd: StageDir | None = None
    try:
        cfg = load_config(args.config, args.overrides)
        launch_problems = cfg.pretrain.launch_problems() if stage == "pretrain" else []
        if launch_problems:  # before the stage folder is touched
            raise ConfigError("; ".join(launch_problems))
        fps = all_fingerprints(cfg)
        contents = input_contents(cfg, stage)
        sd = StageDir.of(cfg.run_dir, stage)
        state = sd.state(fps[stage])
        if state == "done":
            log.info("%s: already done (%s), nothing to do", stage, sd.manifest_path)
            if on_done is not None and is_main_process():
                on_done(StageContext(cfg, stage, sd, fps[stage], {}, state, args.config, tuple(args.overrides)))
            return 0
        inputs = {}
        for up in stage_inputs(cfg, stage):
            m = require_done(StageDir.of(cfg.run_dir, up), f"stage '{stage}'")
            if m.get("fingerprint") != fps[up]:
                raise StageError(
                    f"stage '{stage}' needs '{up}' made with the current config, but {StageDir.of(cfg.run_dir, up).manifest_path} "
                    f"has fingerprint {m.get('fingerprint')} (expected {fps[up]}): '{up}' is stale. Run `make {up} FORCE=1` first."
                )
            inputs[up] = fps[up]
        err = sd.corrupt_resume_error() if state == "partial" else None
        if err is not None and not args.force:
            raise err  # what the orchestrator says too; a stage run as a module would otherwise fail in torch.load
        if is_main_process():
            if err is not None:
                log.info("%s: corrupt checkpoint: stage folder moved aside to %s", stage, sd.move_aside())
                state = "missing"
            state = sd.begin(fps[stage], to_yaml(cfg), force=args.force, contents=contents, inputs=inputs)
            if state == "done":  # another process finished it meanwhile
                log.info("%s: already done (%s), nothing to do", stage, sd.manifest_path)
                return 0
        else:
            # wait for rank 0 to prepare the folder (move aside a stale one etc.)
            deadline = time.time() + 120
            while sd.started_fingerprint() != fps[stage] and time.time() < deadline:
                time.sleep(0.1)
            if state in ("stale", "corrupt") or err is not None:
                state = "missing"
        if state == "partial":  # on every process, before any load: DeepSpeed's checkpoint loader unpickles
            refuse_pickle_resume(sd, cfg.run.allow_pickle_checkpoints)
        ctx = StageContext(cfg, stage, sd, fps[stage], inputs, state, args.config, tuple(args.overrides))
        log.info("%s: %s -> %s", stage, "resuming" if state == "partial" else "starting", sd.root)
        t0 = time.time()
        result = body(ctx)
        if is_main_process():
            sections = {
                k: v
                for k, v in to_dict(cfg).items()
                if k in ("run", stage) or (stage == "pretrain" and k in ("model", "data"))
            }
            sd.write_manifest(
                fps[stage],
                inputs,
                sections,
                result.metrics,
                time.time() - t0 + result.prior_wall_time_s,
                result.extra,
                contents=contents,
            )
            log.info("%s: done -> %s", stage, sd.artifact)
        return 0
    except (ConfigError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if sd is not None:
            sd.unlock()  # the process ends next; in-process callers (tests) get the folder back
        end_process_group()


def end_process_group() -> None:
    """Shut this process's distributed process group down (a no-op when there is none).

    Left to the interpreter's exit, the process group's backend threads can be destroyed while still running, and
    the process then aborts ("terminate called without an active exception", exit -6) after a stage that succeeded:
    seen once, on rank 1 of a ZeRO-3 run. Shutting the group down first is torch's own advice. ``run_stage`` calls it
    last, when the stage's body has returned (after its last collective) or failed.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # the stage's own outcome (its exit code, its error) is what the caller needs
            log.warning("could not shut the process group down: %s", e)
