"""The fleet's per-replica links over the front end's ChannelHub (one PUSH socket per replica, bound by the
front end, which the replica's leader connects to)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from flotilla.ipc.channel import ChannelHub


class HubLinks:
    """A send never waits for a peer that is not connected (the request then goes elsewhere or waits in the
    fleet's queue) unless the caller gives a timeout; each socket has its own lock, as zmq sockets are not
    thread-safe."""

    def __init__(self, hub: ChannelHub):
        self.hub = hub
        self.channels: dict[int, Any] = {}

    def open(self, replica: int) -> tuple[Callable[..., None], str]:
        ch, addr = self.hub.bind("push", f"in{replica}", None)
        self.channels[replica] = ch
        lock = threading.Lock()

        def send(msg: object, timeout_ms: int = 0) -> None:
            with lock:
                ch.send(msg, timeout_ms=timeout_ms)

        return send, addr

    def writable(self, replica: int) -> bool:
        ch = self.channels.get(replica)
        return ch is not None and ch.writable()

    def close(self, replica: int) -> None:
        ch = self.channels.pop(replica, None)
        if ch is not None:
            self.hub.release(ch)  # closes it and removes its ipc socket file
