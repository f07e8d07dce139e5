"""Issue 29's control-call and edge faults on one real engine (tiny model, CPU): a bad pause changes nothing,
a failed pause cannot leave the front end and the controller disagreeing, a weight-sync join with an
unreachable master fails within its connect time-out while generation goes on (and /health names it), a
request that cannot be encoded fails alone at once, and bad paths or sizes are clear errors."""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from flotilla import Engine, SamplingParams
from flotilla.server import build_app

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_dp1_engine):
    yield llama_dp1_engine  # Engine(tiny llama, cpu, float32), shared by the session (tests/conftest.py)


def _serves(engine: Engine) -> None:
    out = engine.generate("Hello", GREEDY, use_tqdm=False)
    assert len(out[0]["token_ids"]) == 4


def _agree_not_paused(engine: Engine) -> None:
    assert engine.stats()["paused"] is False and engine.dispatcher.paused is False and not engine.dispatcher.held()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pause_with_a_bogus_argument_changes_nothing(engine: Engine) -> None:
    with pytest.raises(ValueError, match=r"^timeout: .*pause_generation\(mode\) with mode one of \['abort'"):
        engine.pause("bogus")
    with pytest.raises(ValueError, match=r"^mode: must be one of \['abort', 'retract', 'in_place'\]"):
        engine.pause_generation("bogus")
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError, match=r"^timeout: "):
            engine.pause(bad)
    _agree_not_paused(engine)
    _serves(engine)
    engine.pause()  # and a good one still works both ways
    assert engine.stats()["paused"] and engine.dispatcher.paused
    engine.resume()
    _agree_not_paused(engine)
    _serves(engine)


def test_a_pause_whose_rollback_fails_too_still_agrees(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("the replicas did not answer")

    monkeypatch.setattr(engine.control, "_control", broken)
    with pytest.raises(RuntimeError, match="did not answer"):
        engine.pause()
    monkeypatch.undo()
    _agree_not_paused(engine)
    _serves(engine)


def test_join_with_an_unreachable_master_fails_fast_while_generation_goes_on(engine: Engine) -> None:
    port = _closed_port()
    box: dict[str, BaseException] = {}

    def join() -> None:
        try:
            engine.init_weights_update_group("127.0.0.1", port, 1, 2, "edge", "gloo", connect_timeout_s=3.0)
        except BaseException as e:  # noqa: BLE001 - checked below
            box["error"] = e

    t0 = time.monotonic()
    th = threading.Thread(target=join, daemon=True)
    th.start()
    with TestClient(build_app(engine, "m")) as tc:
        deadline = time.monotonic() + 2
        while engine.stats()["control_op"] is None and time.monotonic() < deadline:
            time.sleep(0.01)
        health = tc.get("/health")
        assert health.status_code == 200
        op = health.json().get("control_op")
        assert op and op["name"] == "init_weights_update_group" and op["on_ranks"] is False, health.json()
        assert health.json()["status"] == "ok"  # the ranks are not in it: they keep stepping
        _serves(engine)  # while the join waits for the store
        assert th.is_alive(), "generation should have finished while the join was still pending"
    th.join(30)
    elapsed = time.monotonic() - t0
    err = box.get("error")
    assert isinstance(err, RuntimeError) and "master_address" in str(err) and f"127.0.0.1:{port}" in str(err), err
    assert elapsed < 10, elapsed
    assert engine.control.weights.groups.groups == {} and engine.stats()["control_op"] is None
    _serves(engine)


def test_a_request_that_cannot_be_encoded_fails_alone_at_once(engine: Engine) -> None:
    state = engine.inputs.make_state("Hello", None, GREEDY)
    state.sampling.top_k = 2**64  # after validation: only the encoder can tell
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"^request: cannot be sent"):
        engine._submit(state)
    assert time.monotonic() - t0 < 2.0
    assert state.rid not in engine.dispatcher.requests and state.finished
    assert engine.healthy()
    _serves(engine)


def test_python_edge_errors_name_the_field(engine: Engine) -> None:
    with pytest.raises(ValueError, match=r"^prompts: must be a str or a list of str"):
        engine.generate(12345, use_tqdm=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^stop: must be a str or a list of str"):
        engine.generate("Hi", {"stop": 5}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"^stop_token_ids: token id \d+ is outside the vocabulary"):
        engine.generate("Hi", {"stop_token_ids": [engine.vocab_size]}, use_tqdm=False)
    with pytest.raises(ValueError, match=rf"^prompt: the prompt has \d+ tokens, and max_model_len is "
                                         rf"{engine.max_model_len}"):
        engine.generate("hello " * engine.max_model_len, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"^top_k: "):
        engine.generate("Hi", {"top_k": 2**64}, use_tqdm=False)


def test_scale_is_bounded_before_anything_changes(engine: Engine) -> None:
    before = engine.stats()["dp_size"]
    for dp, drain in ((10**6, 1.0), (1, math.nan), (1, -5.0), (True, 1.0)):
        with pytest.raises(ValueError, match=r"^(dp_size|drain_timeout_s): "):
            engine.scale(dp, drain)
    assert engine.stats()["dp_size"] == before


def test_update_from_a_non_safetensors_file_is_a_clear_400(engine: Engine, tmp_path) -> None:
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"\x80\x04 not a safetensors file at all")
    with pytest.raises(ValueError, match=r"^path: .*is not a readable safetensors file"):
        engine.update_weights_from_disk(str(bogus))
    with pytest.raises(ValueError, match=r"^path: no \*\.safetensors files"):
        engine.update_weights_from_disk(str(tmp_path))
    with TestClient(build_app(engine, "m")) as tc:
        r = tc.post("/update_weights_from_disk", json={"model_path": str(bogus)})
        assert r.status_code == 400 and r.json()["success"] is False
        assert "not a readable safetensors file" in r.json()["message"]
    assert engine.stats()["weight_version"] == 0
    _agree_not_paused(engine)
    _serves(engine)
