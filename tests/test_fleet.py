"""The replica fleet driven with a fake launcher, fake links and a manual clock: no processes.

Each test plays one lifecycle story (death while starting, while draining, two at once, the restart budget,
scaling while a group is down, a late message from a dead incarnation, poison containment) and checks the
group states, where requests went, and what ended.
"""

from __future__ import annotations

import threading
import time

import pytest

from flotilla.frontend.detokenizer import IncrementalDetokenizer
from flotilla.ipc.messages import AddRequest, ReplicaLoad, Shutdown, StepOutput, TokenOutput, WorkerReady
from flotilla.launch.topology import layout
from flotilla.frontend.request import RequestFailed, RequestState
from flotilla.router.controller import DPController
from flotilla.router.dispatch import Dispatcher
from flotilla.router.fleet import FleetSettings, GroupState, ReplicaFleet
from flotilla.sampling import SamplingParams


class FakeLauncher:
    multi_node = False
    bind_host = None
    stager = None

    def __init__(self) -> None:
        self.started: list[int] = []
        self.dead: dict[int, str] = {}
        self.killed: list[int] = []
        self.stopped: list[int] = []
        self.capacity = 0
        self.fail_next_start = False

    def start_group(self, spec, ranks) -> None:
        if self.fail_next_start:
            self.fail_next_start = False
            raise RuntimeError("no room on the cluster")
        assert len(ranks) == spec.world_size
        self.started.append(spec.group_id)

    def stop_group(self, group_id, timeout=10.0) -> None:
        self.stopped.append(group_id)

    def kill_group(self, group_id) -> None:
        self.killed.append(group_id)
        self.dead.pop(group_id, None)

    def dead_groups(self) -> dict[int, str]:
        return dict(self.dead)

    def pids(self, group_id) -> list[int]:
        return [1000 + group_id]

    def ensure_capacity(self, num_ranks) -> None:
        self.capacity = max(self.capacity, num_ranks)

    def shutdown(self, timeout=10.0) -> None:
        pass


class FakeLinks:
    def __init__(self) -> None:
        self.sent: dict[int, list] = {}
        self.unreachable: set[int] = set()
        self.closed: list[int] = []

    def open(self, replica):
        self.sent[replica] = []

        def send(msg, timeout_ms=0):
            if replica in self.unreachable:
                raise TimeoutError("no peer")
            self.sent[replica].append(msg)

        return send, f"ipc://fake/in{replica}"

    def close(self, replica) -> None:
        self.closed.append(replica)

    def writable(self, replica) -> bool:
        return replica not in self.unreachable

    def adds(self, replica) -> list[str]:
        return [m.rid for m in self.sent.get(replica, []) if isinstance(m, AddRequest)]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Harness:
    def __init__(self, dp: int = 2, restarts: int = 1, spawn_now: bool = True):
        self.launcher, self.links, self.clock = FakeLauncher(), FakeLinks(), Clock()
        self.controller = DPController("round_robin")
        self.dispatcher = Dispatcher(self.controller, 30.0, clock=self.clock)
        self.spawned: list = []
        spawn = (lambda fn, name: fn()) if spawn_now else (lambda fn, name: self.spawned.append(fn))
        self.fleet = ReplicaFleet(self.launcher, self.dispatcher, self.links, lambda spec, addrs: [None] * spec.world_size,
                                  FleetSettings(tp_size=1, pp_size=1, max_replica_restarts=restarts,
                                                heartbeat_timeout_s=10.0, failover_timeout_s=30.0,
                                                worker_start_timeout=60.0),
                                  spawn=spawn, clock=self.clock)
        self.fleet.start(layout(1, dp, False))

    def records(self):
        return list(self.fleet.records)

    def pending(self):
        """(request, deadline) of what waits for a replica (the dispatcher's queue)."""
        return self.dispatcher.pending()

    def ready(self, rec) -> list[RequestState]:
        out = []
        for t in rec.spec.replicas:
            out += self.fleet.on_ready(WorkerReady(t, 0, 1, 64, 16, 256))
        return out

    def ready_all(self) -> None:
        for rec in self.records():
            if rec.state in (GroupState.STARTING, GroupState.RESTARTING):
                self.ready(rec)

    def kill(self, rec, why="exit code -9") -> None:
        self.launcher.dead[rec.spec.group_id] = why

    def step(self, replica, rid, tokens, finished=False) -> None:
        """A step output from a replica (a sign of life too), a moment later."""
        self.clock.t += 0.01
        self.fleet.on_seen(replica)
        self.dispatcher.on_step(StepOutput(replica, [TokenOutput(rid, tokens, finished=finished,
                                                                 finish_reason="length" if finished else None)],
                                           ReplicaLoad()))


