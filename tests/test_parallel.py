"""Multi-process runtime: every parallel layout gives transformers' greedy tokens; sockets, aborts,
worker death and shutdown behave."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, RequestFailed, SamplingParams

N = 24
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)
OPTS = dict(device="cpu", dtype="float32")


def expected(path):
    return [hf_greedy(path, hf_tokenize(path, p), N) for p in PROMPTS]


@pytest.mark.parametrize("arch,overrides,layout", [
    ("llama", {}, dict(tp_size=2)),
    ("llama", {}, dict(dp_size=2, load_balance="shortest_queue")),
    ("qwen2", {}, dict(tp_size=2, dp_size=2, load_balance="least_tokens")),
    # fewer KV heads than TP ranks: the KV head is replicated
    ("qwen3", {"num_key_value_heads": 1}, dict(tp_size=2, dp_size=2, load_balance="prefix_aware")),
    ("llama", {}, dict(tp_size=2, dp_size=2, enable_dp_attention=True)),
])
def test_layouts_match_transformers(arch, overrides, layout):
    path = tiny(arch, **overrides)
    with Engine(model=path, **OPTS, **layout) as engine:
        outs = engine.generate(PROMPTS * 2, GREEDY, use_tqdm=False)
        stats = engine.stats()
    assert [o["token_ids"] for o in outs] == expected(path) * 2
    targets = layout.get("dp_size", 1)
    assert len(stats["replicas"]) == targets
    if targets > 1:  # both replicas served
        assert all(r["num_steps"] > 0 for r in stats["replicas"])
    ranks = layout.get("tp_size", 1) * (1 if layout.get("enable_dp_attention") else targets)
    assert len({pid for r in stats["replicas"] for pid in r["pids"]}) == ranks


@pytest.fixture(scope="module")
def dp_engine(llama_dp2_engine):
    yield llama_dp2_engine  # Engine(tiny llama, dp_size=2, cpu, float32), shared by the session (tests/conftest.py)


def _listening(pids):
    found = []
    for pid in pids:
        for c in psutil.Process(pid).net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                found.append((pid, c.laddr.ip, c.laddr.port))
    return found


def test_no_socket_listens_on_a_wildcard():
    # tp=2 so gloo opens its pair sockets too
    with Engine(model=tiny("llama"), tp_size=2, dp_size=2, **OPTS) as engine:
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2, ignore_eos=True), use_tqdm=False)  # sockets open
        pids = [os.getpid()] + [p for r in engine.stats()["replicas"] for p in r["pids"]]
        listening = _listening(pids)
        assert all(ip not in ("0.0.0.0", "::") for _, ip, _ in listening), listening
        # on one node the front end's sockets are ipc:// files in a private 0700 directory
        ipc_dir = engine._hub.ipc_dir
        assert ipc_dir and os.stat(ipc_dir).st_mode & 0o777 == 0o700
    assert not os.path.exists(ipc_dir)


def test_abort_reaches_the_owning_replica(dp_engine):
    deltas = []
    stream = dp_engine.stream("Hello", SamplingParams(max_new_tokens=900, temperature=0.0, ignore_eos=True))
    for d in stream:
        deltas.append(d)
        if len(deltas) == 3:
            assert dp_engine.abort(d["request_id"])
        if d["finished"]:
            break
    assert deltas[-1]["finish_reason"] == "abort"
    assert deltas[-1]["result"]["completion_tokens"] < 900
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        reps = dp_engine.stats()["replicas"]
        if all(r["running"] == 0 and r["waiting"] == 0 for r in reps):
            break
        time.sleep(0.1)
    assert all(r["running"] == 0 and r["waiting"] == 0 for r in dp_engine.stats()["replicas"])
    assert dp_engine.abort("no-such-request") is False


def test_closing_a_stream_aborts(dp_engine):
    stream = dp_engine.stream("Hello", SamplingParams(max_new_tokens=900, temperature=0.0, ignore_eos=True))
    next(stream)
    stream.close()
    assert dp_engine.stats()["num_requests_inflight"] <= 1
    deadline = time.monotonic() + 5
    while dp_engine.stats()["num_requests_inflight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dp_engine.stats()["num_requests_inflight"] == 0


def test_async_generate_and_stream(dp_engine):
    import asyncio

    async def main():
        sp = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
        results = await asyncio.gather(*(dp_engine.generate_async(p, sp) for p in PROMPTS))
        chunks = [d async for d in dp_engine.stream_async(PROMPTS[0], sp)]
        return results, chunks

    results, chunks = asyncio.run(main())
    path = tiny("llama")
    assert [r["token_ids"] for r in results] == [hf_greedy(path, hf_tokenize(path, p), 8) for p in PROMPTS]
    assert [t for c in chunks for t in c["token_ids"]] == results[0]["token_ids"]


def test_stats_shape(dp_engine):
    stats = dp_engine.stats()
    for r in stats["replicas"]:
        for key in ("id", "pids", "alive", "running", "waiting", "kv_used", "cached_tokens"):
            assert key in r
        assert r["alive"] and all(psutil.pid_exists(p) for p in r["pids"])


def test_killed_worker_fails_requests_within_seconds_and_shutdown_cleans_up():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = Engine(model=tiny("llama"), tp_size=2, max_replica_restarts=0, **OPTS)  # no failover to hide it
    pids = engine.stats()["replicas"][0]["pids"]
    stream = engine.stream("Hello", SamplingParams(max_new_tokens=900, temperature=0.0, ignore_eos=True))
    next(stream)
    os.kill(pids[1], signal.SIGKILL)  # a TP peer, not the leader: the whole replica must be noticed
    t0 = time.monotonic()
    with pytest.raises(RequestFailed, match="died"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 10
    assert not engine.stats()["replicas"][0]["alive"]
    with pytest.raises(RequestFailed):
        engine.generate(["Hello"], GREEDY, use_tqdm=False)
    engine.shutdown()
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left
