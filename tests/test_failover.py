"""No request lost when a replica dies; DP that grows and shrinks while serving (both launchers)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, SamplingParams

N = 40
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)
OPTS = dict(device="cpu", dtype="float32")
PROMPTS12 = [f"{p} {i}" for i, p in enumerate(PROMPTS * 3)]


def expected(path, prompts, n=N):
    return [hf_greedy(path, hf_tokenize(path, p), n) for p in prompts]


def _kill_group(engine, replica_index: int) -> list[int]:
    pids = engine.stats()["replicas"][replica_index]["pids"]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def _wait_until(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _start_streams(engine, prompts, sp) -> tuple[dict[int, list], list[threading.Thread]]:
    """One streaming consumer thread per prompt; returns once some stream has tokens (so a kill lands
    mid-run). out[i] becomes prompt i's list of deltas when its thread ends."""
    out: dict[int, list] = {}
    started = threading.Event()

    def run(i, p):
        deltas = []
        for d in engine.stream(p, sp):
            deltas.append(d)
            if len(deltas) == 2:
                started.set()
        out[i] = deltas
    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    assert started.wait(60)
    return out, threads


def _streamed_tokens(out: dict[int, list]) -> list[list[int]]:
    """Every token each stream saw, in order (a duplicate or a gap would show here)."""
    return [[tok for d in out[i] for tok in d["token_ids"]] for i in range(len(out))]


def test_kill_one_replica_mid_run_loses_nothing():
    path = tiny("llama")
    with Engine(model=path, dp_size=2, **OPTS) as engine:
        out, threads = _start_streams(engine, PROMPTS12, GREEDY)
        killed = _kill_group(engine, 0)
        for t in threads:
            t.join(120)
        assert _streamed_tokens(out) == expected(path, PROMPTS12)  # each token once: no duplicate, none missing
        for i in range(len(PROMPTS12)):
            assert out[i][-1]["finish_reason"] == "length"
            assert "".join(d["text"] for d in out[i]) == out[i][-1]["result"]["text"]
        _wait_until(lambda: engine.healthy())
        stats = engine.stats()
        assert stats["replica_restarts"] == 1
        live = [r for r in stats["replicas"] if r["alive"]]
        assert len(live) == 2 and not set(killed) & {p for r in live for p in r["pids"]}
        # the restarted replica serves correctly
        outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True),
                               use_tqdm=False)
        assert [o["token_ids"] for o in outs] == expected(path, PROMPTS, 8)


def test_kill_the_only_replica_requests_wait_for_its_restart():
    path = tiny("llama")
    with Engine(model=path, dp_size=1, **OPTS) as engine:
        out, threads = _start_streams(engine, PROMPTS, GREEDY)
        _kill_group(engine, 0)
        time.sleep(0.3)
        late = engine.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]  # submitted while it is down
        for t in threads:
            t.join(120)
        assert _streamed_tokens(out) == expected(path, PROMPTS)
        assert late["token_ids"] == expected(path, PROMPTS[:1])[0]


def test_kill_both_replicas_at_once_loses_nothing():
    """A node loss: both replicas SIGKILLed together. Nothing is sent to the second dead one, the engine loop
    lives on, requests wait for the restarts and finish with the undisturbed tokens, and health comes back."""
    path = tiny("llama")
    with Engine(model=path, dp_size=2, **OPTS) as engine:
        out, threads = _start_streams(engine, PROMPTS12, GREEDY)
        pids = [p for r in engine.stats()["replicas"] for p in r["pids"]]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads)
        assert _streamed_tokens(out) == expected(path, PROMPTS12)
        _wait_until(lambda: engine.healthy(), timeout=120)
        stats = engine.stats()
        assert stats["replica_restarts"] == 2 and stats["engine_loop_alive"]
        assert engine.generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0]["token_ids"] == expected(path, PROMPTS[1:2])[0]


