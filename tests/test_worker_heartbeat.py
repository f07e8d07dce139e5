"""Liveness from the leader's own heartbeat thread: a slow step keeps Heartbeats flowing, a stopped
process sends none (tiny model on CPU, a real worker group; see tests/test_worker_harness.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from flotilla.ipc.messages import Heartbeat, StepOutput
from flotilla.sampling import SamplingParams
from flotilla.worker import faults
from flotilla.worker.leader import HEARTBEAT_S
from test_worker_harness import WorkerHarness

pytestmark = pytest.mark.timeout(240)

SLOW_S = 5 * HEARTBEAT_S


@pytest.mark.parametrize("pp_size", [1, 2])
def test_heartbeats_flow_during_a_slow_step_and_stop_with_the_process(monkeypatch, pp_size):
    monkeypatch.setenv(faults.SLOW_STEP_S, str(SLOW_S))  # spawned ranks inherit it
    monkeypatch.setenv(faults.STEP, "1")
    # The synchronous order: the loop then does nothing but the slow step between two visits to its socket.
    # (With overlap it visits the socket between launching step 1 and collecting it, which restarts the age;
    # a step hung in collect is still seen: tests/test_rolling_faults.py hangs one under the default overlap.)
    with WorkerHarness(pp_size=pp_size, enable_overlap_schedule=False) as h:
        h.add("slow", [5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
        # Everything that arrives before the slow step's token: the step loop is stuck in step 1.
        first = h.wait_for(lambda m: isinstance(m, StepOutput) and any(o.rid == "slow" for o in m.outputs),
                           timeout=SLOW_S + 60)
        during = [m for m in h.seen[:h.seen.index(first)] if isinstance(m, Heartbeat) and m.step_age_s > 0]
        assert len(during) >= 2, h.seen  # beats kept coming while the step ran
        assert all(b.replica == 0 and b.rank == 0 and b.steps == 0 for b in during)
        ages = [b.step_age_s for b in during]
        assert ages == sorted(ages) and ages[-1] > ages[0]  # one step, growing older: not an idle loop
        assert h.run("slow").finish_reason == "length"
        later = h.wait_for(lambda m: isinstance(m, Heartbeat) and m.steps >= 3)
        assert later.step_age_s < SLOW_S  # the step loop is back to short steps

        leader = h.ready.pid
        os.kill(leader, signal.SIGSTOP)
        try:
            time.sleep(0.5)
            h.recv(0)  # what was sent before the stop took effect
            h.recv(0.2)
            quiet = h.recv(3 * HEARTBEAT_S)
            assert not [m for m in quiet if isinstance(m, Heartbeat)], quiet  # a stopped process is silent
        finally:
            os.kill(leader, signal.SIGCONT)
        h.wait_for(lambda m: isinstance(m, Heartbeat), timeout=10)  # and beats again once continued
        assert h.alive()


def test_heartbeat_message_reports_steps_and_step_age():
    from flotilla.worker.heartbeat import HeartbeatThread

    beat = HeartbeatThread(3, 0, "ipc:///nonexistent", None, HEARTBEAT_S)  # never started: no socket
    assert beat.message() == Heartbeat(3, 0, 0, 0.0)  # idle
    beat.busy_since = time.monotonic() - 2.0
    beat.steps = 7
    msg = beat.message()
    assert msg.steps == 7 and msg.step_age_s >= 2.0
    beat.idle()
    assert beat.message().step_age_s == 0.0


def test_step_faults_are_read_from_the_environment_and_scoped_to_a_replica():
    env = {faults.SLOW_STEP_S: "2.5", faults.STEP: "3", faults.REPLICA: "1", faults.BAD_SAMPLING_RID: "x"}
    mine, other = faults.StepFaults(1, env), faults.StepFaults(0, env)
    assert mine.active and mine.slow_s == 2.5 and mine.step == 3 and mine.bad_sampling_rid == "x"
    assert not other.active
    assert not faults.StepFaults(0, {}).active
