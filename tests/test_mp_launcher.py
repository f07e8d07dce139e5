"""The mp launcher's start method: ranks fork from a fork server that has the heavy imports done, yet behave
as spawned ranks would: the front end's environment at launch, the same greedy tokens, the same parent-death
rule (tests/test_front_end_faults.py covers a killed front end)."""

from __future__ import annotations

import asyncio
import os

import psutil

from conftest import tiny
from flotilla import Engine, RequestFailed, SamplingParams
from flotilla.launch import mp as mp_launch
from flotilla.worker import faults

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
OPTS = dict(device="cpu", dtype="float32")


def test_start_method_is_the_fork_server_on_linux_unless_told(monkeypatch):
    monkeypatch.delenv("FLOTILLA_START_METHOD", raising=False)
    assert mp_launch.start_method() == "forkserver"  # CI and every supported GPU host run Linux
    monkeypatch.setenv("FLOTILLA_START_METHOD", "spawn")
    assert mp_launch.start_method() == "spawn"
    monkeypatch.setenv("FLOTILLA_START_METHOD", "bogus")  # anything else: the platform's choice
    assert mp_launch.start_method() == "forkserver"


def _pids(engine):
    return [pid for r in engine.stats()["replicas"] for pid in r["pids"]]


def test_forked_ranks_take_the_environment_of_the_launch_not_of_the_fork_server(monkeypatch):
    path = tiny("llama")
    with Engine(model=path, **OPTS) as first:  # the fork server is up by now, with this environment
        want = first.generate(["Hello there"], GREEDY, use_tqdm=False)[0]["token_ids"]
        (pid,) = _pids(first)
        assert psutil.Process(pid).ppid() != os.getpid()  # a fork of the server, not a child of ours
    monkeypatch.setenv(faults.BAD_SAMPLING_RID, "poisoned")  # set after the fork server started
    with Engine(model=path, **OPTS) as engine:
        async def run():
            bad = engine.generate_async("Hello there", GREEDY, request_id="poisoned")
            good = engine.generate_async("Hello there", GREEDY, request_id="fine")
            return await asyncio.gather(bad, good, return_exceptions=True)

        bad, good = asyncio.run(run())
    assert isinstance(bad, RequestFailed) and "sampling failed" in str(bad)
    assert good["token_ids"] == want


def test_spawned_ranks_give_the_same_tokens(monkeypatch):
    path = tiny("llama")
    prompts = ["Hello there", "The capital of France is"]
    with Engine(model=path, **OPTS) as engine:
        forked = [o["token_ids"] for o in engine.generate(prompts, GREEDY, use_tqdm=False)]
    monkeypatch.setenv("FLOTILLA_START_METHOD", "spawn")
    with Engine(model=path, **OPTS) as engine:
        (pid,) = _pids(engine)
        assert psutil.Process(pid).ppid() == os.getpid()
        spawned = [o["token_ids"] for o in engine.generate(prompts, GREEDY, use_tqdm=False)]
    assert forked == spawned
