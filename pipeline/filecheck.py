"""Cheap integrity checks of checkpoint and weight files, before anything loads them; no torch, nothing unpickled.

A file cut off by a kill or a full disk is found by its own structure: a safetensors header against the file
size, a zip archive's central directory (``torch.save`` files, accelerate's RNG states), a pickle's STOP opcode,
JSON that parses. The orchestrator checks the checkpoint a stage would resume from; the export checks the
source weights.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

__all__ = ["check_checkpoint", "check_file"]


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
