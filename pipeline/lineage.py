"""Stage fingerprints: which config sections, upstream stages and user files each stage depends on.

Fingerprint = hash(this stage's resolved config sections + its inputs' fingerprints + the content hashes of the
local files it reads that the user supplies). The code revision is recorded in the manifest, not hashed: a new
commit does not invalidate finished stages. A stage that starts from an external model (``init_from``) does not
depend on the upstream stage.

The user's files (:func:`input_contents`): a local dataset file (``sft.dataset.source``/``eval_source``, same
for ``reward`` and ``ppo``), the corpus files of ``data.corpus.source=files`` (``data.corpus.paths``, globs
expanded) and a local model folder (``pretrain.init_from``, ``sft.init_from``, ``reward.init_from``,
``ppo.policy_from``, ``ppo.reward_from``): a stage artifact of ours counts by its manifest's fingerprint, any
other folder by the content of its files. ``default`` data and Hub names (``hub:<name>``, a model name) have
no local file: the config alone describes them, and a run that uses only those has the fingerprints it always had.
Content hashes are cached by size and mtime in ``runs/<run>/.input_hashes.json``
(``pipeline.provenance.ContentHashes``), so ``make status`` only ``stat``s a large corpus.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

from .config import DatasetSpec, RunConfig, fingerprint
from .data.corpus.files import glob_files
from .data.tasks import GENERATOR_VERSION
from .provenance import ContentHashes

__all__ = [
    "stage_inputs",
    "stage_sections",
    "all_fingerprints",
    "input_contents",
    "content_changes",
    "hash_cache_path",
    "UPSTREAM",
]

UPSTREAM: dict[str, tuple[str, ...]] = {
    "tokenizer": (),
    "pretrain": ("tokenizer",),
    "sft": ("pretrain",),
    "reward": ("sft",),
    "ppo": ("sft", "reward"),
    "export": ("ppo",),
}
HASH_CACHE = ".input_hashes.json"
"""The content-hash cache's file name in the run folder."""
MISSING = "missing"
"""The content hash recorded for a file or folder that does not exist (or a glob that matches nothing)."""


def stage_inputs(cfg: RunConfig, stage: str) -> tuple[str, ...]:
    """The upstream stages ``stage`` consumes under this config."""
    if stage == "pretrain" and cfg.pretrain.init_from and cfg.tokenizer.kind == "gpt2":
        return ("tokenizer",)
    if stage == "sft" and cfg.sft.init_from:
        return ()
    if stage == "reward" and cfg.reward.init_from:
        return ()
    if stage == "ppo":
        ups = []
        if not cfg.ppo.policy_from:
            ups.append("sft")
        if not cfg.ppo.reward_from:
            ups.append("reward")
        return tuple(ups)
    if stage == "export":
        return (cfg.export.source,)
    return UPSTREAM[stage]


def stage_sections(cfg: RunConfig, stage: str) -> tuple:
    """The config values ``stage``'s fingerprint hashes (the ``report:`` section is in none: it judges runs)."""
    seed = cfg.run.seed
    if stage == "tokenizer":
        return (seed, cfg.tokenizer, cfg.data.corpus)
    if stage == "pretrain":  # the optimizer keys count only when they change something (fingerprint_fields)
        return (seed, cfg.model, cfg.pretrain.fingerprint_fields(), cfg.data.corpus)
    # the generated tasks are made by code: their version (bumped on any change in generated output) counts too
    if stage == "sft":
        return (seed, cfg.sft, cfg.data.tasks, GENERATOR_VERSION)
    if stage == "reward":
        return (seed, cfg.reward, cfg.data.tasks, GENERATOR_VERSION)
    if stage == "ppo":
        return (seed, cfg.ppo, cfg.data.tasks, GENERATOR_VERSION)
    if stage == "export":
        # where the export is written, and which files are derived from it beside it (export.formats: the GGUF
        # files), do not change what it is: `make export FORMAT=gguf` after `make all` adds the GGUF files to the
        # done export (stages/export.py) instead of calling it stale
        return (cfg.export.source, cfg.export.dtype, cfg.export.max_shard_size, cfg.export.license)
    raise KeyError(stage)


def hash_cache_path(cfg: RunConfig) -> Path:
    """Where the content hashes of a run's input files are cached: ``runs/<run>/.input_hashes.json``."""
    return cfg.run_dir / HASH_CACHE


