"""The engine's private 0700 folder (rendezvous files, ipc sockets, weight-update files), and the reaping of
folders left behind by a front end that was killed (SIGKILL gives it no chance to clean up)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "flotilla-"


def make_private_dir() -> str:
    """A fresh folder named after this process (``flotilla-<pid>-<random>``), after removing those of dead
    front ends."""
    reap_stale()
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")


def owner_pid(path: str | os.PathLike) -> int | None:
    parts = Path(path).name[len(PREFIX):].split("-", 1)
    return int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def reap_stale(root: str | None = None) -> list[str]:
    """Remove this user's private folders whose owning process is gone; returns what was removed."""
    removed = []
    base = Path(root or tempfile.gettempdir())
    for d in base.glob(f"{PREFIX}*"):
        pid = owner_pid(d)
        try:
            mine = d.is_dir() and d.stat().st_uid == os.getuid()
        except OSError:
            continue
        if pid is None or not mine or _alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed
