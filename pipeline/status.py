"""What ``python -m pipeline status`` shows: each stage's state against the current config, and why a stage is stale.

- **done**: the key metrics of its manifest (``runs.KEY_METRICS``); **broken** when its artifact has gone;
- **partial**: the step of its newest complete checkpoint, of how many (``StageDir.progress``, else the config);
- **stale**: each changed key that matters (``sft.lr: 0.0005 -> 0.0001``) or changed input: an upstream stage,
  or a user file whose content changed (``input sft.dataset.source file data/x.jsonl changed``, from the content
  hashes ``fingerprint.json`` records);
- **corrupt**: its manifest cannot be read: the file and the fix (move the folder aside, or FORCE=1);
- **running (PID n)**: a stage not done whose folder's lock another process holds (``runs.lock_holder``).

This module imports no torch: deciding that everything is done takes well under a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, RunConfig, fingerprint, from_dict, to_dict
from .lineage import all_fingerprints, content_changes, input_contents, stage_inputs, stage_sections
from .runs import KEY_METRICS, STAGES, LockHolder, StageDir, StageError

__all__ = ["StageStatus", "format_value", "stage_status", "run_status", "config_changes"]

_IGNORED_KEYS = ("run.name", "run.root", "export.dir")
"""Keys that say where things go, not what they are."""


@dataclass
class StageStatus:
    """What ``status`` shows for one stage."""

    stage: str
    state: str
    """done | partial | stale | corrupt | missing (as in runs.StageDir.state), or broken (done but artifact gone)."""
    fingerprint: str
    path: Path
    step: int | None = None
    max_steps: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    """For a stale stage: what changed, one line per key or input."""
    wall_time_s: float | None = None
    holder: LockHolder | None = None
    """Another process working on the stage now (it holds the folder's lock); None for a done stage."""

    def line(self) -> str:
        """One human-readable line: ``sft       done     train_loss=1.23 ... runs/tiny/sft/artifact``."""
        state = self.state
        if self.holder is not None:
            pid = f"PID {self.holder.pid}" if self.holder.pid is not None else "another process"
            at = f", at step {self.step} of {self.max_steps or '?'}" if state == "partial" and self.step else ""
            state = f"running ({pid}{at})"
        elif state == "partial":
            state = f"partial (at step {self.step if self.step is not None else 0} of {self.max_steps or '?'})"
        elif state == "corrupt" and self.changes:
            state = f"corrupt ({self.changes[0]})"
        elif state == "stale" and self.changes:
            state = f"stale ({'; '.join(self.changes[:3])}{' ...' if len(self.changes) > 3 else ''})"
        metrics = " ".join(f"{k}={format_value(v)}" for k, v in self.metrics.items())
        where = self.path / "artifact" if self.state == "done" else self.path
        return f"{self.stage:<10} {state:<28} {metrics}  {where}".rstrip()


def format_value(v: Any) -> str:
    """A metric for humans: floats with 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


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
    cfg: RunConfig,
    stage: str,
    saved: dict[str, Any],
    saved_inputs: dict[str, str] | None = None,
    saved_contents: dict[str, str] | None = None,
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
        saved_contents: user file -> content hash the stage read (``fingerprint.json``'s ``contents``); a file
            whose content changed is reported as ``input sft.dataset.source file data/x.jsonl changed``, and an
            upstream stage changed that way as ``input 'sft' changed (sft.dataset.source file ... changed)``.

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
    if saved_contents is not None:
        changed_keys = {line.split(":")[0] for line in direct}
        lines += [
            line
            for line in content_changes(input_contents(cfg, stage), saved_contents)
            if line.split()[1] not in changed_keys or line.endswith(" changed")  # a new path: its key says it
        ]
    for ups, changes in via_inputs.items():
        names = " and ".join(f"'{u}'" for u in ups) or "an input"
        lines.append(f"input {names} changed ({', '.join(changes)})")
    explained = {u for ups in via_inputs for u in ups}
    for up, fp in (saved_inputs or {}).items():
        if up not in explained and fps.get(up) not in (None, fp):
            why = _upstream_content_changes(cfg, up, fp)
            lines.append(f"input '{up}' changed ({'; '.join(why) if why else f'fingerprint {fp} -> {fps[up]}'})")
    sections = {k.split(".")[0] for k in old}  # a manifest may hold only some sections
    added = sorted(k for k in set(now) - set(old) if k.split(".")[0] in sections and k not in _IGNORED_KEYS)
    removed = sorted(set(old) - set(now))
    if removed:  # the code's config schema changed since (keys are part of the fingerprint)
        lines.insert(0, f"keys no longer in the config: {', '.join(removed[:5])}")
    if added:
        lines.insert(0, f"keys new since it was made: {', '.join(added[:5])}")
    return lines


def _upstream_content_changes(cfg: RunConfig, up: str, consumed: str) -> list[str]:
    """How upstream stage ``up``'s user files changed since it made the fingerprint ``consumed`` (when its folder
    still records that start), e.g. ``sft.dataset.source file data/x.jsonl changed``."""
    rec = StageDir.of(cfg.run_dir, up).started()
    if rec.get("fingerprint") != consumed or not isinstance(rec.get("contents"), dict):
        return []
    return [line.removeprefix("input ") for line in content_changes(input_contents(cfg, up), rec["contents"])]


def _saved_contents(sd: StageDir, manifest: dict[str, Any] | None) -> dict[str, str] | None:
    """The content hashes of the user files a stage read: its manifest's, else ``fingerprint.json``'s; None for a
    folder made before they were recorded."""
    for rec, key in ((manifest or {}, "input_contents"), (sd.started(), "contents")):
        if isinstance(rec.get(key), dict):
            return rec[key]
    return None


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


def _configured_steps(cfg: RunConfig, stage: str) -> int | None:
    """Total steps of a stage as its config sets them (when its checkpoint records none)."""
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
    st = StageStatus(stage, state, fps[stage], sd.root)
    if state == "corrupt":
        try:
            sd.manifest()
        except StageError as e:
            st.changes = [str(e)]
        return st
    manifest = sd.manifest()
    if state != "done":
        st.holder = sd.holder()
    if state == "done":
        assert manifest is not None
        st.metrics = {k: manifest["metrics"][k] for k in KEY_METRICS.get(stage, ()) if k in manifest.get("metrics", {})}
        st.wall_time_s = manifest.get("wall_time_s")
        if not sd.artifact.is_dir() or not any(sd.artifact.iterdir()):
            st.state = "broken"
            st.changes = [f"the manifest says done but {sd.artifact} is missing or empty"]
    elif state == "partial":
        st.step, recorded = sd.progress()
        st.max_steps = recorded or _configured_steps(cfg, stage)
    elif state == "stale":
        saved = _saved_config(sd)
        consumed = (manifest or sd.started()).get("inputs")  # a partial stage's: its fingerprint.json
        st.changes = config_changes(cfg, stage, saved or {}, consumed, _saved_contents(sd, manifest))
        if not st.changes:
            st.changes = [f"fingerprint {_found_fp(sd, manifest)} != {fps[stage]}"]
    return st


def _found_fp(sd: StageDir, manifest: dict[str, Any] | None) -> str:
    return str(manifest.get("fingerprint") if manifest else sd.started_fingerprint())


def run_status(cfg: RunConfig) -> list[StageStatus]:
    """Every stage of the run (tokenizer ... export), in order."""
    fps = all_fingerprints(cfg)
    return [stage_status(cfg, s, fps) for s in STAGES]