def request(rid: str, max_new_tokens: int = 8) -> RequestState:
    class NoTok:
        def decode(self, ids, **kw):
            return ""

    return RequestState(rid, [1, 2, 3], SamplingParams(max_new_tokens=max_new_tokens),
                        IncrementalDetokenizer(NoTok(), [1, 2, 3]))


def submit(h: Harness, rid: str, **kw) -> RequestState:
    s = request(rid, **kw)
    h.dispatcher.submit(s)
    return s


def test_start_ready_and_route():
    h = Harness()
    assert [r.state for r in h.records()] == [GroupState.STARTING] * 2
    assert h.fleet.starting() and not h.fleet.healthy()
    h.ready_all()
    assert [r.state for r in h.records()] == [GroupState.READY] * 2 and h.fleet.healthy()
    s = submit(h, "a")
    assert s.replica in h.fleet.ready_replicas() and h.links.adds(s.replica) == ["a"]


def test_requests_wait_while_starting_then_go():
    h = Harness(dp=1)
    s = submit(h, "a")
    assert s.replica == -1 and [p for p, _ in h.pending()] == [s]
    h.ready_all()
    assert h.links.adds(s.replica) == ["a"] and not h.pending()


def test_death_while_starting_restarts_and_pending_survives():
    h = Harness(dp=1)
    (rec,) = h.records()
    first = rec.spec.group_id
    s = submit(h, "a")
    h.kill(rec)
    h.fleet.check()
    assert rec.state is GroupState.RESTARTING and rec.restarts == 1 and rec.spec.group_id != first
    assert first in h.launcher.killed and h.launcher.started[-1] == rec.spec.group_id
    assert not s.finished and [p for p, _ in h.pending()] == [s]
    h.ready(rec)
    assert rec.state is GroupState.READY and h.links.adds(s.replica) == ["a"]


def test_failover_resumes_as_continuation_elsewhere():
    h = Harness()
    h.ready_all()
    a, b = h.records()
    s = submit(h, "a")
    h.step(s.replica, "a", [5, 6])
    dead = a if s.replica in a.spec.replicas else b
    other = b if dead is a else a
    old = s.replica
    h.kill(dead)
    h.fleet.check()
    assert s.replica in other.spec.replicas and s.replica != old
    (resumed,) = [m for m in h.links.sent[s.replica] if isinstance(m, AddRequest)]
    assert resumed.output_ids == [5, 6] and s.deaths == 1
    assert dead.state is GroupState.READY or dead.state is GroupState.RESTARTING
    rows = h.fleet.rows()
    assert any(r["id"] == old and r.get("restarting") for r in rows)


def test_two_deaths_at_once_keep_requests_waiting_for_restarts():
    h = Harness(spawn_now=False)
    h.ready_all()
    a, b = h.records()
    s1, s2 = submit(h, "a"), submit(h, "b")
    h.kill(a)
    h.kill(b)
    ended = h.fleet.check()
    # nothing was sent to the other dead replica; both requests wait for a restart
    assert ended == [] and {p.rid for p, _ in h.pending()} == {"a", "b"}
    assert [r.state for r in h.records()] == [GroupState.RESTARTING] * 2
    for fn in h.spawned:
        fn()
    h.ready(a)
    assert {s1.replica, s2.replica} <= set(a.spec.replicas) and not h.pending()
    assert not s1.finished and not s2.finished


