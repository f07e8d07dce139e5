"""What the weights package needs from the objects around it, as small public protocols (no friend classes).

``ControlPort`` is the control plane's part: the one lock of control operations, the op round trip to the
leaders, holding the engine paused around an update, the memory state, and the store probe. ``FleetView`` is
the replica fleet's part: which replicas are up, and every rank's place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol


class ControlPort(Protocol):
    #: held for the whole of one control operation (one runs at a time)
    lock: threading.RLock

    @property
    def memory_released(self) -> bool: ...

    def run_op(self, name: str, timeout: float, *, make: Callable[[int], Any] | None = None,
               make_for: Callable[[int, int], Any] | None = None, check: bool = True,
               targets: set[int] | None = None) -> None:
        """Send one op to every ready leader (or ``targets``) and wait for every answer; raises naming the
        replicas that failed (unless not ``check``). ``make(op_id)`` or ``make_for(op_id, replica)``."""

    def held(self, timeout: float) -> AbstractContextManager[None]:
        """The engine paused for the block (unless it already was), resumed after."""

    def probe_store(self, host: str, port: int, timeout_s: float) -> None:
        """Wait until a trainer's store accepts a connection (reported as the join under way)."""


class FleetView(Protocol):
    def ready_replicas(self) -> set[int]: ...

    def rank_layout(self) -> list[tuple[int, int, int]]:
        """(replica, group id, rank in group) of every rank, sorted; raises while a group is not ready."""
