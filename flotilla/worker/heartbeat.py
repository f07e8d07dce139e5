"""A leader's sign of life, sent from a thread of its own.

Why not from the step loop: a leader busy in one long step (a long CPU prefill, a first kernel compile, a
weight load) would look dead to the front end although it is working. This thread keeps sending while the
step loop is busy, and stops only when the whole process stops: killed, crashed, or SIGSTOPped (which
stops every thread). So "no Heartbeat for a while" means a dead or frozen process, never a slow step.

The step loop shares two plain attributes with the thread (``steps`` and ``busy_since``): it only assigns
them, the thread only reads them, and under the GIL each read sees a whole value. The thread owns its
own ZMQ socket (sockets are not thread-safe), connected to the same front-end address with the same keys.
"""

from __future__ import annotations

import logging
import threading
import time

from flotilla.ipc.channel import CurveKeys, connect
from flotilla.ipc.messages import Heartbeat

log = logging.getLogger(__name__)


class HeartbeatThread:
    """Sends ``Heartbeat(replica, rank, steps, step_age_s)`` to ``out_addr`` every ``interval_s``."""

    def __init__(self, replica: int, rank: int, out_addr: str, keys: CurveKeys | None, interval_s: float):
        self.replica, self.rank = replica, rank
        self.out_addr, self.keys, self.interval_s = out_addr, keys, interval_s
        self.steps = 0             # forward steps completed (assigned by the step loop)
        self.busy_since = 0.0      # time.monotonic() when the step loop left its socket; 0.0 while it waits
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"flotilla-heartbeat-r{replica}", daemon=True)

    def start(self) -> HeartbeatThread:
        self._thread.start()
        return self

    def busy(self) -> None:
        """The step loop starts work (a step, or waiting on its group's collectives)."""
        self.busy_since = time.monotonic()

    def idle(self) -> None:
        """The step loop is back at its request socket."""
        self.busy_since = 0.0

    def message(self) -> Heartbeat:
        since = self.busy_since
        age = time.monotonic() - since if since else 0.0
        return Heartbeat(self.replica, self.rank, self.steps, max(0.0, age))

    def _run(self) -> None:
        try:
            ch = connect("push", self.out_addr, None, self.keys)  # created and used in this thread only
        except Exception:  # the replica then looks dead to the front end, which is the truth that matters
            log.exception("replica %d: heartbeat thread cannot connect to %s", self.replica, self.out_addr)
            return
        try:
            while True:
                try:
                    ch.send(self.message())
                except Exception as e:  # never ends the thread: a missed beat is the front end's to judge
                    log.warning("replica %d: heartbeat not sent: %s", self.replica, e)
                if self._stop.wait(self.interval_s):
                    return
        finally:
            ch.close()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
