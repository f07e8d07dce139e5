"""A real worker group started the way the front end starts one (MpLauncher + ChannelHub), with the
front end's sockets in the test's hands: it can push raw frames to the leader and read every message
the group sends (Heartbeat included), which an Engine does not expose. Used by tests/test_worker_*.py.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import pytest

from conftest import tiny
from flotilla.config import EngineConfig
from flotilla.ipc.channel import ChannelHub
from flotilla.ipc.messages import (AddRequest, Heartbeat, Shutdown, StepOutput, TokenOutput, WorkerFailed,
                                   WorkerReady, encoder, from_worker_decoder)
from flotilla.launch.mp import MpLauncher
from flotilla.launch.topology import replica_group
from flotilla.launch.worker_args import WorkerArgs
from flotilla.sampling import SamplingParams


class WorkerHarness:
    """One replica group (``pp_size`` stages of ``tp_size`` ranks each) of the tiny model, on CPU."""

    def __init__(self, pp_size: int = 1, tp_size: int = 1, start_timeout: float = 120.0, **config):
        self.path = tiny("llama")
        self.cfg = EngineConfig.from_kwargs(self.path, device="cpu", dtype="float32", pp_size=pp_size,
                                            tp_size=tp_size, **config).resolve()
        self.dir = tempfile.mkdtemp(prefix="flotilla-test-")
        self.hub = ChannelHub()
        self.out, out_addr = self.hub.bind("pull", "out", from_worker_decoder)
        self.req, in_addr = self.hub.bind("push", "in0")
        self.launcher = MpLauncher(self.cfg, self.dir)
        self.spec = replica_group(0, 0, tp_size, 0, pp_size)
        ranks = [WorkerArgs(config=self.cfg.to_dict(), replica_id=0, rank=r, world_size=self.spec.world_size,
                            dist_init_method=None, in_addr=in_addr if r == 0 else "", out_addr=out_addr,
                            num_threads=1)
                 for r in range(self.spec.world_size)]
        self.seen: list = []  # every message received, in order
        try:
            self.launcher.start_group(self.spec, ranks)
            self.ready = self.wait_for(lambda m: isinstance(m, WorkerReady), start_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return self.launcher.pids(self.spec.group_id)

    def alive(self) -> bool:
        return not self.launcher.dead_groups()

    def recv(self, timeout: float) -> list:
        msgs = self.out.recv_many(int(timeout * 1000))
        for m in msgs:
            if isinstance(m, WorkerFailed):
                raise AssertionError(f"worker failed: {m.message}")
        self.seen.extend(msgs)
        return msgs

    def wait_for(self, cond, timeout: float = 60.0):
        """The first message (from now on) for which ``cond`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.recv(0.2):
                if cond(m):
                    return m
            assert self.alive(), f"worker group died: {self.launcher.dead_groups()}"
        raise AssertionError("timed out waiting for a message")

    def add(self, rid: str, prompt_ids: list[int], sampling: SamplingParams) -> None:
        self.req.send(AddRequest(rid, prompt_ids, sampling))

    def send_raw(self, frame: bytes) -> None:
        """A frame as a buggy front end might send it, bypassing every check of ours."""
        self.req.socket.send(frame)

    def send_unchecked(self, msg) -> None:
        self.send_raw(encoder.encode(msg))

    def run(self, rid: str, timeout: float = 60.0) -> TokenOutput:
        """Collect ``rid``'s outputs (those already received included) until it finishes; returns one
        TokenOutput with all its tokens."""
        tokens: list[int] = []
        deadline = time.monotonic() + timeout
        batch = list(self.seen)
        while time.monotonic() < deadline:
            for m in batch:
                if isinstance(m, StepOutput):
                    for o in m.outputs:
                        if o.rid == rid:
                            tokens.extend(o.token_ids)
                            if o.finished:
                                o.token_ids = tokens
                                return o
            assert self.alive(), f"worker group died: {self.launcher.dead_groups()}"
            batch = self.recv(0.2)
        raise AssertionError(f"request {rid} did not finish")

    def heartbeats(self) -> list[Heartbeat]:
        return [m for m in self.seen if isinstance(m, Heartbeat)]

    def close(self) -> None:
        try:
            if self.alive():
                self.req.send(Shutdown(), timeout_ms=500)
        except Exception:
            pass
        self.launcher.shutdown(timeout=10)
        self.hub.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> WorkerHarness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.mark.timeout(180)
def test_harness_serves_and_shuts_down_cleanly():
    from conftest import hf_greedy

    with WorkerHarness() as h:
        assert h.ready.pid in h.pids
        h.add("a", [1, 2, 3, 4], SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True))
        out = h.run("a")
        assert out.finish_reason == "length" and out.token_ids == hf_greedy(h.path, [1, 2, 3, 4], 5)
        h.req.send(Shutdown())
        procs = h.launcher._groups[0]
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0]
