"""What a manifest records about the code that made it: package versions and the git revision.

The revision is recorded, not hashed into fingerprints: a new commit does not invalidate finished stages.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["package_versions", "git_revision"]


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a stage's numbers depend on (those that are installed)."""
    out = {}
    for name in ("torch", "transformers", "accelerate", "trl", "datasets", "tokenizers", "tiktoken", "deepspeed"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_revision() -> str:
    """The checkout's HEAD commit, with ``-dirty`` when tracked files changed; ``unknown`` outside git."""
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
