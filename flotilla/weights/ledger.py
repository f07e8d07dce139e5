"""The version ledger: the one owner of the weight version every replica serves, its history, and what a
replica started later (failover, scale-up) loads on top of the checkpoint to catch up."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_VERSION = 2**63 - 1
HISTORY = 64  # entries kept


@dataclass(frozen=True)
class LedgerEntry:
    """One committed update: its version, the transport it came by, whether it covered every weight, when."""

    version: int
    transport: str
    full: bool
    at: float


class VersionLedger:
    """``version`` (0: the checkpoint the engine started with), ``history()``, and the replay list: sources in
    order, or None once an update cannot be replayed (it did not come from a file every rank can read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._history: list[LedgerEntry] = []
        self._replay: list[str] | None = []

    @property
    def version(self) -> int:
        return self._version

    def next_version(self, version: int | None) -> int:
        """The version an update takes: ``version`` if given (checked), else the current one + 1."""
        if version is None:
            return self._version + 1
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
            raise ValueError(f"version: must be an int in [0, 2**63 - 1], got {version!r}")
        return version

    def commit(self, version: int, transport: str, replay: str | None, full: bool) -> None:
        """Every replica serves ``version`` now. ``replay``: the file source a later replica replays, or None
        when the update cannot be replayed; ``full``: it covered every weight (earlier replays are moot)."""
        with self._lock:
            self._version = version
            self._history.append(LedgerEntry(version, transport, full, time.time()))
            del self._history[:-HISTORY]
            if replay is None:
                self._replay = None
            elif full:
                self._replay = [replay]
            elif self._replay is not None:
                self._replay.append(replay)

    def history(self) -> list[LedgerEntry]:
        with self._lock:
            return list(self._history)

    def replay_files(self) -> set[str]:
        """The sources a later replica would replay (the update files to keep)."""
        with self._lock:
            return set(self._replay or [])

    def replay_args(self) -> dict[str, Any]:
        """WorkerArgs fields for a replica that starts now: the updates to replay, and their version."""
        with self._lock:
            replay, version = self._replay, self._version
        if replay is None:
            log.warning("a replica starts with the checkpoint's weights: update v%d came from object refs and "
                        "cannot be replayed (its stats show weight_version 0 until the next update)", version)
            return {"weights_sources": [], "weight_version": 0}
        return {"weights_sources": list(replay), "weight_version": version}
