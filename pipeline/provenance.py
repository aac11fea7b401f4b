"""What a manifest records about the code and the files that made it: package versions, the git revision, and
content hashes of the files a user supplies (datasets, corpus files, model folders; :class:`ContentHashes`).

The revision is recorded, not hashed into fingerprints: a new commit does not invalidate finished stages. The
content hashes are hashed into them (``pipeline.lineage``): a dataset edited in place makes its stage stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["package_versions", "git_revision", "ContentHashes"]


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


# ----------------------------------------------------------------------------- content hashes of user inputs

_CHUNK = 1 << 20
_SKIPPED_SUFFIXES = (".md",)
"""Files of a model folder that say nothing about the model (a model card)."""


class ContentHashes:
    """SHA-256 of local files and model folders, cached by (absolute path, size, mtime_ns).

    Files are streamed in 1 MiB chunks, so a 10 GB corpus is read once; later calls only ``stat`` it while its
    size and modification time are unchanged. The cache is a small JSON file (``path``: absolute path ->
    ``[size, mtime_ns, sha256]``), read when this object is made and written by :meth:`save` when it changed. A
    file edited in place keeps neither its modification time nor (usually) its size, so it is hashed again; a
    file touched without a change is hashed again and gives the same hash. Several processes may share the file:
    the last writer wins, which costs at most a hash computed again.

    Args:
        path: the cache file; None keeps the cache in memory only.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.hashed: list[str] = []
        """Absolute paths read (not found in the cache) by this object, in order: for tests and logs."""
        self._dirty = False
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text())
                if isinstance(loaded, dict):
                    self.entries = {k: v for k, v in loaded.items() if isinstance(v, list) and len(v) == 3}
            except (OSError, ValueError):
                pass  # a broken cache is only a cache: start again

    def file(self, path: str | Path) -> str:
        """The SHA-256 of the file at ``path`` (hex), from the cache when its size and mtime match.

        Raises:
            OSError: the file cannot be read (e.g. it does not exist).
        """
        key = os.path.abspath(os.path.expanduser(str(path)))
        st = os.stat(key)
        hit = self.entries.get(key)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return str(hit[2])
        h = hashlib.sha256()
        with open(key, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.hashed.append(key)
        self._dirty = True
        return digest

    def folder(self, path: str | Path) -> str:
        """One SHA-256 over every file under ``path`` (relative name and content hash, sorted by name).

        Hidden files and folders (``.git``, ``.cache``, our ``.lock``) and ``*.md`` (a model card) are left out.
        """
        root = Path(path).expanduser()
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() in _SKIPPED_SUFFIXES:
                continue
            if p.is_file():
                h.update(f"{rel.as_posix()}\0{self.file(p)}\n".encode())
        return h.hexdigest()

    def save(self) -> None:
        """Write the cache file when something was hashed (atomically; errors ignored: it is only a cache)."""
        if self.path is None or not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            on_disk: dict[str, Any] = {}
            if self.path.is_file():  # keep what other processes added meanwhile
                try:
                    loaded = json.loads(self.path.read_text())
                    on_disk = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError):
                    pass
            tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({**on_disk, **self.entries}, indent=0, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            pass


def deepspeed_launch() -> bool:
    """Whether ``accelerate launch`` started this process under DeepSpeed (it sets ``ACCELERATE_USE_DEEPSPEED`` for a
    DeepSpeed config). Here, without torch, so that config loading and the orchestrator's imports can ask it too."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
