"""Pipeline orchestration: which stages a target needs, what state each is in, and launching them.

``python -m pipeline run ppo --config configs/tiny.yaml`` (or ``make ppo``) walks the stages ``ppo`` needs
in order (``lineage.stage_inputs``), and for each:

- **done** (manifest fingerprint matches): skipped, with a one-line message; nothing is imported or launched;
- **missing** or **partial** (checkpoints, no manifest): launched as a subprocess, which starts or resumes;
- **stale** (made with another config or other inputs): stops with a message naming each changed key
  (``sft.lr: 0.0005 -> 0.0001``) or input, unless forced (``FORCE=1``), which moves the old folder
  aside (``<stage>.old-<time>``) and never deletes anything.

Training stages run under ``accelerate launch`` with ``configs/accelerate/<launch>.yaml``; ``launch="cpu"``
and the tokenizer/export stages run as plain ``python -m stages.<stage>`` (fast start-up).

This module imports no torch: deciding that everything is done takes well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, RunConfig, fingerprint, from_dict, load_config, to_dict
from .lineage import all_fingerprints, stage_inputs, stage_sections
from .runs import STAGES, StageDir, StageError

__all__ = [
    "LAUNCHES",
    "RunOptions",
    "StageStatus",
    "plan",
    "stage_status",
    "run_status",
    "config_changes",
    "stage_command",
    "check_checkpoint",
    "check_file",
    "format_value",
    "run_pipeline",
]

log = logging.getLogger(__name__)

LAUNCHES = ("cpu", "ddp", "zero2", "zero3")
_SINGLE_PROCESS = ("tokenizer", "export")
"""Stages that never need a distributed launcher."""
_IGNORED_KEYS = ("run.name", "run.root", "export.dir")
"""Keys that say where things go, not what they are."""
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("vocab_size",),
    "pretrain": ("train_loss", "val_loss", "tokens", "tokens_per_s"),
    "sft": ("train_loss", "val_loss", "checker_accuracy"),
    "reward": ("pair_accuracy",),
    "ppo": ("reward_mean", "sft_reward_mean", "kl", "checker_accuracy"),
    "export": ("max_abs_logit_diff", "n_params"),
}
_STEP_DIR_RE = re.compile(r"^(?:step_|checkpoint-)(\d+)$")


@dataclass(frozen=True)
class RunOptions:
    """How ``run_pipeline`` launches stages."""

    config_path: str | None = None
    overrides: tuple[str, ...] = ()
    launch: str = "cpu"
    """cpu | ddp | zero2 | zero3 (``configs/accelerate/<launch>.yaml``)."""
    nproc: int = 0
    """Processes per launch (0: the accelerate config's own ``num_processes``)."""
    force: bool = False
    """Move stale stage folders aside and run them again."""
    python: str = sys.executable
    module_prefix: str = "stages"
    """Package holding one entry module per stage (tests point this at fakes)."""
    accelerate_dir: str = "configs/accelerate"
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the stage processes."""


@dataclass
class StageStatus:
    """What ``status`` shows for one stage."""

    stage: str
    state: str
    """done | partial | stale | missing (as in runs.StageDir.state), or broken (done but artifact gone)."""
    fingerprint: str
    path: Path
    step: int | None = None
    max_steps: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    """For a stale stage: what changed, one line per key or input."""
    wall_time_s: float | None = None

    def line(self) -> str:
        """One human-readable line: ``sft       done     train_loss=1.23 ... runs/tiny/sft/artifact``."""
        state = self.state
        if state == "partial":
            state = f"partial (at step {self.step if self.step is not None else 0} of {self.max_steps or '?'})"
        elif state == "stale" and self.changes:
            state = f"stale ({'; '.join(self.changes[:3])}{' ...' if len(self.changes) > 3 else ''})"
        metrics = " ".join(f"{k}={format_value(v)}" for k, v in self.metrics.items())
        where = self.path / "artifact" if self.state == "done" else self.path
        return f"{self.stage:<10} {state:<28} {metrics}  {where}".rstrip()


def format_value(v: Any) -> str:
    """A metric for humans: floats with 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- planning


def plan(cfg: RunConfig, target: str) -> list[str]:
    """The stages ``target`` needs, upstream first, ending with ``target`` ('all' = every stage).

    Raises:
        ConfigError: unknown target.
    """
    if target == "all":
        target = STAGES[-1]
    if target not in STAGES:
        raise ConfigError(f"unknown stage '{target}'; choose one of: all, {', '.join(STAGES)}")
    needed: set[str] = set()

    def visit(stage: str) -> None:
        if stage not in needed:
            needed.add(stage)
            for up in stage_inputs(cfg, stage):
                visit(up)

    visit(target)
    return [s for s in STAGES if s in needed]


# ----------------------------------------------------------------------------- state and diffs


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _saved_config(sd: StageDir) -> dict[str, Any] | None:
    """The resolved config a stage folder was made with (config.yaml, else the manifest's sections)."""
    path = sd.root / "config.yaml"
    if path.is_file():
        try:
            tree = yaml.safe_load(path.read_text())
            if isinstance(tree, dict):
                return tree
        except yaml.YAMLError:
            pass
    m = sd.manifest()
    return m.get("config") if m else None


def config_changes(
    cfg: RunConfig, stage: str, saved: dict[str, Any], saved_inputs: dict[str, str] | None = None
) -> list[str]:
    """Explain why ``stage`` made with config ``saved`` differs from ``cfg``, key by key.

    Each changed key is kept only if putting back its old value changes this stage's fingerprint, so the
    list names exactly the keys that matter (``sft.lr: 0.0005 -> 0.0001``); a key that matters only through
    an upstream stage is reported as ``input 'sft' changed (sft.lr: ...)``.

    Args:
        cfg: the current resolved config.
        stage: the stage to explain.
        saved: the resolved config tree the stage folder was made with (possibly only some sections).
        saved_inputs: upstream stage -> fingerprint the stage consumed (from its manifest).

    Returns:
        One line per change; empty when nothing identifiable changed.
    """
    current = to_dict(cfg)
    now, old = _flatten(current), _flatten(saved)
    fps = all_fingerprints(cfg)
    own = fingerprint(*stage_sections(cfg, stage))
    direct: list[str] = []
    via_inputs: dict[tuple[str, ...], list[str]] = {}
    for key in sorted(set(now) & set(old)):
        if key in _IGNORED_KEYS or _same(now[key], old[key]):
            continue
        change = f"{key}: {old[key]!r} -> {now[key]!r}"
        try:
            alt_cfg = from_dict(RunConfig, _with_value(current, key, old[key]))
        except (ConfigError, TypeError, ValueError):
            direct.append(change)
            continue
        alt = all_fingerprints(alt_cfg)
        if alt[stage] == fps[stage]:
            continue
        if fingerprint(*stage_sections(alt_cfg, stage)) != own:
            direct.append(change)
        else:
            ups = tuple(u for u in stage_inputs(cfg, stage) if alt.get(u) != fps[u])
            via_inputs.setdefault(ups, []).append(change)
    lines = list(direct)
    for ups, changes in via_inputs.items():
        names = " and ".join(f"'{u}'" for u in ups) or "an input"
        lines.append(f"input {names} changed ({', '.join(changes)})")
    explained = {u for ups in via_inputs for u in ups}
    for up, fp in (saved_inputs or {}).items():
        if up not in explained and fps.get(up) not in (None, fp):
            lines.append(f"input '{up}' changed (fingerprint {fp} -> {fps[up]})")
    sections = {k.split(".")[0] for k in old}  # a manifest may hold only some sections
    added = sorted(k for k in set(now) - set(old) if k.split(".")[0] in sections and k not in _IGNORED_KEYS)
    removed = sorted(set(old) - set(now))
    if removed:  # the code's config schema changed since (keys are part of the fingerprint)
        lines.insert(0, f"keys no longer in the config: {', '.join(removed[:5])}")
    if added:
        lines.insert(0, f"keys new since it was made: {', '.join(added[:5])}")
    return lines


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _with_value(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(tree))
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return out


def _latest_step(sd: StageDir) -> tuple[int | None, Path | None]:
    best: tuple[int | None, Path | None] = (None, None)
    if sd.checkpoints.is_dir():
        for p in sd.checkpoints.iterdir():
            m = _STEP_DIR_RE.match(p.name)  # our step_N and the HF Trainer's checkpoint-N, both marked COMPLETE
            if m and (p / "COMPLETE").is_file() and (best[0] is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), p)
    return best


