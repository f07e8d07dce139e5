r"""The replica fleet: the lifecycle of every replica group, as one record per group with an explicit state.

::

    STARTING --ready--> READY --scale down--> DRAINING --drained--> (removed)
       |                  |                      |
       +------death-------+------death-----------+--> (requests moved, group removed)
       v                  v
     DOWN --restart (budget per window, backoff)--> RESTARTING --ready--> READY
       ^  \--budget refills / scale to the same size--^  |
       +--------------------death---------------------+

A group is one torch.distributed world (restarted as a unit); it leads one replica, or several with DP
attention. A record keeps its place (and its restart history) across incarnations; each incarnation gets
fresh group and replica ids, so a late message from a dead one can never be taken for its successor's.

Death is a rank the launcher reports gone, a replica silent for ``heartbeat_timeout_s`` (the leader's
heartbeat comes from a thread of its own, so a long step is not silence), or a leader whose heartbeats say
its step loop has been inside one step for more than ``step_timeout_s`` (a hung collective, a wedged kernel).

Restarts: at most ``max_replica_restarts`` per group within any ``restart_window_s``; the first restart after
a quiet spell is at once, each further one in the window waits ``restart_backoff_s`` doubled each time (at
most ``restart_backoff_max_s``). A group whose budget is spent stays down until the window lets it restart
again (the budget refills), or until ``scale`` to the current size restarts it.

The fleet decides nothing per request: it tells the dispatcher ``replica_up`` and ``replica_down`` and the
dispatcher moves, queues, charges or fails requests (``router/dispatch.py``, which also documents the lock
order: fleet lock before dispatcher lock).

No I/O of its own: the launcher, the per-replica links and the dispatcher are passed in, and ``spawn`` (how
a restart runs in the background) and ``clock`` too, so tests drive it with fakes and no processes.
"""

from __future__ import annotations

import enum
import functools
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
from flotilla.frontend.request import RequestState, wake_all
from flotilla.router.dispatch import Dispatcher
from flotilla.frontend.stats import DownStats, PipelineStats, ReplicaStats

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
    restart_window_s: float = 600.0       # max_replica_restarts per group within any window this long
    restart_backoff_s: float = 1.0        # wait before the 2nd restart in a window; doubled for each further one
    restart_backoff_max_s: float = 60.0   # the longest wait between two restarts
    step_timeout_s: float = 600.0         # a leader inside one step this long (heartbeats say so) is dead


