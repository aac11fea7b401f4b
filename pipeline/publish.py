"""Publishing the exported model as a copy outside the run folder (``export.dir``, ``EXPORT_DIR``), with its GGUF
files (``export.formats=[hf,gguf]``) beside the copy as they lie beside the artifact.

Used by the export stage and by the orchestrator (an export already done is still copied where the current
command asks). No torch: file operations only.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
from pathlib import Path

from .config import ConfigError, RunConfig
from .runs import STAGES, StageDir

__all__ = ["publish", "check_export_dir", "gguf_file_name", "missing_gguf"]

log = logging.getLogger(__name__)

_PROJECT = Path(__file__).resolve().parents[1]
"""The folder holding this project's pyproject.toml."""


def _git_checkout(start: Path) -> Path | None:
    return next((d for d in (start, *start.parents) if (d / ".git").exists()), None)


def gguf_file_name(name: str, out_type: str) -> str:
    """``<name>-<type>.gguf``, e.g. ``tiny-q8_0.gguf``: the GGUF files of run ``name``'s export folder."""
    return f"{name}-{out_type}.gguf"


def missing_gguf(cfg: RunConfig) -> list[str]:
    """The GGUF output types the config asks for (``export.formats``, ``export.gguf_types``) that the run's export
    folder does not hold: a done export lacking them is completed, not made again (``stages/export.py``)."""
    if "gguf" not in cfg.export.formats:
        return []
    root = StageDir.of(cfg.run_dir, "export").root
    return [t for t in cfg.export.gguf_types if not (root / gguf_file_name(cfg.run.name, t)).is_file()]


def check_export_dir(dest: str | Path, run_dir: str | Path) -> Path:
    """The folder ``export.dir`` names, resolved, once it is safe to replace with the export.

    Publishing moves whatever ``dest`` holds aside, so ``dest`` must neither be nor hold the run root, the run
    folder, a stage folder, this project, the current git checkout or the current folder, and must not lie inside
    a stage folder (only the export artifact itself, where there is nothing to copy).

    Raises:
        ConfigError: naming ``export.dir``, the path and what it would have moved; nothing is touched.
    """
    raw = str(dest)
    where = f"export.dir={raw}"
    if raw.strip() == "" or Path(raw).name in ("", ".", ".."):
        raise ConfigError(
            f"{where}: not a folder name to publish the export into; name a new folder, e.g. export.dir=hf_export"
        )
    d = Path(raw).expanduser().resolve()
    run_dir = Path(run_dir).resolve()
    cwd = Path.cwd().resolve()
    guarded = {"the run root": run_dir.parent, "the run folder": run_dir, "this project": _PROJECT}
    guarded |= {f"the {s} stage folder": run_dir / s for s in STAGES}
    guarded |= {"the current folder": cwd, "the git checkout": _git_checkout(cwd) or cwd}
    for what, p in guarded.items():
        if d == p or d in p.parents:
            raise ConfigError(
                f"{where}: {d} {'is' if d == p else 'holds'} {what} ({p}); publishing there would move it aside. "
                f"Nothing was changed; name a folder of its own, e.g. export.dir=hf_export"
            )
    if d.exists() and not _is_export(d):
        what = "a file" if not d.is_dir() else "a folder that is not a model export"
        raise ConfigError(
            f"{where}: {d} is {what}; publishing there would move it aside. Nothing was changed; name a new folder, "
            f"or one that holds an earlier export (config.json and safetensors weights)"
        )
    inside = [s for s in STAGES if (run_dir / s) in d.parents and d != run_dir / "export" / "artifact"]
    if inside:
        raise ConfigError(
            f"{where}: {d} lies inside the {inside[0]} stage folder; publishing there would change that stage. "
            f"Nothing was changed; name a folder outside {run_dir}/<stage>/"
        )
    return d


def _is_export(d: Path) -> bool:
    """An earlier export (or an empty folder), which publishing may move aside: a model directory with its config
    and safetensors weights, not a source tree, a git folder or a file."""
    if not d.is_dir():
        return False
    names = {p.name for p in d.iterdir()}
    return not names or (
        "config.json" in names
        and any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names)
    )


def publish(artifact: Path, dest: Path, run_dir: Path) -> bool:
    """Copy the export artifact of run ``run_dir`` to ``dest`` (``EXPORT_DIR``) unless an identical copy is there,
    and the GGUF files beside the artifact (``<run>-<type>.gguf``) beside ``dest``.

    Returns:
        True when files were copied. The copy goes to ``<dest>.tmp`` first; a different ``dest`` (or GGUF file)
        already there is moved aside to ``<dest>.old-<time>``, never deleted.

    Raises:
        ConfigError: ``dest`` is or holds the run, a stage folder or the repository (see :func:`check_export_dir`).
    """
    artifact, dest = Path(artifact), check_export_dir(dest, run_dir)
    if dest.resolve() == artifact.resolve():
        return False
    changed = _publish_dir(artifact, dest)
    copied = [_publish_file(f, dest.parent / f.name) for f in sorted(artifact.parent.glob("*.gguf"))]
    return changed or any(copied)


def _publish_file(src: Path, dest: Path) -> bool:
    if dest.is_file() and filecmp.cmp(src, dest, shallow=False):
        return False
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    if dest.exists():
        log.info("%s held something else: moved aside to %s", dest, StageDir(dest).move_aside())
    os.replace(tmp, dest)
    log.info("%s copied to %s", src.name, dest)
    return True


def _publish_dir(artifact: Path, dest: Path) -> bool:
    if dest.is_dir():
        cmp = filecmp.dircmp(artifact, dest)
        same = not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files)
        if same and all(filecmp.cmp(artifact / f, dest / f, shallow=False) for f in cmp.common_files):
            return False
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(artifact, tmp)
    if dest.exists():
        log.info("%s held something else: moved aside to %s", dest, StageDir(dest).move_aside())
    os.replace(tmp, dest)
    log.info("export copied to %s", dest)
    return True