def test_restart_budget_spent_then_requests_fail_clearly():
    h = Harness(dp=1, restarts=1)
    h.ready_all()
    (rec,) = h.records()
    h.kill(rec)
    h.fleet.check()
    h.ready(rec)
    s = submit(h, "a")
    h.kill(rec)
    ended = h.fleet.check()
    assert rec.state is GroupState.DOWN and rec.restarts == 1
    assert ended == [s] and s.finish_reason == "error" and "replica died" in s.error
    with pytest.raises(RequestFailed, match="no replica"):
        submit(h, "b")
    assert not h.fleet.healthy() and h.fleet.rows()[0]["down_reason"] == "exit code -9"


def test_poison_request_fails_when_it_kills_its_replica_again_alone():
    """Issue 29: two charged deaths make it a suspect, not a failure; it runs alone, and fails only when that
    replica dies too (three deaths in all)."""
    h = Harness(dp=2, restarts=5)
    h.ready_all()
    s = submit(h, "poison")
    for death in range(3):
        h.step(s.replica, "poison", [])  # the replica took it into a batch (the evidence) ...
        assert s.alone is (death == 2)   # the third time it runs alone
        rec = next(r for r in h.records() if s.replica in r.spec.replicas)
        h.kill(rec)  # ... and died
        h.clock.t += 3  # past the restart backoff (1 s, then 2 s)
        h.fleet.check()
        h.fleet.check()
        h.ready_all()
    assert s.finished and s.finish_reason == "error" and "running alone" in s.error and s.deaths == 3
    other = submit(h, "good")
    assert not other.finished and other.replica in h.fleet.ready_replicas()


def test_death_of_a_replica_that_never_took_the_request_does_not_count():
    h = Harness(dp=2, restarts=5)
    h.ready_all()
    s = submit(h, "a")
    h.clock.t += 1
    rec = next(r for r in h.records() if s.replica in r.spec.replicas)
    h.kill(rec)  # silent since the dispatch: it was dead already
    h.fleet.check()
    assert s.deaths == 0 and not s.finished


def test_silence_is_death_but_a_talking_replica_lives():
    h = Harness(dp=2)
    h.ready_all()
    a, b = h.records()
    h.clock.t += 8
    h.fleet.on_seen(a.spec.replicas[0])
    h.clock.t += 8  # b silent for 16 s > 10 s; a spoke 8 s ago
    h.fleet.check()
    assert a.state is GroupState.READY and b.state is GroupState.RESTARTING
    assert "no sign of life" in b.reason


def test_start_timeout_is_death():
    h = Harness(dp=1, restarts=0)
    (rec,) = h.records()
    h.clock.t += 61
    h.fleet.check()
    assert rec.state is GroupState.DOWN and "worker_start_timeout" in rec.reason


def test_late_message_from_a_dead_incarnation_is_ignored():
    h = Harness(dp=1)
    h.ready_all()
    (rec,) = h.records()
    old = rec.spec.replicas[0]
    h.kill(rec)
    h.fleet.check()
    assert h.fleet.on_ready(WorkerReady(old, 0, 1, 64, 16, 256)) == []
    assert rec.state is GroupState.RESTARTING and old not in h.controller.views
    h.fleet.on_seen(old)  # no error, no effect
    h.ready(rec)
    assert rec.state is GroupState.READY


def test_unreachable_replica_is_skipped_then_queued():
    h = Harness(dp=2)
    h.ready_all()
    a, b = h.records()
    h.links.unreachable = {a.spec.replicas[0]}
    s = submit(h, "x")
    assert s.replica == b.spec.replicas[0]
    h.links.unreachable = {a.spec.replicas[0], b.spec.replicas[0]}
    s2 = submit(h, "y")
    assert s2.replica == -1 and [p for p, _ in h.pending()] == [s2]
    h.links.unreachable = set()
    h.fleet.check()
    assert s2.replica in h.fleet.ready_replicas() and not h.pending()