@dataclass
class GroupRecord:
    spec: GroupSpec                          # the current incarnation
    state: GroupState
    restarts: int = 0                        # restarts of this record over the engine's life (stats)
    restart_times: list[float] = field(default_factory=list)  # when each restart in the window began
    retry_at: float | None = None            # RESTARTING: launch then (backoff); DOWN: restart then (refill)
    step_age: dict[int, float] = field(default_factory=dict)  # replica -> step_age_s of its last heartbeat
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
    def __init__(self, launcher: Launcher, dispatcher: Dispatcher, links: ReplicaLinks,
                 make_args: Callable[[GroupSpec, dict[int, str]], list[WorkerArgs]], settings: FleetSettings,
                 spawn: Callable[[Callable[[], None], str], None] = _thread,
                 clock: Callable[[], float] = time.monotonic):
        self.launcher, self.dispatcher, self.links = launcher, dispatcher, links
        self.controller = dispatcher.controller  # routing: views (stats rows), accepting while draining, send
        self.make_args, self.settings, self.spawn, self.clock = make_args, settings, spawn, clock
        self.lock = threading.RLock()
        self.records: list[GroupRecord] = []
        self.closed = False
        dispatcher.coming = self.starting  # read without the fleet's lock (see dispatch.py's lock order)
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

    def rank_layout(self) -> list[tuple[int, int, int]]:
        """(replica, group id, rank in group) of every rank of every group, sorted; a RuntimeError naming a
        group that is not ready (weight-sync groups are made over all ranks, so none may be missing)."""
        rows: list[tuple[int, int, int]] = []
        with self.lock:
            for rec in self.records:
                if rec.state is not GroupState.READY:
                    raise RuntimeError(f"weight sync: replica group {rec.spec.group_id} is {rec.state.value}; "
                                       "retry once every replica in stats() is ready")
                spec = rec.spec
                rows.extend((spec.replica_of_rank(r), spec.group_id, r) for r in range(spec.world_size))
        return sorted(rows)

    def starting(self) -> bool:
        """Some group is on its way up (requests may wait for it). Reads without the lock (the dispatcher
        calls it under its own lock): a list copy and enum reads are whole values under the GIL."""
        return any(r.state in (GroupState.STARTING, GroupState.RESTARTING) for r in list(self.records))

    def serving(self) -> bool:
        """Some replica takes requests (/health: degraded, not down)."""
        return bool(self.ready_replicas())

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
                if rec.restarts:  # a restart that failed is tried again later, within the budget
                    rec.retry_at = self.clock() + self._backoff(rec, self.clock())
                stuck = [] if self.starting() else self.dispatcher.fail_waiting(
                    f"no replica can take the request: {rec.reason}")
            wake_all(stuck)
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
                    rec.retry_at is not None or msg.replica not in self._sends or \
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
            ended: list[RequestState] = []
            for rec in self.records:
                joined = [t for t in rec.connecting if self.links.writable(t)]
                for t in joined:
                    rec.connecting.discard(t)
                    rec.ready.add(t)
                if rec.connecting == set() and rec.ready >= set(rec.spec.replicas) and \
                        rec.state in (GroupState.STARTING, GroupState.RESTARTING):
                    rec.state, rec.down_replicas = GroupState.READY, []
                for t in joined:
                    ended.extend(self.dispatcher.replica_up(t, self._sends[t]))
            return ended

    def on_seen(self, replica: int) -> None:
        """Any message from a replica is a sign of life."""
        with self.lock:
            rec = self._record_of_replica(replica)
            if rec is not None and (replica in rec.ready or replica in rec.connecting):
                rec.last_seen[replica] = self.clock()

    def on_heartbeat(self, replica: int, step_age_s: float) -> None:
        """A leader's heartbeat: alive, and how long its step loop has been inside one step."""
        with self.lock:
            rec = self._record_of_replica(replica)
            if rec is not None and (replica in rec.ready or replica in rec.connecting):
                rec.last_seen[replica] = self.clock()
                rec.step_age[replica] = float(step_age_s)

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
            for rec in list(self.records):
                gid = rec.spec.group_id
                if rec.retry_at is not None and now >= rec.retry_at and \
                        rec.state in (GroupState.DOWN, GroupState.RESTARTING):
                    self._restart(rec, now)  # a backoff ended, or the window let the budget refill
                    continue
                if rec.state is GroupState.DOWN or rec.retry_at is not None:
                    continue
                if gid in gone:
                    dead[gid] = rec.failure or gone[gid]
                elif rec.state in (GroupState.STARTING, GroupState.RESTARTING):
                    if now - rec.started_at > self.settings.worker_start_timeout:
                        dead[gid] = f"not ready within worker_start_timeout ({self.settings.worker_start_timeout}s)"
                else:
                    dead.update({gid: why} if (why := self._silent_or_stuck(rec, now)) else {})
            ended = self._on_deaths(dead) if dead else []
            ended.extend(self.connect_links())
            ended.extend(self.dispatcher.pump())
        return ended

    def _silent_or_stuck(self, rec: GroupRecord, now: float) -> str | None:
        for t, seen in rec.last_seen.items():
            if now - seen > self.settings.heartbeat_timeout_s:
                return f"no sign of life from replica {t} for {now - seen:.0f}s"
        for t, age in rec.step_age.items():
            if age > self.settings.step_timeout_s:
                return (f"replica {t} made no progress: its step loop has been inside one step for {age:.0f}s "
                        f"(step_timeout_s={self.settings.step_timeout_s}s)")
        return None

    def _on_deaths(self, dead: dict[int, str]) -> list[RequestState]:
        """Every dead group first stops being routed to and gets its restart decided, then the dispatcher
        moves the requests of all of them at once: with two deaths at once, a request from the first must not
        be sent to the second."""
        reasons: dict[int, str] = {}
        now = self.clock()
        for gid, reason in dead.items():
            rec = self._record_of_group(gid)
            log.warning("replica group %d (%s) is down: %s", gid, rec.state.value, reason)
            self.launcher.kill_group(gid)
            reasons.update({t: reason for t in rec.spec.replicas})
            self._close_links(rec.spec)
            rec.reason, rec.failure = reason, None
            if rec.state is GroupState.DRAINING:
                self.records.remove(rec)  # it was leaving anyway: no restart
                continue
            rec.down_replicas = list(rec.spec.replicas)
            rec.ready, rec.connecting, rec.last_seen, rec.step_age = set(), set(), {}, {}
            rec.state = GroupState.DOWN
            if not self.closed:
                self._restart(rec, now)
        return self.dispatcher.replica_down(reasons)

    def _in_window(self, rec: GroupRecord, now: float) -> list[float]:
        rec.restart_times = [t for t in rec.restart_times if now - t < self.settings.restart_window_s]
        return rec.restart_times

    def _backoff(self, rec: GroupRecord, now: float) -> float:
        """The wait before this record's next restart: none after a quiet window, then doubling, capped."""
        n = len(self._in_window(rec, now))
        if n == 0:
            return 0.0
        return min(self.settings.restart_backoff_max_s, self.settings.restart_backoff_s * 2 ** (n - 1))

    def _restart(self, rec: GroupRecord, now: float, force: bool = False) -> None:
        """Restart a down record now, after its backoff, or when its budget refills (``force``: the operator
        asked, through ``scale``: no budget, no wait)."""
        if self.closed:
            return
        recent = self._in_window(rec, now)
        if not force and len(recent) >= self.settings.max_replica_restarts:
            rec.state = GroupState.DOWN
            rec.retry_at = recent[0] + self.settings.restart_window_s if recent else None
            log.warning("replica group %d stays down: %d restarts within restart_window_s (%ss)%s",
                        rec.spec.group_id, len(recent), self.settings.restart_window_s,
                        "" if rec.retry_at is None else f"; it restarts in {rec.retry_at - now:.0f}s")
            return
        wait = 0.0 if force else self._backoff(rec, now)
        if rec.state is GroupState.RESTARTING and rec.retry_at is not None and now >= rec.retry_at:
            wait = 0.0  # its backoff is over
        rec.state = GroupState.RESTARTING
        if wait > 0:
            rec.retry_at = now + wait  # check() launches it then
            return
        rec.retry_at = None
        rec.restarts += 1
        rec.restart_times.append(now)
        rec.spec = self._renumber(rec.spec)
        rec.started_at = now
        self.spawn(functools.partial(self._relaunch, rec), f"flotilla-restart-{rec.spec.group_id}")

    def _relaunch(self, rec: GroupRecord) -> None:
        with self.lock:
            if self.closed or rec not in self.records or rec.state is not GroupState.RESTARTING:
                return
        self._launch(rec)  # a failure leaves it down, with the reason in stats

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
        if dp_size == len(live):
            self._restart_down(live)
            return
        if dp_size > len(live):
            self._restart_down(live)
            self._grow(dp_size - len(live))
            return
        order = {GroupState.DOWN: 0, GroupState.RESTARTING: 1, GroupState.STARTING: 2, GroupState.READY: 3}
        leaving = sorted(live, key=lambda r: (order[r.state], -r.spec.group_id))[:len(live) - dp_size]
        for rec in leaving:
            self._remove(rec, drain_timeout_s)

    def _restart_down(self, records: list[GroupRecord]) -> None:
        """``scale`` to a size that keeps them: down groups restart now (whatever their budget), and ``scale``
        returns once they are ready."""
        with self.lock:
            down = [r for r in records if r.state is GroupState.DOWN and r in self.records]
            for rec in down:
                rec.retry_at = None
                self._restart(rec, self.clock(), force=True)
        if down:
            self._wait_ready(down)

    def _grow(self, count: int) -> None:
        tp, pp = self.settings.tp_size, self.settings.pp_size
        with self.lock:
            used = {r.spec.first_global_rank for r in self.records}
        slots = list(itertools.islice((s for s in itertools.count(0, tp * pp) if s not in used), count))
        self.launcher.ensure_capacity(max(slots) + tp * pp)
        self._wait_ready(self.start([replica_group(0, 0, tp, slot, pp) for slot in slots]))

    def _wait_ready(self, records: list[GroupRecord]) -> None:
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
            gone = rec.state in (GroupState.DOWN, GroupState.RESTARTING, GroupState.STARTING)
            if gone:
                self.records.remove(rec)  # nothing routed to it: stop it and forget it
                self.launcher.kill_group(rec.spec.group_id)
                ended = self.dispatcher.replica_down({t: "scaled down" for t in rec.spec.replicas}, charge=False)
                self._close_links(rec.spec)
        if gone:
            wake_all(ended)
            return
        with self.lock:
            rec.state = GroupState.DRAINING
            replicas = list(rec.spec.replicas)
            for t in replicas:
                self.controller.set_accepting(t, False)
        deadline = self.clock() + drain_timeout_s
        while any(self.dispatcher.requests_on(t) for t in replicas) and self.clock() < deadline and \
                rec in self.records:
            time.sleep(0.05)
        with self.lock:
            if rec not in self.records:  # it died while draining: its requests were moved then
                return
            _, ended = self.dispatcher.hand_off(replicas)
            for t in replicas:
                self.controller.send(t, Shutdown(), timeout_ms=1000)
        wake_all(ended)
        self.launcher.stop_group(rec.spec.group_id, timeout=30)
        with self.lock:
            ended = self.dispatcher.replica_down({t: "scaled down" for t in replicas}, charge=False)
            self._close_links(rec.spec)
            if rec in self.records:
                self.records.remove(rec)
        wake_all(ended)

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
        """Stop restarting; returns the requests still waiting in the dispatcher's queue."""
        with self.lock:
            self.closed = True
            return self.dispatcher.close()

    def send_all(self, msg: object) -> None:
        for t in self.ready_replicas():
            self.controller.send(t, msg)
