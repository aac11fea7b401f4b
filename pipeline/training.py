"""The plumbing every trainer shares: stop signal, accelerator factory, resume point, metrics callback.

Pretrain and PPO run our own loops on ``accelerate``; SFT and reward run a Hugging Face ``Trainer``. All four
take these pieces from here, so a stop signal, a resume or a NaN behaves the same in every stage:

- **Stop signal.** :class:`StopSignal` catches SIGTERM/SIGINT for the duration of training. Our loops poll
  :meth:`StopSignal.any_process` at each step boundary; as a ``Trainer`` callback it asks for a save and a stop
  at the end of the step. Either way a checkpoint is written, then :class:`Interrupted` is raised, which
  ``run_stage`` turns into exit code 128+signal with one message of the same form for every stage.
- **Accelerator.** Without a GPU, accelerate needs to be told how to form a process group, and the answer
  differs for DDP and DeepSpeed. :func:`launch_kind` decides once (``gpu``, ``cpu-single``, ``cpu-ddp`` or
  ``cpu-deepspeed``); :func:`configure_process` (start of every stage), :func:`make_accelerator` (our loops)
  and :func:`trainer_device_args` (``TrainingArguments`` of the Trainer stages) act on that one answer.
  ``launch_kind`` and ``configure_process`` live in ``pipeline.launch`` (every stage process imports them at
  start-up, so they avoid the ``Trainer`` machinery of transformers) and are re-exported here, like
  :class:`Interrupted` (from ``pipeline.runs``, beside ``StageError``) and ``context_length`` (``pipeline.lm``).
- **Resume.** :func:`resume_point` picks the newest complete checkpoint of a partial stage and drops the
  metrics logged after it; :class:`CheckpointMarker` marks a ``Trainer`` checkpoint complete (see
  ``pipeline.runs`` for checkpoint naming).
- **Metrics.** :class:`MetricsCallback` renames the ``Trainer``'s logs to the project's keys, writes them, and
  stops the stage on a non-finite loss. A loss is logged only every ``logging_steps``, so after training
  :func:`check_trained` also refuses weights that are not finite, or a model no optimizer step changed, before
  the artifact is saved.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs
from transformers import TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .launch import configure_process, is_main_process, launch_kind, world_size
from .lm import context_length
from .runs import CHECKPOINT_MARKER, Interrupted, StageDir, StageError, hf_checkpoint_dir, signal_name

__all__ = [
    "StopSignal",
    "Interrupted",
    "launch_kind",
    "configure_process",
    "make_accelerator",
    "trainer_device_args",
    "is_zero3",
    "is_main_process",
    "resume_point",
    "MetricsCallback",
    "CheckpointMarker",
    "check_trained",
    "context_length",
    "clean_hf_artifact",
]

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# ----------------------------------------------------------------------------- stop signal


class StopSignal(TrainerCallback):
    """SIGTERM/SIGINT as a request to checkpoint and stop, for our loops and the ``Trainer`` alike.

    As a context manager it installs the handlers (main thread only: Python allows no other) and restores the
    previous ones however the block ends. A handler only records the signal; training stops at the next step
    boundary, after a checkpoint.

    Example::

        with StopSignal() as stop:
            while step < max_steps:
                ...
                if signum := stop.any_process(accelerator):
                    save_checkpoint(...)
                    raise Interrupted("pretrain", step, signum, stage_dir.checkpoints)
    """

    def __init__(self) -> None:
        self.signum = 0
        """The signal received (0: none yet)."""
        self._previous: dict[int, Any] = {}

    @property
    def stopped_by(self) -> str | None:
        """The name of the signal received (``"SIGTERM"``), or None."""
        return signal_name(self.signum) if self.signum else None

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.signum:
            log.warning("received %s: saving a checkpoint at the end of this step, then stopping", signal_name(signum))
        self.signum = signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``Trainer`` hook: once a signal reached any process, save a checkpoint at the end of this step and stop.

        Under several processes the flag is all-reduced at every step end (a one-number collective), so that every
        process stops at the same step: a save is collective, and a process that went on would hang the others.
        """
        signum = self.signum
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                flag = torch.tensor([signum], device=args.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                signum = int(flag.item())
        if signum:
            self.signum = signum  # every process then reports the interruption
            control.should_save = True
            control.should_training_stop = True

    def any_process(self, accelerator: Accelerator) -> int:
        """The signal number when a stop signal reached any process, else 0; call on every process.

        Distributed runs pay one tiny all-reduce (every process must stop at the same step, or the next
        collective hangs); a single process pays nothing.
        """
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())


# ----------------------------------------------------------------------------- devices