def test_pending_request_times_out():
    h = Harness(dp=1)
    s = submit(h, "a")
    h.clock.t += 31
    ended = h.fleet.check()  # still starting (worker_start_timeout 60 s), but the request waited 31 s
    assert ended == [s] and "failover_timeout_s" in s.error


def test_abort_while_pending_and_during_failover_ends_the_request():
    h = Harness(dp=2, spawn_now=False)
    h.ready_all()
    a, b = h.records()
    s = submit(h, "a")
    s.abort_requested = True  # the user aborted; then its replica died before the abort landed
    rec = a if s.replica in a.spec.replicas else b
    h.kill(rec)
    h.fleet.check()
    assert s.finished and s.finish_reason == "abort"


def test_grow_and_drain():
    h = Harness(dp=1)
    h.ready_all()

    def ready_soon():
        for _ in range(200):
            new = [r for r in h.records() if r.state is GroupState.STARTING]
            if new:
                h.ready(new[0])
                return
            time.sleep(0.01)

    t = threading.Thread(target=ready_soon)
    t.start()
    h.fleet.scale(2)
    t.join()
    assert h.fleet.dp_size() == 2 and h.launcher.capacity == 2
    a, b = h.records()
    s = submit(h, "x")
    h.fleet.scale(1, drain_timeout_s=0)  # the newest goes; what it held moves to the other
    assert h.records() == [a] and s.replica in a.spec.replicas
    assert any(isinstance(m, Shutdown) for m in h.links.sent[b.spec.replicas[0]])
    assert b.spec.group_id in h.launcher.stopped


def test_death_while_draining_moves_its_requests_and_does_not_restart():
    h = Harness(dp=2)
    h.ready_all()
    a, b = h.records()
    req = request("x")
    h.dispatcher.dispatch_to(req, b.spec.replicas[0])
    h.step(b.spec.replicas[0], "x", [7])
    th = threading.Thread(target=h.fleet.scale, args=(1, 60.0))
    th.start()
    for _ in range(200):
        if b.state is GroupState.DRAINING:
            break
        time.sleep(0.01)
    assert b.state is GroupState.DRAINING
    h.kill(b)
    h.fleet.check()
    th.join(timeout=10)
    assert not th.is_alive()
    assert h.records() == [a] and req.replica == a.spec.replicas[0] and not req.finished
    assert len(h.launcher.started) == 2  # no restart of a group that was leaving


def test_scale_while_a_group_is_down_removes_the_down_one_first():
    h = Harness(dp=2, restarts=0)
    h.ready_all()
    a, b = h.records()
    h.kill(b)
    h.fleet.check()
    assert b.state is GroupState.DOWN and not h.fleet.healthy()
    h.fleet.scale(1)
    assert h.records() == [a] and h.fleet.healthy()


def test_failed_restart_leaves_it_down_and_waiting_requests_fail():
    h = Harness(dp=1, restarts=1)
    h.ready_all()
    (rec,) = h.records()
    s = submit(h, "a")
    h.launcher.fail_next_start = True
    h.kill(rec)
    h.fleet.check()
    assert rec.state is GroupState.DOWN and "start failed" in rec.reason
    assert s.finished and s.finish_reason == "error"


def test_scale_refused_with_dp_attention():
    launcher, links = FakeLauncher(), FakeLinks()
    fleet = ReplicaFleet(launcher, Dispatcher(DPController("round_robin")), links, lambda spec, addrs: [None] * spec.world_size,
                         FleetSettings(2, 1, 1, 10.0, 30.0, 60.0, scalable=False))
    fleet.start(layout(2, 2, True))
    assert len(fleet.records) == 1 and len(fleet.records[0].spec.replicas) == 2
    with pytest.raises(ValueError, match="enable_dp_attention"):
        fleet.scale(1)
