"""The replica fleet: the lifecycle of every replica group, as one record per group with an explicit state.

::

    STARTING --ready--> READY --scale down--> DRAINING --drained--> (removed)
       |                  |                      |
       +------death-------+------death-----------+--> (requests moved, group removed)
       v                  v
     DOWN --restart within max_replica_restarts--> RESTARTING --ready--> READY
       ^                                              |
       +--------------------death---------------------+

A group is one torch.distributed world (restarted as a unit); it leads one replica, or several with DP
attention. A record keeps its place (and its restart budget) across incarnations; each incarnation gets
fresh group and replica ids, so a late message from a dead one can never be taken for its successor's.

Death is a rank the launcher reports gone, or a replica silent for ``heartbeat_timeout_s`` (the leader's
heartbeat comes from a thread of its own, so a long step is not silence). The requests of a dead group
resume elsewhere as continuations; a request whose replica died under it twice fails (poison containment).
While no replica can take a request but one is starting, it waits in the pending queue.

No I/O of its own: the launcher, the per-replica links and the controller are passed in, and ``spawn``
(how a restart runs in the background) and ``clock`` too, so tests drive it with fakes and no processes.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from flotilla.ipc.messages import Shutdown, WorkerReady
from flotilla.launch.base import Launcher
from flotilla.launch.topology import GroupSpec, replica_group
from flotilla.launch.worker_args import WorkerArgs
from flotilla.request import RequestFailed, RequestState
from flotilla.router.controller import DPController, ReplicaUnreachable, RequestRejected
from flotilla.router.policies import NoReplicaAvailable
from flotilla.stats import DownStats, PipelineStats, ReplicaStats

log = logging.getLogger(__name__)


class GroupState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DOWN = "down"
    RESTARTING = "restarting"


class ReplicaLinks(Protocol):
    """The front end's sockets to each replica's leader."""

    def open(self, replica: int) -> tuple[Callable[[object], None], str]:
        """Bind a link for ``replica``: (a send that never blocks and raises when not taken, its address)."""
        ...

    def close(self, replica: int) -> None: ...

    def writable(self, replica: int) -> bool:
        """The replica's leader is connected (a message would be taken now)."""
        ...


@dataclass(frozen=True)
class FleetSettings:
    tp_size: int
    pp_size: int
    max_replica_restarts: int
    heartbeat_timeout_s: float
    failover_timeout_s: float
    worker_start_timeout: float
    scalable: bool = True          # False with DP attention: its replicas live in one TP group


@dataclass
class GroupRecord:
    spec: GroupSpec                          # the current incarnation
    state: GroupState
    restarts: int = 0                        # restarts spent by this record
    started_at: float = 0.0
    ready: set[int] = field(default_factory=set)
    connecting: set[int] = field(default_factory=set)  # reported ready, link to it not connected yet
    last_seen: dict[int, float] = field(default_factory=dict)
    reason: str | None = None                # why it last went down
    failure: str | None = None               # what a rank reported before it died (WorkerFailed)
    down_replicas: list[int] = field(default_factory=list)  # ids of the dead incarnation, until replaced


def _thread(fn: Callable[[], None], name: str) -> None:
    threading.Thread(target=fn, name=name, daemon=True).start()


