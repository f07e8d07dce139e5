"""The dispatcher: the one owner of a request's life in the front end.

It holds the in-flight table (request id -> ``RequestState``) and one waiting queue, and it is the only
writer of a request's routing state (``replica``, ``deaths``, ``ran_on``, ``alone``, ``dispatched_at``) and
of its end (finish in the front end, fail, abort). Step outputs are applied here too.

::

    submit ──► place ──► controller.dispatch (routing: views, policy, affinity, send) ──► on a replica
                 │                                                                          │
                 ├─ paused ──────────► waiting(PAUSED, no deadline) ──resume()──► place     │ step outputs
                 ├─ nothing can serve, one is coming ─► waiting(NO_REPLICA, deadline) ─►    │ (on_step)
                 │                    (replica_up / pump retry it; past the deadline: fail) ▼
                 └─ suspect (charged twice) ─► waiting(ISOLATION) ─► alone on a replica   finished / failed
                                                                                             │
    replica_down(replica): every request on it moves (place again, as a continuation:      retired from
    prompt + tokens so far); charged with the death only on evidence (see below)            the table

Poison accounting, on evidence: a request is charged with a replica's death only if that replica had put it
in a batch: it reported the request among the ones a step started (``StepStarted``, sent by the leader
before the forward) or it reported tokens for it. A request that had just moved there and never ran a step
is not charged. A request charged ``suspect_after`` times (default 2) is a suspect: it runs again alone, on
a replica reserved for it (no other request is routed there while it runs; one is drained for it if none is
empty), and fails as poison only if its replica dies again while it runs there alone. So rolling deaths of
several replicas never fail an innocent request, and one that really kills replicas fails after at most
``suspect_after + 1`` deaths, by itself.

Locks: one per object. The order is fleet lock -> dispatcher lock -> controller lock, never the reverse: the
fleet calls ``replica_up`` / ``replica_down`` (it may hold its lock), the dispatcher calls the controller
(a leaf: routing bookkeeping and non-blocking sends, no calls back). The dispatcher never calls the fleet; it
learns whether a replica is on its way up from ``coming``, a probe that reads the fleet's records without
taking its lock. Waking waiters (``RequestState.wake``) is left to the callers, outside every lock.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flotilla.ipc.messages import AbortRequest, StepOutput
from flotilla.frontend.request import RequestFailed, RequestState
from flotilla.router.controller import DPController, ReplicaUnreachable, RequestRejected, Send
from flotilla.router.policies import NoReplicaAvailable

log = logging.getLogger(__name__)


class WaitReason(enum.Enum):
    PAUSED = "paused"            # the engine is paused (weight update, memory release): until resume()
    NO_REPLICA = "no replica"    # none can take it now, one is starting or restarting: until the deadline
    ISOLATION = "isolation"      # a suspect waiting for a replica of its own: until the deadline


@dataclass
class Waiting:
    state: RequestState
    reason: WaitReason
    deadline: float | None       # clock time after which it fails; None: no limit (paused)


class Dispatcher:
    def __init__(self, controller: DPController, failover_timeout_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, coming: Callable[[], bool] = lambda: False,
                 suspect_after: int = 2):
        self.controller, self.failover_timeout_s, self.clock = controller, failover_timeout_s, clock
        self.coming = coming          # some replica is starting or restarting (set by the fleet)
        self.suspect_after = suspect_after
        self.lock = threading.RLock()
        self.requests: dict[str, RequestState] = {}
        self.waiting: list[Waiting] = []
        self.paused = False
        self.closed = False

    # ------------------------------------------------------------------------------------------ replicas
    def replica_up(self, replica: int, send: Send) -> list[RequestState]:
        """A replica can take requests: route to it and retry the waiting ones. Returns requests that ended."""
        with self.lock:
            self.controller.add_replica(replica, send)
            return self._pump()

    def replica_down(self, reasons: dict[int, str], charge: bool = True) -> list[RequestState]:
        """Replicas are gone (died: ``charge``; or were removed): stop routing to all of them first, then move
        each request they held (a continuation elsewhere, or a wait), charging a death on evidence. Returns
        requests that ended (failed as poison, out of budget, aborted, nothing to serve them)."""
        with self.lock:
            for t in reasons:
                self.controller.remove_replica(t)
            orphans = [s for s in self.requests.values() if s.replica in reasons and not s.finished]
            ended = []
            for state in orphans:
                t = state.replica
                reason = reasons[t]
                charged = charge and state.ran_on == t
                alone = state.alone
                self._leave(state)
                if charged:
                    state.deaths += 1
                if charged and alone and state.deaths > self.suspect_after:
                    self._fail(state, f"its replica died {state.deaths} times while it ran, the last time with it "
                                      f"running alone (last: {reason}); a request that kills replicas is not "
                                      "dispatched again")
                    ended.append(state)
                elif not self._place(state, f"replica died: {reason}" if charge else f"replica removed: {reason}"):
                    ended.append(state)
            return ended

    def pump(self) -> list[RequestState]:
        """Periodic: retry the waiting queue; requests past their deadline fail."""
        with self.lock:
            return self._pump()

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, state: RequestState) -> None:
        """Admit a new request and route it (or queue it). Raises ValueError for a duplicate id or a request
        that cannot be encoded (``RequestRejected``), RequestFailed when nothing can serve it."""
        with self.lock:
            if self.closed:
                raise RequestFailed("the engine is shut down")
            if state.rid in self.requests:
                raise ValueError(f"request_id: {state.rid!r} is already in flight; request ids must be unique")
            self.requests[state.rid] = state
            try:
                placed = self._place(state, "", raise_rejected=True)
            except BaseException:
                self._fail(state, "not submitted")
                raise
            if not placed:
                raise RequestFailed(f"request {state.rid} failed: {state.error}")

    def dispatch_to(self, state: RequestState, replica: int) -> None:
        """Send a request to one given replica (tests and tools that pin a request)."""
        with self.lock:
            self.requests[state.rid] = state
            self.controller.dispatch(state, replica=replica)
            self._placed(state, replica)

    def on_started(self, replica: int, rids: Iterable[str]) -> None:
        """The replica put these requests in a batch (sent before that step's forward): the evidence that a
        death of that replica may be theirs."""
        with self.lock:
            for rid in rids:
                state = self.requests.get(rid)
                if state is not None and state.replica == replica:
                    state.ran_on = replica

    def on_step(self, step: StepOutput) -> list[RequestState]:
        """Apply a step's outputs; returns the requests that changed (or ended)."""
        changed = []
        retired = False
        with self.lock:
            self.controller.on_report(step.replica, step.load)
            for out in step.outputs:
                state = self.requests.get(out.rid)
                if state is None or state.replica != step.replica:
                    continue  # finished, or moved elsewhere after a failure: late tokens are not its own
                state.ran_on = step.replica
                hit_stop = state.apply(out)
                if hit_stop:
                    self.controller.send(state.replica, AbortRequest(state.rid, "stop"))
                if state.finished:
                    self._retire(state)
                    retired = True
                changed.append(state)
            if retired and any(w.reason is WaitReason.ISOLATION for w in self.waiting):
                changed.extend(self._pump())  # a reserved replica may be empty now
        return changed

    def abort(self, rid: str, reason: str = "abort") -> RequestState | None:
        """Ask for a request to end. It is marked, so that a failover of its replica ends it instead of
        resuming it; waiting or undispatched requests end here at once."""
        with self.lock:
            state = self.requests.get(rid)
            if state is None:
                return None
            state.abort_requested = True
            if self._unwait(state) or state.replica < 0:  # never sent anywhere (or taken back): it ends here
                self._finish_locally(state, reason)
                return state
            self.controller.send(state.replica, AbortRequest(rid, reason))
            return state

    def abort_all(self) -> list[RequestState]:
        with self.lock:
            return [s for s in (self.abort(rid) for rid in list(self.requests)) if s is not None]

    def fail(self, state: RequestState, message: str) -> None:
        with self.lock:
            self._fail(state, message)

    def fail_all(self, message: str) -> list[RequestState]:
        """End every request (shutdown); returns them, for their waiters to be woken."""
        with self.lock:
            states = list(self.requests.values()) + [w.state for w in self.waiting
                                                      if w.state.rid not in self.requests]
            self.waiting.clear()
            for s in states:
                self._fail(s, message)
            return states

    # ------------------------------------------------------------------------------------------ pause, drain
    def pause(self) -> None:
        with self.lock:
            self.paused = True

    def resume(self) -> list[RequestState]:
        """Stop holding: the held requests go out, oldest first. Returns those that ended instead."""
        with self.lock:
            self.paused = False
            held = [w for w in self.waiting if w.reason is WaitReason.PAUSED]
            self.waiting = [w for w in self.waiting if w.reason is not WaitReason.PAUSED]
            return [w.state for w in held if not self._place(w.state, "")]

    def held(self) -> list[RequestState]:
        with self.lock:
            return [w.state for w in self.waiting if w.reason is WaitReason.PAUSED]

    def retract(self, replicas: Iterable[int]) -> tuple[int, list[RequestState]]:
        """Take every request on ``replicas`` back (while paused they are held until resume): the replicas
        are told to drop them. Returns (how many moved, the ones that ended instead)."""
        return self.hand_off(replicas)

    def hand_off(self, replicas: Iterable[int]) -> tuple[int, list[RequestState]]:
        """Move what ``replicas`` hold elsewhere (a drain's end, a retract) as continuations."""
        replicas = set(replicas)
        moved, ended = 0, []
        with self.lock:
            for state in [s for s in self.requests.values() if s.replica in replicas and not s.finished]:
                old = state.replica
                if self._place(state, ""):
                    self.controller.abort_on(old, state.rid)
                    moved += 1
                else:
                    ended.append(state)
        return moved, ended

    def fail_waiting(self, message: str) -> list[RequestState]:
        """Fail what waits for a replica (none is coming any more); returns them."""
        with self.lock:
            gone = [w.state for w in self.waiting if w.reason is not WaitReason.PAUSED]
            for s in gone:
                self._fail(s, message)
            return gone

    def close(self) -> list[RequestState]:
        """No more waiting: returns what waited (the caller fails them)."""
        with self.lock:
            self.closed = True
            return [w.state for w in self.waiting]

    # ------------------------------------------------------------------------------------------ queries
    def requests_on(self, replica: int) -> list[RequestState]:
        with self.lock:
            return [s for s in self.requests.values() if s.replica == replica and not s.finished]

    def inflight(self) -> int:
        with self.lock:
            return len(self.requests)

    def using_adapter(self, name: str) -> int:
        """Requests in flight (queued, held or on a replica) that run LoRA adapter ``name``."""
        with self.lock:
            return sum(1 for s in self.requests.values() if s.sampling.lora_name == name and not s.finished)

    def pending(self) -> list[tuple[RequestState, float | None]]:
        """(request, deadline) of the requests waiting for a replica (not those held while paused)."""
        with self.lock:
            return [(w.state, w.deadline) for w in self.waiting if w.reason is not WaitReason.PAUSED]

    # ------------------------------------------------------------------------------------------ internals
    def _place(self, state: RequestState, why: str, raise_rejected: bool = False,
               deadline: float | None = None) -> bool:
        """Send a request (or resume it as a continuation: prompt + tokens so far) to a live replica, or queue
        it. False when it ended instead (budget spent, aborted, or nothing can serve it)."""
        if state.finished:
            return False
        self._leave(state)
        if state.abort_requested:
            self._finish_locally(state, "abort")
            return False
        if len(state.output_ids) >= state.sampling.max_new_tokens:
            self._finish_locally(state, "length")
            return False
        if self.paused:
            self.waiting.append(Waiting(state, WaitReason.PAUSED, None))
            return True
        if deadline is None:
            deadline = self.clock() + self.failover_timeout_s
        if state.deaths >= self.suspect_after:
            return self._place_alone(state, why, deadline)
        exclude: set[int] = set()
        while True:
            try:
                replica = self.controller.dispatch(state, exclude=frozenset(exclude))
                self._placed(state, replica)
                return True
            except RequestRejected as e:  # its own fault: it fails alone, at once (submit: the caller's error)
                if raise_rejected:
                    raise
                self._fail(state, str(e))
                return False
            except ReplicaUnreachable as e:
                exclude.add(e.replica)
            except NoReplicaAvailable as e:
                if (exclude or self.coming() or self.controller.reserved()) and not self.closed:
                    self.waiting.append(Waiting(state, WaitReason.NO_REPLICA, deadline))
                    return True
                self._fail(state, why or f"no replica can take the request: {e}")
                return False

    def _place_alone(self, state: RequestState, why: str, deadline: float) -> bool:
        """A suspect runs alone: on the replica reserved for it once that one holds nothing else."""
        replica = self.controller.reserve(state.rid)
        if replica is None:
            if (self.coming() or self.controller.views) and not self.closed:
                self.waiting.append(Waiting(state, WaitReason.ISOLATION, deadline))
                return True
            self._fail(state, why or "no replica can take the request")
            return False
        if any(s.replica == replica for s in self.requests.values() if s is not state):
            self.waiting.append(Waiting(state, WaitReason.ISOLATION, deadline))  # draining for it
            return True
        try:
            self.controller.dispatch(state, replica=replica)
        except RequestRejected as e:
            self.controller.release(state.rid)
            self._fail(state, str(e))
            return False
        except NoReplicaAvailable:  # unreachable now: wait for it (or another)
            self.waiting.append(Waiting(state, WaitReason.ISOLATION, deadline))
            return True
        log.warning("request %s runs alone on replica %d: its replicas died %d times while it ran",
                    state.rid, replica, state.deaths)
        self._placed(state, replica)
        state.alone = True
        return True

    def _placed(self, state: RequestState, replica: int) -> None:
        state.replica, state.dispatched_at, state.ran_on, state.alone = replica, self.clock(), None, False

    def _leave(self, state: RequestState) -> None:
        """The request is off its replica (moved, held, retracted, or that replica is gone)."""
        if state.replica >= 0:
            self.controller.left(state.replica, state.rid, state.affinity)
        if state.alone:  # its reserved replica (a suspect waiting to run alone keeps its reservation)
            self.controller.release(state.rid)
        state.replica, state.ran_on, state.alone = -1, None, False

    def _unwait(self, state: RequestState) -> bool:
        before = len(self.waiting)
        self.waiting = [w for w in self.waiting if w.state is not state]
        return len(self.waiting) < before

    def _pump(self) -> list[RequestState]:
        if not self.waiting:
            return []
        now = self.clock()
        waiting, self.waiting = self.waiting, []
        ended = []
        for w in waiting:
            state = w.state
            if state.finished:
                continue
            if w.reason is WaitReason.PAUSED and self.paused:
                self.waiting.append(w)
                continue
            if w.deadline is not None and now > w.deadline:
                what = "a replica to run it alone" if w.reason is WaitReason.ISOLATION else "a replica"
                self._fail(state, f"no replica came back within failover_timeout_s ({self.failover_timeout_s}s) "
                                  f"(it waited for {what})")
                ended.append(state)
                continue
            if not self._place(state, "", deadline=w.deadline):
                ended.append(state)
        return ended

    def _finish_locally(self, state: RequestState, reason: str) -> None:
        self._unwait(state)
        state.finish_locally(reason)
        self._retire(state)

    def _fail(self, state: RequestState, message: str) -> None:
        self._unwait(state)
        state.fail(message)
        self._retire(state)

    def _retire(self, state: RequestState) -> None:
        """Out of the table, once (its ``replica`` stays, for whoever looks at it afterwards)."""
        if self.requests.get(state.rid) is state:
            del self.requests[state.rid]
            if state.replica >= 0:
                self.controller.left(state.replica, state.rid, state.affinity)
            self.controller.release(state.rid)


__all__ = ["Dispatcher", "WaitReason", "Waiting"]
