"""The dispatcher and the fleet's restart budget with fakes and a manual clock: no processes.

Poison on evidence (issue 29 item 1): a death is charged only when the replica had the request in a batch;
two charged deaths make a suspect that runs alone; only a death while alone fails it. Rolling deaths across
replicas never fail an innocent request. Restarts (item 5): a budget per window with backoff that refills,
and ``scale`` to the same size restarts a down group. Liveness: a leader inside one step past step_timeout_s
is dead although it beats.
"""

from __future__ import annotations

import pytest

from flotilla.config import EngineConfig
from flotilla.ipc.messages import AddRequest, ReplicaLoad, StepOutput, TokenOutput, WorkerReady
from flotilla.launch.topology import layout
from flotilla.router.controller import DPController
from flotilla.router.dispatch import Dispatcher, WaitReason
from flotilla.router.fleet import FleetSettings, GroupState, ReplicaFleet
from tests.test_fleet import Clock, FakeLauncher, FakeLinks, request


class Harness:
    def __init__(self, dp: int = 2, restarts: int = 10, window: float = 600.0, backoff: float = 0.0,
                 backoff_max: float = 60.0, step_timeout: float = 600.0):
        self.launcher, self.links, self.clock = FakeLauncher(), FakeLinks(), Clock()
        self.controller = DPController("round_robin")
        self.dispatcher = Dispatcher(self.controller, 30.0, clock=self.clock)
        self.fleet = ReplicaFleet(self.launcher, self.dispatcher, self.links,
                                  lambda spec, addrs: [None] * spec.world_size,
                                  FleetSettings(1, 1, restarts, 10.0, 30.0, 60.0, restart_window_s=window,
                                                restart_backoff_s=backoff, restart_backoff_max_s=backoff_max,
                                                step_timeout_s=step_timeout),
                                  spawn=lambda fn, name: fn(), clock=self.clock)
        self.fleet.start(layout(1, dp, False))
        self.ready_all()

    def ready_all(self) -> None:
        for rec in self.fleet.records:
            if rec.state in (GroupState.STARTING, GroupState.RESTARTING):
                for t in rec.spec.replicas:
                    self.fleet.on_ready(WorkerReady(t, 0, 1, 64, 16, 256))

    def rec_of(self, replica):
        return next(r for r in self.fleet.records if replica in r.spec.replicas)

    def kill(self, replica) -> None:
        """The replica's group dies; the fleet notices, restarts it, and it comes back at once."""
        self.launcher.dead[self.rec_of(replica).spec.group_id] = "exit code -9"
        self.fleet.check()
        self.ready_all()

    def started(self, s) -> None:
        """The replica announced the request in a batch (StepStarted)."""
        self.dispatcher.on_started(s.replica, [s.rid])

    def tokens(self, s, ids, finished=False) -> None:
        self.clock.t += 0.01
        self.dispatcher.on_step(StepOutput(s.replica, [TokenOutput(s.rid, ids, finished=finished,
                                                                   finish_reason="length" if finished else None)],
                                           ReplicaLoad()))

    def submit(self, rid: str, **kw):
        s = request(rid, **kw)
        self.dispatcher.submit(s)
        return s


def test_a_death_before_the_request_ran_there_is_not_charged():
    h = Harness()
    s = h.submit("a")
    h.tokens(s, [5])        # it ran on its first replica ...
    h.kill(s.replica)       # ... which died: charged once
    assert s.deaths == 1 and not s.finished
    h.kill(s.replica)       # the replica it just moved to dies before it ran a step there: not charged
    assert s.deaths == 1 and not s.finished
    (resumed,) = [m for m in h.links.sent[s.replica] if isinstance(m, AddRequest)]
    assert resumed.output_ids == [5]  # a continuation, tokens kept


def test_rolling_deaths_make_a_suspect_that_completes_alone():
    h = Harness(dp=3)
    a, b = h.submit("a"), h.submit("b")
    for _ in range(2):  # both ran on each replica that died under them
        for s in (a, b):
            h.started(s)
        replicas = {a.replica, b.replica}
        for t in replicas:
            h.kill(t)
    assert a.deaths >= 2 and b.deaths >= 2 and not a.finished and not b.finished
    # each suspect runs alone: no two on one replica, and no other request is routed to theirs
    assert a.alone and b.alone and a.replica != b.replica
    c = h.submit("c")
    assert c.replica not in (a.replica, b.replica)
    h.tokens(a, [1] * 8, finished=True)
    assert a.finished and a.finish_reason == "length" and a.error is None
    assert not h.controller.reservations.get("a")


def test_a_suspect_that_kills_again_alone_fails_clearly_and_the_others_complete():
    h = Harness(dp=2)
    bad, good = h.submit("bad"), h.submit("good")
    for _ in range(2):
        h.started(bad)
        h.started(good)
        h.kill(bad.replica)
        if not good.finished and good.ran_on is not None:
            h.kill(good.replica)
    assert bad.alone
    h.started(bad)
    h.kill(bad.replica)
    assert bad.finished and bad.finish_reason == "error" and "running alone" in bad.error
    assert "kills replicas" in bad.error
    assert not good.finished
    if good.replica < 0:
        h.fleet.check()
    h.tokens(good, [1] * 8, finished=True)
    assert good.finished and good.error is None