class ReplicaFleet:
    def __init__(self, launcher: Launcher, controller: DPController, links: ReplicaLinks,
                 make_args: Callable[[GroupSpec, dict[int, str]], list[WorkerArgs]], settings: FleetSettings,
                 spawn: Callable[[Callable[[], None], str], None] = _thread,
                 clock: Callable[[], float] = time.monotonic):
        self.launcher, self.controller, self.links = launcher, controller, links
        self.make_args, self.settings, self.spawn, self.clock = make_args, settings, spawn, clock
        self.lock = threading.RLock()
        self.records: list[GroupRecord] = []
        self.pending: list[tuple[RequestState, float]] = []   # (request, deadline) while no replica can take it
        self.closed = False
        self._gids = itertools.count()
        self._rids = itertools.count()
        self._sends: dict[int, Callable[[object], None]] = {}

    # ------------------------------------------------------------------------------------------ lookups
    def _record_of_group(self, gid: int) -> GroupRecord | None:
        return next((r for r in self.records if r.spec.group_id == gid), None)

    def _record_of_replica(self, replica: int) -> GroupRecord | None:
        return next((r for r in self.records if replica in r.spec.replicas), None)

    def ready_replicas(self) -> set[int]:
        with self.lock:
            return {t for r in self.records if r.state in (GroupState.READY, GroupState.DRAINING) for t in r.ready}

    def starting(self) -> bool:
        """Some group is on its way up (requests may wait for it)."""
        return any(r.state in (GroupState.STARTING, GroupState.RESTARTING) for r in self.records)

    def group_of(self, replica: int) -> int | None:
        with self.lock:
            rec = self._record_of_replica(replica)
            return None if rec is None else rec.spec.group_id

    def dp_size(self) -> int:
        with self.lock:
            return sum(len(r.spec.replicas) for r in self.records if r.state is not GroupState.DRAINING)

    def healthy(self) -> bool:
        with self.lock:
            return not self.closed and all(r.state in (GroupState.READY, GroupState.DRAINING) for r in self.records)

    def restarts(self) -> int:
        with self.lock:
            return sum(r.restarts for r in self.records)

    # ------------------------------------------------------------------------------------------ starting
    def start(self, specs: list[GroupSpec]) -> list[GroupRecord]:
        """Start new groups (at start-up and when growing); fresh ids for each."""
        records = []
        for spec in specs:
            rec = GroupRecord(self._renumber(spec), GroupState.STARTING)
            with self.lock:
                self.records.append(rec)
            records.append(rec)
            error = self._launch(rec)
            if error is not None:
                raise error
        return records

    def _renumber(self, spec: GroupSpec, first_global_rank: int | None = None) -> GroupSpec:
        return spec.renumbered(next(self._gids), [next(self._rids) for _ in spec.replicas], first_global_rank)

    def _launch(self, rec: GroupRecord) -> Exception | None:
        spec = rec.spec
        addrs = {}
        with self.lock:
            rec.started_at = self.clock()
            for t in spec.replicas:
                self._sends[t], addrs[t] = self.links.open(t)
        try:
            self.launcher.start_group(spec, self.make_args(spec, addrs))
        except Exception as e:  # the launcher could not start it: down, and not retried
            log.error("starting replica group %d failed: %s", spec.group_id, e)
            with self.lock:
                self._close_links(spec)
                rec.state, rec.reason = GroupState.DOWN, f"start failed: {e}"
                rec.down_replicas = list(spec.replicas)
                stuck = [] if self.starting() else self._take_pending()
            self._fail_all(stuck, f"no replica can take the request: {rec.reason}")
            return e
        return None

    def _close_links(self, spec: GroupSpec) -> None:
        for t in spec.replicas:
            self._sends.pop(t, None)
            self.links.close(t)

    # ------------------------------------------------------------------------------------------ events
    def on_ready(self, msg: WorkerReady) -> list[RequestState]:
        """A replica's leader is up: route to it, and hand it waiting requests. Returns requests that ended
        (the caller wakes their waiters)."""
        with self.lock:
            rec = self._record_of_replica(msg.replica)
            if rec is None or rec.state not in (GroupState.STARTING, GroupState.RESTARTING) or \
                    msg.replica in rec.ready or msg.replica in rec.connecting:
                return []  # a late message from an incarnation that is gone
            rec.connecting.add(msg.replica)
            rec.last_seen[msg.replica] = self.clock()
            return self.connect_links()

    def connect_links(self) -> list[RequestState]:
        """Route to replicas that reported ready once their link is connected (the leader connects to the
        front end's socket; a message sent before its handshake completes would have nowhere to go), and
        hand them waiting requests."""
        with self.lock:
            joined = False
            for rec in self.records:
                for t in [t for t in rec.connecting if self.links.writable(t)]:
                    rec.connecting.discard(t)
                    rec.ready.add(t)
                    self.controller.add_replica(t, self._sends[t])
                    joined = True
                if rec.connecting == set() and rec.ready >= set(rec.spec.replicas) and \
                        rec.state in (GroupState.STARTING, GroupState.RESTARTING):
                    rec.state, rec.down_replicas = GroupState.READY, []
            return self._flush_pending() if joined else []

    def on_seen(self, replica: int) -> None:
        """Any message from a replica is a sign of life."""
        with self.lock:
            rec = self._record_of_replica(replica)
            if rec is not None and (replica in rec.ready or replica in rec.connecting):
                rec.last_seen[replica] = self.clock()

    def on_failed(self, replica: int, message: str) -> None:
        """A rank reported why it is about to die: that becomes the group's reason when its death is seen."""
        with self.lock:
            rec = self._record_of_replica(replica)
            if rec is not None:
                rec.failure = message.splitlines()[0] if message else message

    def check(self) -> list[RequestState]:
        """Periodic: deaths (launcher, silence, start time-out), then the pending queue. Returns requests that
        ended (failed, or finished by their budget)."""
        now = self.clock()
        with self.lock:
            if self.closed:
                return []
            dead: dict[int, str] = {}
            gone = self.launcher.dead_groups()
            for rec in self.records:
                gid = rec.spec.group_id
                if rec.state is GroupState.DOWN:
                    continue
                if gid in gone:
                    dead[gid] = rec.failure or gone[gid]
                elif rec.state in (GroupState.STARTING, GroupState.RESTARTING):
                    if now - rec.started_at > self.settings.worker_start_timeout:
                        dead[gid] = f"not ready within worker_start_timeout ({self.settings.worker_start_timeout}s)"
                else:
                    for t, seen in rec.last_seen.items():
                        if now - seen > self.settings.heartbeat_timeout_s:
                            dead[gid] = f"no sign of life from replica {t} for {now - seen:.0f}s"
                            break
            ended = self._on_deaths(dead) if dead else []
            ended.extend(self.connect_links())
            ended.extend(self._flush_pending(now))
        return ended

    def _on_deaths(self, dead: dict[int, str]) -> list[RequestState]:
        """Every dead group first stops being routed to, then their requests move: with two deaths at once, a
        request from the first must not be sent to the second."""
        orphans: list[tuple[RequestState, str, bool]] = []
        for gid, reason in dead.items():
            rec = self._record_of_group(gid)
            log.warning("replica group %d (%s) is down: %s", gid, rec.state.value, reason)
            self.launcher.kill_group(gid)
            for t in rec.spec.replicas:
                # a death counts against a request only if the replica showed life after taking it: one that
                # was already dead when the request was sent there did not die of it
                orphans.extend((s, reason, rec.last_seen.get(t, -1.0) > s.dispatched_at)
                               for s in self.controller.remove_replica(t))
            self._close_links(rec.spec)
            rec.reason, rec.failure = reason, None
            if rec.state is GroupState.DRAINING:
                self.records.remove(rec)  # it was leaving anyway: no restart
                continue
            rec.down_replicas = list(rec.spec.replicas)
            rec.ready, rec.connecting, rec.last_seen = set(), set(), {}
            rec.state = GroupState.DOWN
            if rec.restarts < self.settings.max_replica_restarts and not self.closed:
                rec.restarts += 1
                rec.spec = self._renumber(rec.spec)
                rec.state = GroupState.RESTARTING
                rec.started_at = self.clock()
                self.spawn(lambda rec=rec: self._relaunch(rec), f"flotilla-restart-{gid}")
        ended = []
        for state, reason, counts in orphans:
            state.deaths += counts
            if state.deaths >= 2:
                self.controller.fail(state, f"its replica died twice while it ran (last: {reason}); a request "
                                            "that may be what kills replicas is not dispatched again")
                ended.append(state)
            elif not self.redispatch(state, f"replica died: {reason}"):
                ended.append(state)
        return ended

    def _relaunch(self, rec: GroupRecord) -> None:
        with self.lock:
            if self.closed or rec not in self.records or rec.state is not GroupState.RESTARTING:
                return
        self._launch(rec)  # a failure leaves it down, with the reason in stats

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, state: RequestState) -> None:
        """Route a new request; it waits (bounded) while no replica can take it but one is starting."""
        with self.lock:
            if self.closed:
                raise RequestFailed("the engine is shut down")
            if not self.redispatch(state, raise_rejected=True):
                raise RequestFailed(f"request {state.rid} failed: {state.error}")

    def redispatch(self, state: RequestState, why: str = "", raise_rejected: bool = False) -> bool:
        """Send a request (or resume it as a continuation: prompt + tokens so far) to a live replica, or queue
        it. False when it ended instead (budget spent, aborted, or nothing can serve it)."""
        with self.lock:
            if state.finished:
                return False
            if state.abort_requested:
                self.controller.finish_locally(state, "abort")
                return False
            if len(state.output_ids) >= state.sampling.max_new_tokens:
                self.controller.finish_locally(state, "length")
                return False
            exclude: set[int] = set()
            while True:
                try:
                    self.controller.dispatch(state, exclude=frozenset(exclude))
                    state.dispatched_at = self.clock()
                    return True
                except RequestRejected as e:  # its own fault: it fails alone, at once (submit: the caller's error)
                    if raise_rejected:
                        raise
                    self.controller.fail(state, str(e))
                    return False
                except ReplicaUnreachable as e:
                    exclude.add(e.replica)
                except NoReplicaAvailable as e:
                    if (exclude or self.starting()) and not self.closed:
                        self.pending.append((state, self.clock() + self.settings.failover_timeout_s))
                        return True
                    self.controller.fail(state, why or f"no replica can take the request: {e}")
                    return False

    def _take_pending(self) -> list[RequestState]:
        pending, self.pending = self.pending, []
        return [s for s, _ in pending]

    def _flush_pending(self, now: float | None = None) -> list[RequestState]:
        """Retry the queue; requests past their deadline fail."""
        if not self.pending:
            return []
        now = self.clock() if now is None else now
        pending, self.pending = self.pending, []
        ended = []
        for state, deadline in pending:
            if state.finished:
                continue
            if now > deadline:
                self.controller.fail(state, f"no replica came back within failover_timeout_s "
                                            f"({self.settings.failover_timeout_s}s)")
                ended.append(state)
                continue
            before = len(self.pending)
            if not self.redispatch(state):
                ended.append(state)
            elif len(self.pending) > before:  # queued again: keep its first deadline
                self.pending[-1] = (state, deadline)
        return ended

    def _fail_all(self, states: list[RequestState], why: str) -> None:
        for s in states:
            self.controller.fail(s, why)
            s.wake()

    # ------------------------------------------------------------------------------------------ scaling
    def scale(self, dp_size: int, drain_timeout_s: float = 60.0) -> None:
        """Grow or shrink to ``dp_size`` replica groups. Down groups go first when shrinking (then restarting
        ones, then the newest ready ones, drained)."""
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size: must be an int >= 1, got {dp_size!r}")
        if not self.settings.scalable:
            raise ValueError("dp_size: with enable_dp_attention the attention-DP groups live in one TP group; "
                             "scaling them means restarting the engine with a new layout")
        with self.lock:
            live = [r for r in self.records if r.state is not GroupState.DRAINING]
        if dp_size > len(live):
            self._grow(dp_size - len(live))
            return
        order = {GroupState.DOWN: 0, GroupState.RESTARTING: 1, GroupState.STARTING: 2, GroupState.READY: 3}
        leaving = sorted(live, key=lambda r: (order[r.state], -r.spec.group_id))[:len(live) - dp_size]
        for rec in leaving:
            self._remove(rec, drain_timeout_s)

    def _grow(self, count: int) -> None:
        tp, pp = self.settings.tp_size, self.settings.pp_size
        with self.lock:
            used = {r.spec.first_global_rank for r in self.records}
        slots = list(itertools.islice((s for s in itertools.count(0, tp * pp) if s not in used), count))
        self.launcher.ensure_capacity(max(slots) + tp * pp)
        records = self.start([replica_group(0, 0, tp, slot, pp) for slot in slots])
        deadline = self.clock() + self.settings.worker_start_timeout
        while True:
            with self.lock:
                states = [r.state for r in records]
            if all(s is GroupState.READY for s in states):
                return
            if any(s is GroupState.DOWN for s in states) or any(r not in self.records for r in records):
                reasons = "; ".join(r.reason or "" for r in records if r.reason)
                raise RuntimeError(f"a new replica died while starting: {reasons}")
            if self.clock() > deadline:
                raise TimeoutError(f"worker_start_timeout: new replicas not ready after "
                                   f"{self.settings.worker_start_timeout}s")
            time.sleep(0.05)

    def _remove(self, rec: GroupRecord, drain_timeout_s: float) -> None:
        with self.lock:
            if rec.state in (GroupState.DOWN, GroupState.RESTARTING, GroupState.STARTING):
                self.records.remove(rec)  # nothing routed to it: stop it and forget it
                self.launcher.kill_group(rec.spec.group_id)
                for t in rec.spec.replicas:
                    for s in self.controller.remove_replica(t):
                        if not self.redispatch(s):
                            s.wake()
                self._close_links(rec.spec)
                return
            rec.state = GroupState.DRAINING
            replicas = list(rec.spec.replicas)
            for t in replicas:
                self.controller.set_accepting(t, False)
        deadline = self.clock() + drain_timeout_s
        while any(self.controller.requests_on(t) for t in replicas) and self.clock() < deadline and rec in self.records:
            time.sleep(0.05)
        with self.lock:
            if rec not in self.records:  # it died while draining: its requests were moved then
                return
            for t in replicas:
                for state in self.controller.requests_on(t):
                    if self.redispatch(state):
                        self.controller.abort_on(t, state.rid)
                    else:
                        state.wake()
                self.controller.send(t, Shutdown(), timeout_ms=1000)
        self.launcher.stop_group(rec.spec.group_id, timeout=30)
        with self.lock:
            for t in replicas:
                for state in self.controller.remove_replica(t):
                    if not self.redispatch(state):
                        state.wake()
            self._close_links(rec.spec)
            if rec in self.records:
                self.records.remove(rec)

    # ------------------------------------------------------------------------------------------ status
    def rows(self) -> list[ReplicaStats]:
        """One entry per replica for stats(): the routed ones from the controller's views, plus the replicas
        of groups that are down (until their replacement is ready)."""
        out = []
        with self.lock, self.controller.lock:
            for rec in self.records:
                for t in rec.spec.replicas:
                    view = self.controller.views.get(t)
                    if view is None:
                        continue
                    rep = view.last_report
                    out.append(ReplicaStats(
                        id=t, group=rec.spec.group_id, state=rec.state.value,
                        pids=self.launcher.pids(rec.spec.group_id), alive=view.alive, accepting=view.accepting,
                        running=view.running, waiting=view.waiting, kv_used=view.kv_used,
                        cached_tokens=view.cached_tokens, outstanding_tokens=view.outstanding_tokens,
                        num_steps=rep.num_steps, num_preemptions=rep.num_preemptions,
                        num_overlapped_steps=rep.num_overlapped_steps, weight_version=rep.weight_version,
                        pipeline=PipelineStats(stage_forwards=list(rep.stage_forwards),
                                               max_in_flight=rep.max_in_flight),
                        restarts=rec.restarts))
                for t in rec.down_replicas:
                    out.append(ReplicaStats(id=t, state=rec.state.value, restarts=rec.restarts,
                                            down=DownStats(down_reason=rec.reason,
                                                           restarting=rec.state is GroupState.RESTARTING)))
        return sorted(out, key=lambda r: r.id)

    # ------------------------------------------------------------------------------------------ teardown
    def close(self) -> list[RequestState]:
        """Stop restarting; returns the requests still waiting in the queue."""
        with self.lock:
            self.closed = True
            return self._take_pending()

    def send_all(self, msg: object) -> None:
        for t in self.ready_replicas():
            self.controller.send(t, msg)
