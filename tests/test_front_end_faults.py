"""Bad input and bad frames at the front end: clear errors naming the field, and an engine that serves on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import zmq

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, RequestFailed, SamplingParams

OPTS = dict(device="cpu", dtype="float32")
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_dp1_engine):
    yield llama_dp1_engine  # Engine(tiny llama, cpu, float32), shared by the session (tests/conftest.py)


def _expected(prompt: str, n: int = 6) -> list[int]:
    path = tiny("llama")
    return hf_greedy(path, hf_tokenize(path, prompt), n)


def test_request_id_must_be_a_non_empty_string(engine):
    for bad in (123, "", b"x"):
        with pytest.raises(ValueError, match="request_id"):
            next(engine.stream(PROMPTS[0], GREEDY, request_id=bad))


def test_duplicate_request_id_in_flight_is_refused_and_the_first_completes(engine):
    slow = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    first = engine.stream(PROMPTS[0], slow, request_id="dup")
    got = [next(first)]
    with pytest.raises(ValueError, match="already in flight"):
        next(engine.stream(PROMPTS[1], GREEDY, request_id="dup"))
    got += list(first)
    assert got[-1]["finished"] and got[-1]["result"]["completion_tokens"] == 40
    # once finished, the id is free again
    again = list(engine.stream(PROMPTS[0], GREEDY, request_id="dup"))
    assert again[-1]["result"]["token_ids"] == _expected(PROMPTS[0])


def test_sampling_params_changed_after_construction_are_checked_at_submit(engine):
    sp = SamplingParams(max_new_tokens=4)
    sp.max_new_tokens = -5
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([PROMPTS[0]], sp, use_tqdm=False)
    sp = SamplingParams()
    sp.temperature = "hot"
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([PROMPTS[0]], sp, use_tqdm=False)
    # a request in flight keeps the parameters it was submitted with
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    it = engine.stream(PROMPTS[0], sp)
    first = next(it)
    sp.max_new_tokens = 1000
    rest = list(it)
    assert (first["token_ids"] + [t for d in rest for t in d["token_ids"]]) == _expected(PROMPTS[0])


def test_lone_surrogate_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="prompt: not valid Unicode"):
        engine.generate(["bad \ud800 text"], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="input_ids"):
        engine.generate(input_ids=[[1, -1]], sampling_params=GREEDY, use_tqdm=False)


def test_garbage_on_the_output_socket_does_not_stop_the_engine(engine):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(engine._out_addr)
    for frame in (b"\xff\x00garbage", b"", b"\x93\x01\x02\x03", b"\x81\xa4type\xa9StepOutput"):
        sock.send(frame)
    sock.close(linger=1000)
    time.sleep(0.5)
    assert engine.healthy() and engine.stats()["engine_loop_alive"]
    out = engine.generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0]
    assert out["token_ids"] == _expected(PROMPTS[1])


def test_a_stuck_engine_loop_shows_in_health(engine, monkeypatch):
    import flotilla.frontend.engine as engine_mod

    release = threading.Event()
    real = engine.fleet.check

    def stuck():
        release.wait(30)
        return real()

    monkeypatch.setattr(engine_mod, "LOOP_STALL_S", 0.5)
    monkeypatch.setattr(engine.fleet, "check", stuck)
    try:
        deadline = time.monotonic() + 10
        while engine.healthy() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not engine.healthy() and not engine.stats()["engine_loop_alive"]
    finally:
        release.set()
        monkeypatch.setattr(engine.fleet, "check", real)
    deadline = time.monotonic() + 10
    while not engine.healthy() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.healthy()


def test_the_front_end_does_not_import_worker_or_model_code():
    code = ("import sys, flotilla.frontend.engine, flotilla.frontend.ray_engine\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('flotilla.worker', 'flotilla.model')))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_script_without_the_main_guard_gets_an_error_that_says_so(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(f"""
        from flotilla import Engine
        engine = Engine(model={tiny('llama')!r}, device="cpu", dtype="float32", worker_start_timeout=60)
        engine.shutdown()
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode != 0
    assert 'if __name__ == "__main__":' in r.stderr


def test_engine_after_shutdown_refuses_clearly():
    e = Engine(model=tiny("llama"), **OPTS)
    e.shutdown()
    with pytest.raises(RequestFailed, match="shut down"):
        e.generate([PROMPTS[0]], GREEDY, use_tqdm=False)