def _max_steps(cfg: RunConfig, stage: str, ckpt: Path | None) -> int | None:
    """Total steps of a stage: from its checkpoint's metadata when recorded, else from the config."""
    if ckpt is not None:
        for name in ("state.json", "meta.json", "trainer_state.json", "progress.json"):
            p = ckpt / name
            if p.is_file():
                try:
                    meta = json.loads(p.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                for key in ("max_steps", "total_steps"):
                    if isinstance(meta.get(key), int) and meta[key] > 0:
                        return meta[key]
    by_config = {
        "pretrain": cfg.pretrain.max_steps,
        "sft": cfg.sft.max_steps,
        "reward": cfg.reward.max_steps,
        "ppo": cfg.ppo.steps,
    }.get(stage)
    return by_config if by_config and by_config > 0 else None


def stage_status(cfg: RunConfig, stage: str, fps: dict[str, str] | None = None) -> StageStatus:
    """Inspect one stage folder against the current config (reads only small files)."""
    fps = fps or all_fingerprints(cfg)
    sd = StageDir.of(cfg.run_dir, stage)
    state = sd.state(fps[stage])
    if state == "partial" and sd.started_fingerprint() not in (None, fps[stage]):
        state = "stale"  # the harness refuses to resume a run begun with another config
    st = StageStatus(stage, state, fps[stage], sd.root)
    manifest = sd.manifest()
    if state == "done":
        assert manifest is not None
        st.metrics = {k: manifest["metrics"][k] for k in KEY_METRICS.get(stage, ()) if k in manifest.get("metrics", {})}
        st.wall_time_s = manifest.get("wall_time_s")
        if not sd.artifact.is_dir() or not any(sd.artifact.iterdir()):
            st.state = "broken"
            st.changes = [f"the manifest says done but {sd.artifact} is missing or empty"]
    elif state == "partial":
        st.step, ckpt = _latest_step(sd)
        st.max_steps = _max_steps(cfg, stage, ckpt)
    elif state == "stale":
        saved = _saved_config(sd)
        st.changes = config_changes(cfg, stage, saved or {}, (manifest or {}).get("inputs"))
        if not st.changes:
            st.changes = [f"fingerprint {_found_fp(sd, manifest)} != {fps[stage]}"]
    return st


def _found_fp(sd: StageDir, manifest: dict[str, Any] | None) -> str:
    return str(manifest.get("fingerprint") if manifest else sd.started_fingerprint())


def run_status(cfg: RunConfig) -> list[StageStatus]:
    """Every stage of the run (tokenizer ... export), in order."""
    fps = all_fingerprints(cfg)
    return [stage_status(cfg, s, fps) for s in STAGES]


# ----------------------------------------------------------------------------- checkpoint sanity


def check_checkpoint(path: Path) -> list[str]:
    """Cheap integrity checks of every file of a checkpoint folder before resuming from it (see ``check_file``).

    Returns:
        One problem per line (empty: nothing wrong found), each naming the file.
    """
    return [problem for p in sorted(path.rglob("*")) if p.is_file() for problem in check_file(p)]


def check_file(p: Path) -> list[str]:
    """Checks a safetensors header against the file size, that a ``.pt``/``.bin``/``.pth`` zip archive has its
    central directory (a truncated torch.save file does not), that a plain pickle ends with its STOP opcode, and that
    a JSON file parses. Nothing is unpickled or loaded.

    Returns:
        The problems found, each naming the file (empty: none).
    """
    try:
        if p.suffix == ".safetensors":
            return _check_safetensors(p)
        # accelerate's random_states_N.pkl is a torch.save zip archive too, despite its suffix
        if p.suffix in (".pt", ".bin", ".pth", ".pkl") and p.stat().st_size > 0 and _is_zip_start(p):
            with zipfile.ZipFile(p) as z:
                z.namelist()
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".pkl" and not _ends_with_pickle_stop(p):
            return [f"{p}: truncated (a pickle ends with its STOP opcode)"]
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        return [f"{p}: unreadable ({type(e).__name__}: {e})"]
    return []


def _ends_with_pickle_stop(p: Path) -> bool:
    with open(p, "rb") as f:
        f.seek(max(0, p.stat().st_size - 1))
        return f.read(1) == b"."


def _is_zip_start(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _check_safetensors(p: Path) -> list[str]:
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return [f"{p}: truncated ({size} bytes, no safetensors header)"]
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return [f"{p}: truncated (header claims {n} bytes, file has {size})"]
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return [f"{p}: corrupt safetensors header"]
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return [f"{p}: truncated (tensors need {8 + n + end} bytes, file has {size})"]
    return []


# ----------------------------------------------------------------------------- launching


def stage_command(stage: str, opts: RunOptions, force: bool = False) -> list[str]:
    """The command line that runs ``stage`` under ``opts`` (see module docstring)."""
    if opts.launch not in LAUNCHES:
        raise ConfigError(f"LAUNCH={opts.launch!r} is not one of {', '.join(LAUNCHES)}")
    if opts.launch == "cpu" and opts.nproc > 1:
        raise ConfigError(f"LAUNCH=cpu runs one process (NPROC={opts.nproc}); use LAUNCH=ddp NPROC={opts.nproc}")
    args = ["--config", opts.config_path] if opts.config_path else []
    args += ["--force"] if force else []
    args += list(opts.overrides)
    module = f"{opts.module_prefix}.{stage}"
    if opts.launch == "cpu" or stage in _SINGLE_PROCESS:
        return [opts.python, "-m", module, *args]
    launcher = [
        opts.python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"{opts.accelerate_dir}/{opts.launch}.yaml",
    ]
    if opts.nproc > 0:
        launcher += ["--num_processes", str(opts.nproc)]
    return [*launcher, "-m", module, *args]


def _stale_error(st: StageStatus) -> StageError:
    changes = "\n".join(f"  - {c}" for c in st.changes)
    return StageError(
        f"stage '{st.stage}' in {st.path} was made with a different config or inputs; nothing was changed:\n{changes}\n"
        f"To make it again with the current config, run with FORCE=1 (`make {st.stage} FORCE=1`, or --force): the old "
        f"folder is moved aside to {st.path.name}.old-<time>/ (never deleted). Or choose another run.name."
    )


def _check_resumable(cfg: RunConfig, st: StageStatus, force: bool) -> None:
    """Refuse to resume from a corrupt latest checkpoint; with ``force``, move the stage folder aside instead."""
    sd = StageDir.of(cfg.run_dir, st.stage)
    _, ckpt = _latest_step(sd)
    problems = check_checkpoint(ckpt) if st.state == "partial" and ckpt is not None else []
    if not problems:
        return
    if force:
        log.info("%-9s corrupt checkpoint %s: stage folder moved aside to %s", st.stage, ckpt, sd.move_aside())
        st.state, st.step = "missing", None
        return
    raise StageError(
        f"stage '{st.stage}' would resume from {ckpt}, which is corrupt:\n  - "
        + "\n  - ".join(problems[:5])
        + f"\nNothing was changed. Move it aside (mv {ckpt} {ckpt}.corrupt) to resume from the checkpoint "
        f"before it, or use FORCE=1 to start the stage again (the old folder is moved aside, not deleted)."
    )


def run_pipeline(target: str, opts: RunOptions) -> int:
    """Bring ``target`` (a stage or 'all') and everything it needs up to date.

    Returns:
        0 when every needed stage is done.

    Raises:
        ConfigError: bad config, override or launch option.
        StageError: a stale stage (without force), a broken done stage, a corrupt checkpoint, a stage that
            exited 0 without writing its manifest, or a failed stage (then ``returncode`` holds its exit code,
            128+N when signal N stopped it).
    """
    cfg = load_config(opts.config_path, opts.overrides)
    fps = all_fingerprints(cfg)
    t_start = time.time()
    for stage in plan(cfg, target):
        st = stage_status(cfg, stage, fps)
        if st.state == "done":
            log.info("%-9s done, skipped (%s)", stage, st.path / "manifest.json")
            continue
        if st.state == "broken":
            if not opts.force:
                raise StageError(
                    f"stage '{stage}': {st.changes[0]}. Nothing was changed. Use FORCE=1 to move {st.path} aside "
                    f"(to {st.path.name}.old-<time>/, never deleted) and make the stage again."
                )
            log.info("%-9s broken, moved aside to %s", stage, StageDir.of(cfg.run_dir, stage).move_aside())
        if st.state == "stale" and not opts.force:
            raise _stale_error(st)
        _check_resumable(cfg, st, opts.force)
        cmd = stage_command(stage, opts, force=st.state == "stale")
        what = {
            "partial": f"resuming at step {st.step}"
            if st.step
            else "starting again (stopped before its first checkpoint)",
            "stale": "forced: moving the old folder aside",
        }.get(st.state, "starting")
        log.info("%-9s %s: %s", stage, what, " ".join(cmd))
        t0 = time.time()
        rc = _run_child(cmd, {**os.environ, **opts.env}, stage)
        if rc != 0:
            rc = 128 - rc if rc < 0 else rc
            raise _StageFailed(stage, rc, _disk_hint(cfg))
        after = stage_status(cfg, stage, fps)
        if after.state != "done":
            raise StageError(
                f"stage '{stage}' exited 0 but is {after.state}: no manifest with fingerprint {fps[stage]} in {after.path}"
            )
        log.info("%-9s done in %.1fs -> %s", stage, time.time() - t0, after.path / "artifact")
    if target in ("all", "export") and cfg.export.dir:
        from .export import publish  # torch-free helper

        publish(StageDir.of(cfg.run_dir, "export").artifact, Path(cfg.export.dir))
    log.info("%s: up to date (%.1fs)", target, time.time() - t_start)
    return 0


def _run_child(cmd: list[str], env: dict[str, str], stage: str) -> int:
    """Run a stage process to its end. Ctrl-C reaches it too (same process group): wait while it saves a
    checkpoint rather than killing it (what ``subprocess.run`` does); a second Ctrl-C terminates it, a third
    kills it. SIGTERM sent to this process is passed on, so the stage checkpoints and stops."""
    proc = subprocess.Popen(cmd, env=env)
    forward = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)) if forward else None
    interrupts = 0
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                interrupts += 1
                log.warning(
                    "%s: interrupted, waiting for the stage to save a checkpoint (Ctrl-C again to stop it)", stage
                )
                if interrupts == 2:
                    proc.terminate()
                elif interrupts > 2:
                    proc.kill()
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)


class _StageFailed(StageError):
    def __init__(self, stage: str, rc: int, hint: str) -> None:
        what = f"was stopped by signal {rc - 128} (exit code {rc})" if rc > 128 else f"failed with exit code {rc}"
        super().__init__(
            f"stage '{stage}' {what}{hint}. Earlier stages and its completed checkpoints are kept; "
            f"{'fix the cause and ' if rc <= 128 else ''}run the same command again to resume."
        )
        self.returncode = rc


def _disk_hint(cfg: RunConfig) -> str:
    try:
        root = cfg.run_dir if cfg.run_dir.exists() else Path(".")
        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    return f" (only {free / 2**20:.0f} MiB free on the disk holding {cfg.run_dir})" if free < 256 * 2**20 else ""
