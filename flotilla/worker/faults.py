"""Fault injection for tests. TEST-ONLY: nothing in production sets these variables.

The worker reads them from its environment, so a test sets them in ``os.environ`` before starting an
Engine (or a worker process) and the spawned ranks inherit them:

* ``FLOTILLA_FAULT_SLOW_STEP_S=<seconds>``: the leader sleeps that long inside one step, after the forward
  and before sampling (a stand-in for a long prefill or a first kernel compile: the step loop is busy,
  the process is alive).
* ``FLOTILLA_FAULT_STEP=<n>``: which step sleeps: the n-th forward step of the leader, counted from 1
  (default 1).
* ``FLOTILLA_FAULT_REPLICA=<id>``: only the leader of that replica id (default: every leader).
* ``FLOTILLA_FAULT_BAD_SAMPLING_RID=<rid>``: the leader breaks that request's SamplingParams just before
  sampling it (temperature becomes a string), as if a bad parameter had slipped through every validation:
  the sampler then raises for that row.
* ``FLOTILLA_FAULT_CRASH_RID=<rid>``: a leader (of any replica and incarnation, unless
  ``FLOTILLA_FAULT_REPLICA`` names one) crashes its rank when a batch holding that request is about to run:
  a request that really kills replicas (poison). The crash comes just after the leader announced the batch
  (``StepStarted``), as a device fault surfaces at the next synchronisation.
* A step that hangs: ``FLOTILLA_FAULT_SLOW_STEP_S`` with a large value (the heartbeat thread goes on while
  the step loop sleeps; ``step_timeout_s`` is what declares such a leader dead).
* ``FLOTILLA_FAULT_WEIGHTS=<version>:<replica>:<rank>[:<n>],...``: while staging the weight update of that
  version, that rank of that replica raises at the tensor numbered ``n`` (from 0; default 1), as if the
  tensor were corrupt or missing (see ``weight_fault``).

Why environment variables: they reach spawned processes (and Ray actors started with the same
environment) without any argument of the launchers changing.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

SLOW_STEP_S = "FLOTILLA_FAULT_SLOW_STEP_S"
STEP = "FLOTILLA_FAULT_STEP"
REPLICA = "FLOTILLA_FAULT_REPLICA"
BAD_SAMPLING_RID = "FLOTILLA_FAULT_BAD_SAMPLING_RID"
CRASH_RID = "FLOTILLA_FAULT_CRASH_RID"


class InjectedCrash(RuntimeError):
    """The rank crashes on purpose (``FLOTILLA_FAULT_CRASH_RID``)."""
WEIGHTS = "FLOTILLA_FAULT_WEIGHTS"


def weight_fault(version: int, replica: int, rank: int, environ: dict[str, str] | None = None) -> int | None:
    """The index of the tensor at which staging update ``version`` fails on this rank, or None (no fault)."""
    spec = (os.environ if environ is None else environ).get(WEIGHTS, "")
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = [int(x) for x in entry.split(":")]
        if parts[:3] == [version, replica, rank]:
            return parts[3] if len(parts) > 3 else 1
    return None


class StepFaults:
    """The faults configured for one leader, read once when it starts."""

    def __init__(self, replica: int, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.slow_s = float(env.get(SLOW_STEP_S, "0") or 0)
        self.step = int(env.get(STEP, "1") or 1)
        self.bad_sampling_rid = env.get(BAD_SAMPLING_RID) or None
        self.crash_rid = env.get(CRASH_RID) or None
        only = env.get(REPLICA, "")
        if only and int(only) != replica:
            self.slow_s, self.bad_sampling_rid, self.crash_rid = 0.0, None, None

    @property
    def active(self) -> bool:
        return self.slow_s > 0 or self.bad_sampling_rid is not None or self.crash_rid is not None

    def before_forward(self, seqs) -> None:
        """Called by the leader with a batch it announced and is about to run."""
        if self.crash_rid is not None and any(seq.rid == self.crash_rid for seq in seqs):
            log.warning("fault injection: the rank crashes on request %r (%s)", self.crash_rid, CRASH_RID)
            time.sleep(0.2)  # the announcement leaves the socket first
            raise InjectedCrash(f"fault injection: request {self.crash_rid!r} crashes its replica")

    def before_sample(self, seqs) -> None:
        """Called by the leader with the sequences it is about to sample."""
        for seq in seqs:
            if seq.rid == self.bad_sampling_rid:
                log.warning("fault injection: breaking %r's sampling params (%s)", seq.rid, BAD_SAMPLING_RID)
                seq.sampling.temperature = "broken"

    def on_step(self, step: int) -> None:
        """Called by the leader inside its ``step``-th forward step (counted from 1)."""
        if self.slow_s > 0 and step == self.step:
            log.warning("fault injection: step %d sleeps %.1fs (%s)", step, self.slow_s, SLOW_STEP_S)
            time.sleep(self.slow_s)
