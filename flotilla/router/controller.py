"""The DP controller: the front end's table of in-flight requests and the view of every replica it routes to.

It is plain, thread-safe bookkeeping with no I/O of its own beyond the per-replica send callables it is
given, so it can be unit-tested without processes. Replica lifecycle (start, death, restart, scale) is the
fleet's (``router/fleet.py``); the controller only learns which replicas to route to.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flotilla.ipc.channel import EncodeError
from flotilla.ipc.messages import AbortRequest, AddRequest, StepOutput
from flotilla.request import RequestState
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
    def __init__(self, load_balance: str, **policy_kwargs):
        self.policy = make_policy(load_balance, **policy_kwargs)
        self.lock = threading.RLock()
        self.requests: dict[str, RequestState] = {}
        self.views: dict[int, ReplicaView] = {}
        self.senders: dict[int, Send] = {}
        # paused (weight updates, memory release): new requests wait here, in order, for resume()
        self.paused = False
        self.held: dict[str, RequestState] = {}
        self.affinity: dict[str, tuple[int, set[str]]] = {}  # affinity key -> (replica, its rids in flight)

    # ------------------------------------------------------------------------------------------ replicas
    def add_replica(self, replica: int, send: Send) -> None:
        with self.lock:
            self.views[replica] = ReplicaView(replica)
            self.senders[replica] = send

    def remove_replica(self, replica: int) -> list[RequestState]:
        """Forget a replica; returns the requests it still held (the caller fails or moves them)."""
        with self.lock:
            self.views.pop(replica, None)
            self.senders.pop(replica, None)
            self.policy.forget_replica(replica)
            return [s for s in self.requests.values() if s.replica == replica and not s.finished]

    def set_accepting(self, replica: int, accepting: bool) -> None:
        """A draining replica keeps its requests but gets no new ones."""
        with self.lock:
            if replica in self.views:
                self.views[replica].accepting = accepting

    def requests_on(self, replica: int) -> list[RequestState]:
        with self.lock:
            return [s for s in self.requests.values() if s.replica == replica and not s.finished]

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

    # ------------------------------------------------------------------------------------------ requests
    def admit(self, state: RequestState) -> None:
        """Claim a request id among those in flight (two live requests never share one)."""
        with self.lock:
            if state.rid in self.requests:
                raise ValueError(f"request_id: {state.rid!r} is already in flight; request ids must be unique")
            self.requests[state.rid] = state

    def dispatch(self, state: RequestState, replica: int | None = None, exclude: frozenset[int] = frozenset()) -> int:
        """Pick a replica (unless given) and send the request there; raises NoReplicaAvailable, or
        ReplicaUnreachable when the chosen one did not take it (nothing is then recorded on it). While paused
        a request without a given replica is held (returns -1) until resume()."""
        with self.lock:
            self.requests[state.rid] = state
            if replica is None and self.paused:
                self._leave(state)
                state.replica = -1
                self.held[state.rid] = state
                return -1
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
                self.senders[replica](AddRequest(state.rid, state.prompt_ids, state.sampling, list(state.output_ids)))
            except EncodeError as e:  # the request's fault: every other replica would refuse it too
                state.replica = -1
                raise RequestRejected(f"request: cannot be sent to a replica ({e}); a field is out of range") from None
            except Exception as e:
                state.replica = -1
                raise ReplicaUnreachable(replica, str(e)) from None
            if state.replica != replica:
                self._leave(state)
            if state.affinity:
                rids = self.affinity.get(state.affinity, (replica, set()))[1]
                rids.add(state.rid)
                self.affinity[state.affinity] = (replica, rids)
            state.replica = replica
            view.on_dispatch(len(state.prompt_ids), state.sampling.max_new_tokens)
            self.policy.on_dispatch(replica, state.prompt_ids)
            return replica

    def _leave(self, state: RequestState) -> None:
        """A request moves off its replica (drain, retract): that replica's load no longer counts it."""
        view = self.views.get(state.replica)
        if view is not None:
            view.on_finish()

    def abort(self, rid: str, reason: str = "abort") -> RequestState | None:
        """Ask for a request to end. It is marked, so that a failover of its replica ends it instead of
        resuming it; held or undispatched requests end here at once."""
        with self.lock:
            state = self.requests.get(rid)
            if state is None:
                return None
            state.abort_requested = True
            if self.held.pop(rid, None) is not None or state.replica < 0:  # never sent anywhere: it ends here
                self.finish_locally(state, reason)
                return state
            self.send(state.replica, AbortRequest(rid, reason))
            return state

    def pause(self) -> None:
        with self.lock:
            self.paused = True

    def resume(self) -> list[RequestState]:
        """Stop holding; returns the held requests, oldest first, for the caller to dispatch again."""
        with self.lock:
            self.paused = False
            held = list(self.held.values())
            self.held.clear()
            return held

    def abort_on(self, replica: int, rid: str) -> None:
        """Tell one replica to drop a request that has moved elsewhere (its late output is ignored)."""
        self.send(replica, AbortRequest(rid, "moved"))

    def on_step(self, step: StepOutput) -> list[tuple[RequestState, bool]]:
        """Apply a step's outputs: (state, hit_stop_string) for each request that changed."""
        changed = []
        with self.lock:
            view = self.views.get(step.replica)
            if view is not None:
                view.on_report(step.load)
            for out in step.outputs:
                state = self.requests.get(out.rid)
                if state is None or state.replica != step.replica:
                    continue  # finished, or moved elsewhere after a failure: late tokens are not its own
                was_finished = state.finished
                hit_stop = state.apply(out)
                if hit_stop:
                    self.send(state.replica, AbortRequest(state.rid, "stop"))
                if state.finished and not was_finished:
                    self._retire(state)
                changed.append((state, hit_stop))
        return changed

    def finish_locally(self, state: RequestState, reason: str) -> None:
        """End a request in the front end (aborted or out of budget while it had no replica)."""
        with self.lock:
            state.finish_locally(reason)
            self._retire(state)

    def fail(self, state: RequestState, message: str) -> None:
        with self.lock:
            state.fail(message)
            self._retire(state)

    def _retire(self, state: RequestState) -> None:
        if self.requests.get(state.rid) is state:
            del self.requests[state.rid]
            entry = self.affinity.get(state.affinity) if state.affinity else None
            if entry is not None:
                entry[1].discard(state.rid)
                if not entry[1]:
                    del self.affinity[state.affinity]
        view = self.views.get(state.replica)
        if view is not None:
            view.on_finish()

    def inflight(self) -> int:
        with self.lock:
            return len(self.requests)


__all__ = ["DPController", "NoReplicaAvailable", "ReplicaUnreachable", "RequestRejected"]
