"""The DP controller: routing only. The view of every replica it routes to, the policy, affinity, and send.

It is plain, thread-safe bookkeeping with no I/O of its own beyond the per-replica send callables it is
given, so it can be unit-tested without processes. A request's life (the in-flight table, waiting, failover,
poison accounting) is the dispatcher's (``router/dispatch.py``); replica lifecycle (start, death, restart,
scale) is the fleet's (``router/fleet.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flotilla.ipc.channel import EncodeError
from flotilla.ipc.messages import AbortRequest, AddRequest, ReplicaLoad
from flotilla.frontend.request import RequestState
from flotilla.router.policies import NoReplicaAvailable, ReplicaView, make_policy

log = logging.getLogger(__name__)

Send = Callable[..., None]  # send(msg, timeout_ms=0): raises when the replica's link did not take it


class ReplicaUnreachable(NoReplicaAvailable):
    """The chosen replica's link did not take the message (not connected yet, or gone)."""

    def __init__(self, replica: int, why: str):
        super().__init__(f"replica {replica} is unreachable: {why}")
        self.replica = replica


class RequestRejected(ValueError):
    """The request itself cannot be sent (its message does not encode): its own error, never the replica's."""


class DPController:
    """Routing only: which replicas there are (their views), the policy, affinity, reservations for requests
    that run alone, and the send. The requests themselves are the dispatcher's (``router/dispatch.py``); the
    controller never writes a ``RequestState``. A leaf under its own lock: it calls nothing back."""

    def __init__(self, load_balance: str, **policy_kwargs):
        self.policy = make_policy(load_balance, **policy_kwargs)
        self.lock = threading.RLock()
        self.views: dict[int, ReplicaView] = {}
        self.senders: dict[int, Send] = {}
        self.affinity: dict[str, tuple[int, set[str]]] = {}  # affinity key -> (replica, its rids in flight)
        self.reservations: dict[str, int] = {}  # request id -> the replica kept for it alone

    # ------------------------------------------------------------------------------------------ replicas
    def add_replica(self, replica: int, send: Send) -> None:
        with self.lock:
            self.views[replica] = ReplicaView(replica)
            self.senders[replica] = send

    def remove_replica(self, replica: int) -> None:
        """Forget a replica (and any reservation of it)."""
        with self.lock:
            self.views.pop(replica, None)
            self.senders.pop(replica, None)
            self.policy.forget_replica(replica)
            for rid in [r for r, t in self.reservations.items() if t == replica]:
                del self.reservations[rid]

    def set_accepting(self, replica: int, accepting: bool) -> None:
        """A draining replica keeps its requests but gets no new ones."""
        with self.lock:
            if replica in self.views:
                self.views[replica].accepting = accepting

    def send(self, replica: int, msg: object, timeout_ms: int = 0) -> bool:
        """Send to one replica; False when it did not take it (within ``timeout_ms``: 0 never waits)."""
        with self.lock:
            send = self.senders.get(replica)
        if send is None:
            return False
        try:
            send(msg, timeout_ms=timeout_ms)
            return True
        except EncodeError:  # the message's fault, not the replica's: the caller's error
            raise
        except Exception as e:  # not connected yet, or gone: liveness and the fleet deal with it
            log.debug("replica %d did not take %s: %s", replica, type(msg).__name__, e)
            return False

    def on_report(self, replica: int, load: ReplicaLoad) -> None:
        with self.lock:
            view = self.views.get(replica)
            if view is not None:
                view.on_report(load)

    # ------------------------------------------------------------------------------------------ routing
    def dispatch(self, state: RequestState, replica: int | None = None, exclude: frozenset[int] = frozenset()) -> int:
        """Pick a replica (unless given) and send the request there; returns it. Raises NoReplicaAvailable, or
        ReplicaUnreachable when the chosen one did not take it, or RequestRejected when the request's message
        does not encode (nothing is then recorded on any replica)."""
        with self.lock:
            if replica is None:
                pinned = self.affinity.get(state.affinity) if state.affinity else None
                if pinned and pinned[0] in self.views and self.views[pinned[0]].eligible and pinned[0] not in exclude:
                    replica = pinned[0]
                else:
                    views = [v for v in self.views.values() if v.replica_id not in exclude]
                    replica = self.policy.select(views, state.prompt_ids, state.sampling.max_new_tokens)
            view = self.views.get(replica)
            if view is None:
                raise NoReplicaAvailable(f"replica {replica} is not routed to")
            try:
                self.senders[replica](AddRequest(state.rid, state.prompt_ids, state.sampling, list(state.output_ids),
                                                   **state.resume_state()))
            except EncodeError as e:  # the request's fault: every other replica would refuse it too
                raise RequestRejected(f"request: cannot be sent to a replica ({e}); a field is out of range") from None
            except Exception as e:
                raise ReplicaUnreachable(replica, str(e)) from None
            if state.affinity:
                rids = self.affinity.get(state.affinity, (replica, set()))[1]
                rids.add(state.rid)
                self.affinity[state.affinity] = (replica, rids)
            view.on_dispatch(len(state.prompt_ids), state.sampling.max_new_tokens)
            self.policy.on_dispatch(replica, state.prompt_ids)
            return replica

    def left(self, replica: int, rid: str, affinity: str | None) -> None:
        """A request is off ``replica`` (finished, moved, retracted): its load and affinity no longer count."""
        with self.lock:
            view = self.views.get(replica)
            if view is not None:
                view.on_finish()
            entry = self.affinity.get(affinity) if affinity else None
            if entry is not None and entry[0] == replica:
                entry[1].discard(rid)
                if not entry[1]:
                    del self.affinity[affinity]

    def abort_on(self, replica: int, rid: str) -> None:
        """Tell one replica to drop a request that has moved elsewhere (its late output is ignored)."""
        self.send(replica, AbortRequest(rid, "moved"))

    # ------------------------------------------------------------------------------------------ alone
    def reserve(self, rid: str) -> int | None:
        """The replica kept for ``rid`` to run alone (no other request is routed there until released): the
        one already kept, or a live accepting one with the least in flight; None when none can be spared."""
        with self.lock:
            kept = self.reservations.get(rid)
            if kept is not None and kept in self.views:
                return kept
            free = [v for v in self.views.values() if v.eligible]
            if not free:
                return None
            view = min(free, key=lambda v: (v.inflight, v.replica_id))
            view.reserved_for = rid
            self.reservations[rid] = view.replica_id
            return view.replica_id

    def release(self, rid: str) -> None:
        with self.lock:
            replica = self.reservations.pop(rid, None)
            view = self.views.get(replica) if replica is not None else None
            if view is not None and view.reserved_for == rid:
                view.reserved_for = None

    def reserved(self) -> bool:
        """Some replica is kept for a request alone (others may have to wait for it)."""
        with self.lock:
            return bool(self.reservations)


__all__ = ["DPController", "NoReplicaAvailable", "ReplicaUnreachable", "RequestRejected"]