def _user_files(cfg: RunConfig, stage: str) -> list[tuple[str, str, str]]:
    """The local files and folders ``stage`` reads that the config names: (config key, kind, path as written).

    ``kind`` is ``file``, ``folder`` (a model folder) or ``pattern`` (a corpus glob, expanded later).
    """
    out: list[tuple[str, str, str]] = []

    def dataset(key: str, spec: DatasetSpec) -> None:
        for field_name in ("source", "eval_source"):
            value = getattr(spec, field_name)
            if value and value != "default" and not value.startswith("hub:"):
                out.append((f"{key}.{field_name}", "file", value))

    def model(key: str, value: str) -> None:
        # a name that is no local folder is a Hub model name: the config describes it
        if value and Path(value).expanduser().is_dir():
            out.append((key, "folder", value))

    if stage == "tokenizer" and cfg.data.corpus.source == "files":
        out += [("data.corpus.paths", "pattern", p) for p in cfg.data.corpus.paths]
    elif stage == "pretrain":
        model("pretrain.init_from", cfg.pretrain.init_from)
    elif stage == "sft":
        model("sft.init_from", cfg.sft.init_from)
        dataset("sft.dataset", cfg.sft.dataset)
    elif stage == "reward":
        model("reward.init_from", cfg.reward.init_from)
        dataset("reward.dataset", cfg.reward.dataset)
    elif stage == "ppo":
        model("ppo.policy_from", cfg.ppo.policy_from)
        model("ppo.reward_from", cfg.ppo.reward_from)
        dataset("ppo.dataset", cfg.ppo.dataset)
    return out


def _corpus_files(pattern: str) -> list[str]:
    """The files a ``data.corpus.paths`` entry names, as ``pipeline.data.corpus.files`` resolves them."""
    return sorted(glob_files(pattern)) if glob.has_magic(pattern) else [pattern]


def _file_hash(hashes: ContentHashes, path: str) -> str:
    try:
        return hashes.file(path)
    except FileNotFoundError:
        return MISSING
    except OSError as e:
        return f"unreadable ({e.strerror})"


def _stage_manifest_fingerprint(folder: Path) -> str | None:
    """``manifest:<fingerprint>`` when ``folder`` is the ``artifact/`` of a stage of ours with a manifest."""
    manifest = folder.parent / "manifest.json"
    if folder.name != "artifact" or not manifest.is_file():
        return None
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(m, dict) and isinstance(m.get("fingerprint"), str) and m.get("stage"):
        return f"manifest:{m['fingerprint']}"
    return None


def input_contents(cfg: RunConfig, stage: str, hashes: ContentHashes | None = None) -> dict[str, str]:
    """What ``stage`` reads from the user's files, one entry per file or folder: ``"<key> <kind> <path>"`` ->
    its content hash (SHA-256; ``manifest:<fingerprint>`` for a stage artifact of ours; ``missing``).

    Empty for a stage that reads only ``default`` data, Hub datasets and Hub models (the default run).

    >>> from pipeline.config import load_config
    >>> input_contents(load_config(None), "sft")
    {}
    """
    own = hashes is None
    hashes = hashes or ContentHashes(hash_cache_path(cfg))
    out: dict[str, str] = {}
    for key, kind, value in _user_files(cfg, stage):
        if kind == "pattern":
            files = _corpus_files(value)
            if not files:
                out[f"{key} pattern {value}"] = MISSING
            for f in files:
                out[f"{key} file {f}"] = _file_hash(hashes, f)
        elif kind == "file":
            out[f"{key} file {value}"] = _file_hash(hashes, value)
        else:
            folder = Path(value).expanduser()
            out[f"{key} folder {value}"] = _stage_manifest_fingerprint(folder) or hashes.folder(folder)
    if own:
        hashes.save()
    return out


def content_changes(now: dict[str, str], before: dict[str, Any]) -> list[str]:
    """Explain, one line per input, how a stage's user files differ from those it was made with.

    >>> content_changes({"sft.dataset.source file d.jsonl": "b"}, {"sft.dataset.source file d.jsonl": "a"})
    ['input sft.dataset.source file d.jsonl changed']
    """
    lines = []
    for label in sorted(set(now) | set(before)):
        if label not in before:
            lines.append(f"input {label} added")
        elif label not in now:
            lines.append(f"input {label} no longer read")
        elif now[label] != before[label]:
            lines.append(f"input {label} {'is missing' if now[label] == MISSING else 'changed'}")
    return lines


def all_fingerprints(cfg: RunConfig, contents: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Every stage's fingerprint, upstream first (each hashes its sections, its inputs' fingerprints and, when it
    reads user files, their content hashes: :func:`input_contents`).

    Args:
        cfg: the resolved run config.
        contents: stage -> :func:`input_contents`, when the caller has them already; computed otherwise.
    """
    hashes = ContentHashes(hash_cache_path(cfg)) if contents is None else None
    fps: dict[str, str] = {}
    for stage in UPSTREAM:
        files = contents[stage] if contents is not None else input_contents(cfg, stage, hashes)
        parts = [*stage_sections(cfg, stage), *[fps[u] for u in stage_inputs(cfg, stage)]]
        fps[stage] = fingerprint(*parts, *([{"contents": files}] if files else []))
    if hashes is not None:
        hashes.save()
    return fps