def test_a_slow_step_is_not_a_death_but_a_stopped_leader_is(monkeypatch):
    """Liveness comes from the leader's heartbeat thread: a step three times the timeout long keeps it beating;
    a SIGSTOPped leader (every thread stopped) falls silent and is restarted."""
    path = tiny("llama")
    monkeypatch.setenv("FLOTILLA_FAULT_SLOW_STEP_S", "6")
    monkeypatch.setenv("FLOTILLA_FAULT_STEP", "2")
    sp = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    with Engine(model=path, dp_size=1, heartbeat_timeout_s=2.0, **OPTS) as engine:
        out = engine.generate([PROMPTS[0]], sp, use_tqdm=False)[0]  # its second step sleeps 6 s
        assert out["token_ids"] == expected(path, PROMPTS[:1], 8)[0]
        stats = engine.stats()
        assert stats["replica_restarts"] == 0 and engine.healthy()
        (pid,) = stats["replicas"][0]["pids"]
        os.kill(pid, signal.SIGSTOP)
        try:
            _wait_until(lambda: engine.stats()["replica_restarts"] == 1, timeout=60)
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_until(lambda: engine.healthy(), timeout=120)
        assert engine.generate([PROMPTS[1]], sp, use_tqdm=False)[0]["token_ids"] == expected(path, PROMPTS[1:2], 8)[0]


def test_seeded_sampling_survives_failover():
    path = tiny("llama")
    sp = SamplingParams(max_new_tokens=N, temperature=0.9, top_k=40, seed=5, ignore_eos=True)
    with Engine(model=path, dp_size=2, **OPTS) as engine:
        undisturbed = engine.generate(PROMPTS, sp, use_tqdm=False)
        out, threads = _start_streams(engine, PROMPTS, sp)
        _kill_group(engine, 1)
        for t in threads:
            t.join(120)
    assert _streamed_tokens(out) == [o["token_ids"] for o in undisturbed]


def test_scale_up_and_down_while_serving():
    path = tiny("llama")
    sp = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    want = dict(zip(PROMPTS, expected(path, PROMPTS, 24)))
    with Engine(model=path, dp_size=1, load_balance="least_tokens", **OPTS) as engine:
        results: list[tuple[str, list[int]]] = []
        stop = threading.Event()

        def client():
            i = 0
            while not stop.is_set():
                p = PROMPTS[i % len(PROMPTS)]
                results.append((p, engine.generate([p], sp, use_tqdm=False)[0]["token_ids"]))
                i += 1
        clients = [threading.Thread(target=client) for _ in range(3)]
        for c in clients:
            c.start()
        time.sleep(1.0)
        engine.scale(3)
        assert len([r for r in engine.stats()["replicas"] if r["alive"]]) == 3
        n_at_3 = len(results)
        time.sleep(2.0)
        engine.scale(1)
        assert len(engine.stats()["replicas"]) == 1
        time.sleep(1.0)
        stop.set()
        for c in clients:
            c.join(60)
        assert len(results) > n_at_3
        for p, toks in results:
            assert toks == want[p]
    with pytest.raises(ValueError, match="dp_size"):
        Engine.scale(engine, 0)


def test_ray_kill_replica_and_scale():
    ray = pytest.importorskip("ray")
    from flotilla.frontend.ray_engine import RayEngine

    path = tiny("llama")
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        with RayEngine(model=path, dp_size=2, **OPTS) as engine:
            out, threads = _start_streams(engine, PROMPTS12, GREEDY)
            gid = engine.stats()["replicas"][0]["group"]
            for actor in engine._launcher._groups[gid]["actors"]:
                ray.kill(actor)
            for t in threads:
                t.join(180)
            assert _streamed_tokens(out) == expected(path, PROMPTS12)
            _wait_until(lambda: engine.healthy(), 120)
            engine.scale(3)  # needs a new placement group: the first one holds two ranks
            outs = engine.generate(PROMPTS12, GREEDY, use_tqdm=False)
            assert [o["token_ids"] for o in outs] == expected(path, PROMPTS12)
            assert sum(1 for r in engine.stats()["replicas"] if r["num_steps"] > 0) == 3
            engine.scale(1)
            assert len(engine._launcher._extra_pgs) == 1
    finally:
        ray.shutdown()