def test_a_suspect_waits_for_a_replica_to_empty():
    h = Harness(dp=1)
    other = h.submit("other")
    s = h.submit("s")
    s.deaths = 2  # a suspect (as after two charged deaths)
    h.dispatcher.hand_off([s.replica])  # place again: it must wait for the replica to hold nothing else
    assert s.replica == -1 and [w.reason for w in h.dispatcher.waiting] == [WaitReason.ISOLATION]
    late = h.submit("late")  # the replica is kept for the suspect: new requests wait too
    assert late.replica == -1
    h.tokens(other, [1] * 8, finished=True)  # the replica is empty now: the suspect goes, alone
    assert s.alone and s.replica >= 0 and late.replica == -1
    h.tokens(s, [1] * 8, finished=True)
    assert late.replica >= 0 or h.dispatcher.pump() == [] and late.replica >= 0


def test_pause_holds_then_resume_releases_in_order():
    h = Harness()
    h.dispatcher.pause()
    s1, s2 = h.submit("a"), h.submit("b")
    assert h.dispatcher.held() == [s1, s2] and s1.replica == -1
    assert h.dispatcher.resume() == [] and s1.replica >= 0 and s2.replica >= 0 and not h.dispatcher.held()


def test_abort_of_a_waiting_request_ends_it_at_once():
    h = Harness()
    h.dispatcher.pause()
    s = h.submit("a")
    assert h.dispatcher.abort("a") is s and s.finished and s.finish_reason == "abort"
    assert not h.dispatcher.waiting and "a" not in h.dispatcher.requests


def test_duplicate_request_id_is_refused():
    h = Harness()
    h.submit("a")
    with pytest.raises(ValueError, match="already in flight"):
        h.submit("a")


# ============================================================================================ restarts
def test_restart_budget_refills_as_the_window_moves_on():
    h = Harness(dp=1, restarts=2, window=60.0)
    (rec,) = h.fleet.records
    replica = rec.spec.replicas[0]
    h.kill(replica)
    h.kill(rec.spec.replicas[0])
    assert rec.restarts == 2 and rec.state is GroupState.READY
    h.kill(rec.spec.replicas[0])  # a third death within 60 s: the budget is spent
    assert rec.state is GroupState.DOWN and rec.restarts == 2
    h.clock.t += 30
    h.fleet.check()
    assert rec.state is GroupState.DOWN
    h.clock.t += 31  # the oldest restart left the window
    for r in h.fleet.records:
        r.last_seen.clear()
    h.fleet.check()
    h.ready_all()
    assert rec.state is GroupState.READY and rec.restarts == 3


def test_restarts_back_off_exponentially_and_capped():
    h = Harness(dp=1, restarts=10, window=600.0, backoff=2.0, backoff_max=5.0)
    (rec,) = h.fleet.records
    waits = []
    for _ in range(4):
        h.launcher.dead[rec.spec.group_id] = "exit code -9"
        before = len(h.launcher.started)
        h.fleet.check()
        t0 = h.clock.t
        while len(h.launcher.started) == before:
            h.clock.t += 0.5
            rec.last_seen.clear()
            h.fleet.check()
        waits.append(h.clock.t - t0)
        h.ready_all()
    assert waits == [0.0, 2.0, 4.0, 5.0]  # at once, then 2, 4, capped at 5


def test_scale_to_the_same_size_restarts_a_down_group():
    h = Harness(dp=2, restarts=0)
    a, b = h.fleet.records
    h.launcher.dead[b.spec.group_id] = "exit code -9"
    h.fleet.check()
    assert b.state is GroupState.DOWN
    import threading
    import time

    def ready_soon():
        for _ in range(200):
            if b.state is GroupState.RESTARTING:
                h.ready_all()
                return
            time.sleep(0.01)

    th = threading.Thread(target=ready_soon)
    th.start()
    h.fleet.scale(2)
    th.join()
    assert b.state is GroupState.READY and h.fleet.healthy() and h.fleet.dp_size() == 2


def test_restart_settings_are_validated_at_the_edge(tmp_path):
    for name, bad in (("restart_window_s", 0), ("restart_window_s", float("inf")), ("step_timeout_s", -1),
                      ("restart_backoff_s", float("nan")), ("step_timeout_s", True)):
        with pytest.raises(ValueError, match=f"^{name}: "):
            EngineConfig(model=str(tmp_path), **{name: bad})
    with pytest.raises(ValueError, match="^restart_backoff_max_s: must be >= restart_backoff_s"):
        EngineConfig(model=str(tmp_path), restart_backoff_s=10.0, restart_backoff_max_s=1.0)


# ============================================================================================ liveness
def test_a_leader_stuck_in_one_step_is_dead_and_its_requests_continue_elsewhere():
    h = Harness(dp=2, step_timeout=30.0)
    s = h.submit("a")
    h.tokens(s, [5, 6])
    stuck = s.replica
    h.fleet.on_heartbeat(stuck, 10.0)  # a long step: alive
    h.fleet.check()
    assert h.rec_of(stuck).state is GroupState.READY
    h.fleet.on_heartbeat(stuck, 31.0)  # still beating, but inside one step for 31 s
    h.fleet.check()
    assert stuck not in h.fleet.ready_replicas() and "step_timeout_s" in (h.fleet.records[0].reason or "") + \
        (h.fleet.records[1].reason or "")
    assert s.replica != stuck and s.replica >= 0 and not s.finished
    (resumed,) = [m for m in h.links.sent[s.replica] if isinstance(m, AddRequest)]
    assert resumed.output_ids == [5, 6]
