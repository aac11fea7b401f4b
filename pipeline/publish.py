"""Publishing the exported model as a copy outside the run folder (``export.dir``, ``EXPORT_DIR``).

Used by the export stage and by the orchestrator (an export already done is still copied where the current
command asks). No torch: file operations only.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
from pathlib import Path

from .runs import StageDir

__all__ = ["publish"]

log = logging.getLogger(__name__)


def publish(artifact: Path, dest: Path) -> bool:
    """Copy the export artifact to ``dest`` (``EXPORT_DIR``) unless an identical copy is already there.

    Returns:
        True when files were copied. The copy goes to ``<dest>.tmp`` first; a different ``dest`` already there
        is moved aside to ``<dest>.old-<time>``, never deleted.
    """
    artifact, dest = Path(artifact), Path(dest)
    if dest.resolve() == artifact.resolve():
        return False
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
