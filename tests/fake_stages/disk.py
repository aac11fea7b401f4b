"""A 1 MiB tmpfs to fill up: the full-disk tests (needs root; skipped where mounting is not allowed)."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("needs root and tmpfs to simulate a full disk")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
