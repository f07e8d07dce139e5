"""Faults the way clusters produce them, end to end on CPU (tiny model, mp launcher): rolling deaths across
replicas, a request that really kills its replica, and a leader that hangs inside a step.

Every stream that did not cause a fault completes exactly (greedy: the same tokens as with no fault, each
once); the poison request fails alone with a clear error after a bounded number of deaths.
"""

from __future__ import annotations

import os
import signal
import threading
import time


from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, SamplingParams
from flotilla.frontend.request import RequestFailed
from flotilla.worker import faults

N = 32
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)
OPTS = dict(device="cpu", dtype="float32", restart_backoff_s=0.1, restart_backoff_max_s=1.0)


def expected(path, prompts, n=N):
    return [hf_greedy(path, hf_tokenize(path, p), n) for p in prompts]


def _streams(engine, prompts, rids=None):
    """One consumer thread per prompt: out[i] = its tokens, or the exception that ended it."""
    out: dict[int, object] = {}
    started = threading.Event()

    def run(i, p):
        toks = []
        try:
            for d in engine.stream(p, GREEDY, request_id=rids[i] if rids else None):
                toks.extend(d["token_ids"])
                if toks:
                    started.set()
            out[i] = toks
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out[i] = e
    threads = [threading.Thread(target=run, args=(i, p), daemon=True) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    return out, threads, started


def _kill_busy(engine, killed: set[int]) -> None:
    """SIGKILL the group of an alive replica that has requests (any alive one if none has)."""
    reps = [r for r in engine.stats()["replicas"] if r["alive"] and r["pids"] and not set(r["pids"]) & killed]
    reps.sort(key=lambda r: -(r["running"] + r["waiting"]))
    for pid in reps[0]["pids"]:
        killed.add(pid)
        os.kill(pid, signal.SIGKILL)


def test_rolling_deaths_across_three_replicas_complete_every_stream_exactly():
    path = tiny("llama")
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 2)]
    with Engine(model=path, dp_size=3, **OPTS) as engine:
        out, threads, started = _streams(engine, prompts)
        assert started.wait(60)
        killed: set[int] = set()
        for _ in range(3):  # three deaths within a few seconds, each of a replica that took the others' work
            _kill_busy(engine, killed)
            time.sleep(1.5)
        for t in threads:
            t.join(180)
        assert [out[i] for i in range(len(prompts))] == expected(path, prompts)
        assert engine.stats()["replica_restarts"] >= 3


def test_a_request_that_kills_its_replica_fails_alone(monkeypatch):
    path = tiny("llama")
    monkeypatch.setenv(faults.CRASH_RID, "poison")
    prompts = list(PROMPTS[:3]) + [PROMPTS[3]]
    rids = ["g0", "g1", "g2", "poison"]
    with Engine(model=path, dp_size=2, **OPTS) as engine:
        out, threads, _ = _streams(engine, prompts, rids)
        for t in threads:
            t.join(180)
        err = out[3]
        assert isinstance(err, RequestFailed), err
        assert "running alone" in str(err) and "kills replicas" in str(err)
        assert [out[i] for i in range(3)] == expected(path, prompts[:3])
        assert engine.stats()["replica_restarts"] <= 3  # bounded: two deaths with others, one alone


def test_a_leader_hung_in_a_step_is_declared_dead_and_its_streams_continue(monkeypatch):
    path = tiny("llama")
    monkeypatch.setenv(faults.SLOW_STEP_S, "3600")  # hangs; its heartbeat thread goes on
    monkeypatch.setenv(faults.STEP, "3")
    monkeypatch.setenv(faults.REPLICA, "0")
    prompts = list(PROMPTS[:4])
    with Engine(model=path, dp_size=2, step_timeout_s=4.0, **OPTS) as engine:
        out, threads, _ = _streams(engine, prompts)
        for t in threads:
            t.join(120)
        assert [out[i] for i in range(len(prompts))] == expected(path, prompts)
        reasons = [r.get("down_reason") for r in engine.stats()["replicas"]]
        assert engine.stats()["replica_restarts"] == 1, reasons