def make_accelerator(**kwargs: Any) -> Accelerator:
    """The ``Accelerator`` of our own loops (pretrain, PPO), really distributed under every launch config.

    Args:
        **kwargs: passed to ``Accelerator`` (``gradient_accumulation_steps``, ``mixed_precision``...).

    Without a GPU, accelerate turns a multi-process launch into N independent single processes unless told to
    use the CPU (``cpu=True``: gloo DDP), and DeepSpeed picks no communication backend unless given gloo.
    """
    kind = launch_kind()
    if kind == "cpu-ddp":
        kwargs.setdefault("cpu", True)
    elif kind == "cpu-deepspeed" and world_size() > 1:
        handlers = list(kwargs.pop("kwargs_handlers", None) or [])
        kwargs["kwargs_handlers"] = [*handlers, InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(**kwargs)


def trainer_device_args() -> dict[str, Any]:
    """The device options of a Hugging Face ``TrainingArguments`` (SFT and reward) for :func:`launch_kind`.

    Returns:
        ``use_cpu`` (True on CPU, except under DeepSpeed, where ``ACCELERATE_USE_CPU`` is also turned off for
        this process: see :func:`configure_process`), and for a multi-process DeepSpeed launch on CPUs
        ``accelerator_config={"use_configured_state": True}``: accelerate would set up DeepSpeed's process group
        with the backend of the device it finds, and finding none it says "one process" while two run; so a
        gloo state is configured here first and the Trainer is told to use it.
    """
    kind = launch_kind()
    if kind != "cpu-deepspeed":
        return {"use_cpu": kind != "gpu"}
    os.environ["ACCELERATE_USE_CPU"] = "false"
    if world_size() < 2:
        return {"use_cpu": False}
    PartialState(backend="gloo")
    return {"use_cpu": False, "accelerator_config": {"use_configured_state": True}}


def is_zero3(accelerator: Accelerator | None = None) -> bool:
    """Whether parameters are sharded by DeepSpeed ZeRO-3 (forwards and generation are then collective).

    Args:
        accelerator: the ``Accelerator`` of our own loops; None for the ``Trainer`` stages, where the
            ``TrainingArguments`` register the DeepSpeed config with transformers.
    """
    if accelerator is not None:
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        return plugin is not None and plugin.zero_stage == 3
    return bool(is_deepspeed_zero3_enabled())


# ----------------------------------------------------------------------------- resume


def resume_point(stage_dir: StageDir, state: str) -> Path | None:
    """The checkpoint a stage in ``state`` resumes from: the newest complete one of a partial stage, else None.

    For a partial stage the main process also removes incomplete checkpoints (writes cut off by a kill) and
    drops the metrics logged after the checkpoint (they will be logged again). Call on every process.
    """
    if state != "partial":
        return None
    if is_main_process():
        stage_dir.remove_incomplete_checkpoints()
    ckpt = stage_dir.latest_complete()
    if is_main_process():
        stage_dir.truncate_metrics_after(ckpt.step if ckpt else 0)
    log.info("%s: resuming from %s", stage_dir.stage, ckpt.path if ckpt else "the start (no complete checkpoint)")
    return ckpt.path if ckpt else None


class CheckpointMarker(TrainerCallback):
    """Mark a ``Trainer`` checkpoint complete once every process has finished writing it.

    The ``Trainer`` writes its ``checkpoint-N`` folders in place, with no atomic rename, so a kill mid-write
    would leave a folder that looks like a checkpoint. After a barrier, the main process fsyncs the files and
    writes the ``COMPLETE`` marker; ``StageDir`` resumes only from marked folders and removes the others.
    """

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``Trainer`` hook, after each save."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            ckpt = hf_checkpoint_dir(args.output_dir, state.global_step)
            if ckpt.is_dir():
                for p in ckpt.rglob("*"):
                    if p.is_file():
                        with open(p, "rb") as f:
                            os.fsync(f.fileno())
                (ckpt / CHECKPOINT_MARKER).write_text(f"{time.time()}\n")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


# ----------------------------------------------------------------------------- metrics


class MetricsCallback(TrainerCallback):
    """Forward the ``Trainer``'s logs to ``sink`` under the project's metric names; stop on a NaN/inf loss.

    Args:
        sink: receives ``{"step": global_step, <renamed key>: value, ...}`` on the main process
            (e.g. ``StageDir.append_metrics``).
        keys: ``Trainer`` log key -> metric name (``{"loss": "train/loss", "eval_loss": "val/loss"}``); other
            keys are dropped, and a log holding nothing but the epoch is not forwarded.
        stage: the stage name, for the error message.

    Raises:
        StageError: (from ``on_log``) a non-finite ``loss`` or ``eval_loss``, naming the stage and the step;
            (from ``on_step_end``) weights that are not finite when a checkpoint is due, so that the checkpoints
            kept are the good ones before the divergence (a loss is only seen every ``logging_steps``).
    """

    def __init__(self, sink: Callable[[dict[str, Any]], None], keys: dict[str, str], stage: str) -> None:
        self.sink = sink
        self.keys = keys
        self.stage = stage

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """``Trainer`` hook, for each log."""
        logs = logs or {}
        for key in ("loss", "eval_loss"):
            if key in logs and not math.isfinite(logs[key]):
                raise StageError(
                    f"{self.stage}: {key} is {logs[key]} at step {state.global_step}; stopping. The last good "
                    f"checkpoint stays in {args.output_dir} (lower {self.stage}.lr, or check the data)"
                )
        record = {self.keys[k]: float(v) for k, v in logs.items() if k in self.keys}
        if any(k != "epoch" for k in logs if k in self.keys) and state.is_world_process_zero:
            self.sink({"step": state.global_step, **record})

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """``Trainer`` hook, after each optimizer step: before a checkpoint is written, its weights must be finite."""
        if control.should_save and model is not None:
            bad, n_bad = _nonfinite_weights(model)
            if n_bad:
                raise StageError(
                    f"{self.stage}: the weights are not finite at step {state.global_step} ({_names(bad, n_bad)}): "
                    f"training diverged; stopping before the checkpoint of this step, the last good one stays in "
                    f"{args.output_dir} (lower {self.stage}.lr, or check the data)"
                )


def check_trained(stage: str, model: torch.nn.Module, step: int, output_dir: Path | str) -> None:
    """Refuse to save a model that no optimizer step trained, or whose weights are not all finite.

    Call on every process after training and before the artifact is saved: under ZeRO-3 each process checks its
    own shards, and the count of bad tensors is summed over the processes so that all of them raise together.

    Args:
        stage: the stage name (``sft``, ``reward``), also the config section the advice names.
        model: the trained model.
        step: the optimizer steps taken (``trainer.state.global_step``).
        output_dir: the checkpoint folder, named in the message (it is kept; no artifact is written).

    Raises:
        StageError: ``step`` is 0, or a weight is NaN or inf, naming the stage, the step and the knobs to turn.
    """
    if step <= 0:
        raise StageError(
            f"{stage}: no optimizer step ran (step {step}), so the model is untrained; no artifact written. "
            f"Raise {stage}.epochs or {stage}.max_steps, or check that the dataset is not empty"
        )
    bad, n_bad = _nonfinite_weights(model)
    if n_bad:
        raise StageError(
            f"{stage}: the weights are not finite after step {step} ({_names(bad, n_bad)}): training diverged; "
            f"no artifact written, the checkpoints stay in {output_dir} (lower {stage}.lr, or check the data)"
        )


def _nonfinite_weights(model: torch.nn.Module) -> tuple[list[str], int]:
    """(names of this process's non-finite tensors, their count summed over the processes). Every process must
    call it (under ZeRO-3 each checks its own shards), so that all of them raise together."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(_local_weights(p)).all())]
    n_bad = len(bad)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            on_gpu = torch.distributed.get_backend() == "nccl"
            count = torch.tensor([n_bad], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
            torch.distributed.all_reduce(count)
            n_bad = int(count.item())
    return bad, n_bad


def _names(bad: list[str], n_bad: int) -> str:
    shown = (", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")) if bad else "on another process"
    return f"{n_bad} tensors: {shown}"


def _local_weights(param: torch.Tensor) -> torch.Tensor:
    """This process's values of ``param``: its ZeRO-3 shard (``ds_tensor``) when DeepSpeed partitioned it."""
    shard = getattr(param, "ds_tensor", None)
    return shard if shard is not None else param.detach()


# ----------------------------------------------------------------------------- artifacts


def without_tied_copies(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the entries the model ties to another (GPT-2's ``lm_head.weight`` is the token embedding).

    DeepSpeed's gather (ZeRO-2 and ZeRO-3) returns each parameter as its own tensor, so ``save_pretrained`` would
    write a tied head a second time; the artifact then differs in format from a 1-process run's. An entry is only
    dropped when it equals its target, so an untied head is never lost.
    """
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return state
    tied = getattr(model, "_tied_weights_keys", None) or {}
    pairs = tied.items() if isinstance(tied, dict) else ()
    drop = {k for k, target in pairs if k in state and target in state and torch.equal(state[k], state[target])}
    return {k: v for k, v in state.items() if k not in drop}


def clean_hf_artifact(artifact_dir: Path | str) -> None:
    """Remove what ``Trainer.save_model`` adds to a model folder beside the model: the pickled
    ``TrainingArguments`` (``training_args.bin``) and a separate ``chat_template.jinja``.

    The artifacts stay pickle-free, with the chat template inside ``tokenizer_config.json`` like the tokenizer
    stage's (save the tokenizer afterwards with ``save_jinja_files=False``).
    """
    for name in ("training_args.bin", "chat_template.jinja"):
        (Path(artifact_dir) / name).unlink(missing_ok=True)
