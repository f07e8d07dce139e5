"""The engine's outward contract, typed and visible (issue 26), without starting a process: every public
``Engine`` method written out in engine.py, ``stats()`` a struct whose ``to_dict()`` is the dict callers read,
``n`` on the engine's stream (choice i seeded with seed + i, one affinity, indexed deltas), and the typed
invalid-parameter error that the server maps to a 400 by type."""

from __future__ import annotations

import asyncio
import inspect
import pathlib
import pickle
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from flotilla.frontend.engine import Engine
from flotilla.errors import InvalidParameter, type_name
from flotilla.frontend.inputs import InputProcessor
from flotilla.ipc.messages import TokenOutput
from flotilla.frontend.ray_engine import RayEngine
from flotilla.frontend.request import wake_all
from flotilla.sampling import SamplingParams
from flotilla.server import build_app
from flotilla.server.errors import from_value_error
from flotilla.frontend.stats import DownStats, EngineStats, PipelineStats, ReplicaStats

# ============================================================================================ methods in engine.py

CONTROL = ["weight_version", "paused", "pause", "resume", "update_weights", "update_weights_from_disk",
           "release_memory", "resume_memory"]
RL = ["init_weights_update_group", "destroy_weights_update_group", "weight_sync_ranks",
      "update_weights_from_distributed", "check_weights_update", "update_weights_from_tensor", "pause_generation",
      "continue_generation", "abort_request", "release_memory_occupation", "resume_memory_occupation",
      "get_weight_version"]


def test_every_public_engine_method_is_written_out_in_engine_py() -> None:
    public = [n for n in dir(Engine) if not n.startswith("_")]
    assert set(CONTROL + RL) <= set(public)
    for name in public:
        assert name in Engine.__dict__, name  # declared in the class body, not attached or inherited
        member = Engine.__dict__[name]
        func = member.fget if isinstance(member, property) else member
        assert inspect.getsourcefile(func).endswith("flotilla/frontend/engine.py"), name
        assert func.__doc__ or name in ("generate", "stream", "flush_cache", "shutdown"), name
    for name in (n for n in dir(RayEngine) if not n.startswith("_")):
        assert name in RayEngine.__dict__ or name in Engine.__dict__, name
    package = pathlib.Path(inspect.getsourcefile(Engine)).parent
    assert not (package / "delegation.py").exists()
    for module in ("engine.py", "ray_engine.py"):
        source = (package / module).read_text()
        assert "setattr(" not in source and "delegat" not in source, module


def test_the_forwarders_keep_the_targets_signatures() -> None:
    from flotilla.frontend.control import ControlPlane
    from flotilla.rl.api import RLControl

    for names, target in ((CONTROL, ControlPlane), (RL, RLControl)):
        for name in names:
            mine, theirs = Engine.__dict__[name], getattr(target, name)
            if isinstance(mine, property):
                assert isinstance(theirs, property)
                continue
            assert inspect.signature(mine) == inspect.signature(theirs), name


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> str:
            self.calls.append((name, args, kwargs))
            return name
        return call


def test_the_forwarders_reach_their_owner() -> None:
    engine = Engine.__new__(Engine)
    engine.control, engine.rl = _Recorder(), _Recorder()
    assert engine.pause(5.0) is None and engine.control.calls[-1] == ("pause", (5.0,), {})
    assert engine.update_weights([("w", 1)], version=3) == "update_weights"
    assert engine.control.calls[-1] == ("update_weights", ([("w", 1)],),
                                        {"version": 3, "flush_cache": True, "timeout": 600.0})
    assert engine.abort_request("r1") == "abort_request" and engine.rl.calls[-1] == ("abort_request", ("r1", False), {})
    assert engine.get_weight_version() == "get_weight_version"


# ============================================================================================ stats()

UP_KEYS = ["id", "group", "state", "pids", "alive", "accepting", "running", "waiting", "kv_used", "cached_tokens",
           "outstanding_tokens", "num_steps", "num_preemptions", "num_overlapped_steps", "weight_version",
           "stage_forwards", "max_in_flight", "restarts"]
DOWN_KEYS = ["id", "group", "state", "pids", "alive", "accepting", "running", "waiting", "kv_used", "cached_tokens",
             "outstanding_tokens", "num_steps", "num_preemptions", "num_overlapped_steps", "weight_version",
             "down_reason", "restarting", "restarts"]
ENGINE_KEYS = ["replicas", "num_requests_inflight", "max_model_len", "load_balance", "dp_size", "replica_restarts",
               "weight_version", "paused", "control_op", "engine_loop_alive", "dropped_frames",
               "lora_adapters"]


def _stats() -> EngineStats:
    up = ReplicaStats(id=0, group=0, state="ready", pids=[11, 12], alive=True, accepting=True, running=2, waiting=1,
                      kv_used=0.5, cached_tokens=16, outstanding_tokens=40, num_steps=9, num_preemptions=1,
                      num_overlapped_steps=3, weight_version=2,
                      pipeline=PipelineStats(stage_forwards=[9, 9], max_in_flight=2), restarts=1)
    down = ReplicaStats(id=1, state="restarting", restarts=2, down=DownStats(down_reason="exit code -9",
                                                                              restarting=True))
    return EngineStats(replicas=[up, down], num_requests_inflight=3, max_model_len=128, load_balance="round_robin",
                       dp_size=2, replica_restarts=3, weight_version=2, paused=False, control_op=None,
                       engine_loop_alive=True, dropped_frames=0)


def test_stats_to_dict_has_todays_keys_and_values() -> None:
    d = _stats().to_dict()
    assert list(d) == ENGINE_KEYS
    up, down = d["replicas"]
    assert list(up) == UP_KEYS and list(down) == DOWN_KEYS
    assert up["stage_forwards"] == [9, 9] and up["pids"] == [11, 12] and up["weight_version"] == 2
    assert down == {"id": 1, "group": None, "state": "restarting", "pids": [], "alive": False, "accepting": False,
                    "running": 0, "waiting": 0, "kv_used": 0.0, "cached_tokens": 0, "outstanding_tokens": 0,
                    "num_steps": 0, "num_preemptions": 0, "num_overlapped_steps": 0, "weight_version": None,
                    "down_reason": "exit code -9", "restarting": True, "restarts": 2}
    assert type(d) is dict and all(type(r) is dict for r in d["replicas"])


def test_stats_struct_reads_as_its_dict() -> None:
    stats = _stats()
    assert stats.paused is False and stats.replicas[0].pipeline.max_in_flight == 2  # typed
    assert stats["paused"] is False and stats.get("dp_size") == 2 and "control_op" in stats  # and as the dict
    assert stats["replicas"][1]["down_reason"] == "exit code -9" and stats.replicas[1]["restarting"] is True
    assert dict(stats) == stats.to_dict() and stats == _stats()
    with pytest.raises(KeyError):
        stats["nope"]
    with pytest.raises(AttributeError):
        stats.paused = True  # type: ignore[misc]


def test_fleet_rows_are_replica_stats() -> None:
    import flotilla.router.fleet as fleet

    assert inspect.signature(fleet.ReplicaFleet.rows).return_annotation in ("list[ReplicaStats]", list[ReplicaStats])
    src = inspect.getsource(fleet.ReplicaFleet.rows)
    assert '"stage_forwards"' not in src and '"down_reason"' not in src  # the keys live in flotilla/frontend/stats.py


# ============================================================================================ InvalidParameter


def test_invalid_parameter_is_a_value_error_with_its_parts() -> None:
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(temperature=-1.0)
    err = info.value
    assert isinstance(err, ValueError) and err.field == "temperature" and str(err).startswith("temperature: ")
    assert str(err) == f"{err.field}: {err.message}" and type_name(err) == "ValueError"
    again = pickle.loads(pickle.dumps(InvalidParameter("mode", "bad", allowed=["a", "b"])))
    assert (again.field, again.message, again.allowed, str(again)) == ("mode", "bad", ["a", "b"], "mode: bad")


def test_invalid_parameter_maps_to_400_by_type() -> None:
    err = from_value_error(InvalidParameter("max_new_tokens", "must be >= 1, got 0"), {"max_new_tokens": "max_tokens"})
    assert (err.status, err.param, err.code) == (400, "max_tokens", "invalid_parameter")
    assert err.body() == {"error": {"message": "max_tokens: must be >= 1, got 0", "type": "invalid_request_error",
                                    "param": "max_tokens", "code": "invalid_parameter"}}
    plain = from_value_error(ValueError("looks: like a field"), {})  # no parsing: only the type names a field
    assert (plain.status, plain.param, plain.message) == (400, None, "looks: like a field")


class _RefusingEngine:
    max_model_len = 128

    def __init__(self, tokenizer: Any, error: Exception):
        self.tokenizer, self.error = tokenizer, error

    def stats(self) -> dict[str, Any]:
        return {"replicas": [{"id": 0, "alive": True, "running": 0, "waiting": 0}], "num_requests_inflight": 0}

    def scale(self, dp_size: int, drain_timeout_s: float = 60.0) -> None:
        raise self.error

    async def stream_async(self, prompt=None, sampling_params=None, *, input_ids=None, request_id=None, accepted=False):
        raise self.error
        yield  # pragma: no cover


@pytest.fixture(scope="module")
def tokenizer(llama_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_path)


def test_the_server_answers_invalid_parameter_with_400_and_its_param(tokenizer: Any) -> None:
    engine = _RefusingEngine(tokenizer, InvalidParameter("max_new_tokens", "must be <= 10, got 99"))
    with TestClient(build_app(engine, "m")) as tc:
        r = tc.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 99})
        assert r.status_code == 400
        assert r.json() == {"error": {"message": "max_tokens: must be <= 10, got 99", "type": "invalid_request_error",
                                      "param": "max_tokens", "code": "invalid_parameter"}}
        engine.error = InvalidParameter("dp_size", "must be an int in [1, 8], got 9")
        r = tc.post("/admin/scale", json={"dp_size": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "dp_size"


# ============================================================================================ n on the engine's stream


class _FakeFleet:
    """Takes submitted requests and answers each with two tokens (one step each), from a thread."""

    def __init__(self) -> None:
        self.submitted: list[Any] = []

    def submit(self, state: Any) -> None:
        self.submitted.append(state)
        if len(self.submitted) == self.expect:
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        for step in range(2):
            for s in self.submitted:
                s.apply(TokenOutput(s.rid, [5 + step], finished=step == 1, finish_reason="length" if step else None))
            wake_all(self.submitted)


class _FakeController:
    def __init__(self) -> None:
        self.admitted: list[str] = []

    def admit(self, state: Any) -> None:
        self.admitted.append(state.rid)

    def abort(self, rid: str) -> None:
        return None


class _FakeDispatcher:
    """The engine's one call down (``submit``): admit through the controller, then hand to the fleet."""

    def __init__(self, controller: _FakeController, fleet: _FakeFleet) -> None:
        self.controller, self.fleet = controller, fleet

    def submit(self, state: Any) -> None:
        self.controller.admit(state)
        self.fleet.submit(state)

    def abort(self, rid: str) -> None:
        return None


def _bare_engine(tokenizer: Any, expect: int) -> Engine:
    engine = Engine.__new__(Engine)
    engine._closed = False
    engine.stream_interval = 1
    engine.inputs = InputProcessor(tokenizer, len(tokenizer), 128)
    engine.controller, engine.fleet = _FakeController(), _FakeFleet()
    engine.fleet.expect = expect
    engine.dispatcher = _FakeDispatcher(engine.controller, engine.fleet)
    return engine


def test_n_on_the_engine_stream_seeds_each_choice_and_shares_one_affinity(tokenizer: Any) -> None:
    engine = _bare_engine(tokenizer, 3)

    async def run() -> list[dict[str, Any]]:
        sp = {"n": 3, "seed": 40, "max_new_tokens": 2}
        return [d async for d in engine.stream_async("Hello", sp, request_id="r")]

    deltas = asyncio.run(run())
    states = engine.fleet.submitted
    assert [s.rid for s in states] == ["r", "r-1", "r-2"] == engine.controller.admitted
    assert [s.sampling.seed for s in states] == [40, 41, 42]
    assert {s.affinity for s in states} == {"r"}
    assert all(s.prompt_ids == states[0].prompt_ids for s in states)
    finals = {d["index"]: d for d in deltas if d["finished"]}
    assert sorted(finals) == [0, 1, 2] and all("index" in d for d in deltas)
    assert [finals[i]["result"]["request_id"] for i in range(3)] == ["r", "r-1", "r-2"]
    assert sum(len(d["token_ids"]) for d in deltas) == 6


def test_one_choice_streams_as_before(tokenizer: Any) -> None:
    engine = _bare_engine(tokenizer, 1)

    async def run() -> list[dict[str, Any]]:
        return [d async for d in engine.stream_async("Hello", {"seed": 7, "max_new_tokens": 2}, affinity="k")]

    deltas = asyncio.run(run())
    (state,) = engine.fleet.submitted
    assert state.sampling.seed == 7 and state.affinity == "k"
    assert deltas[-1]["finished"] and not any("index" in d for d in deltas)


def test_the_server_opens_one_engine_stream_per_prompt_with_n() -> None:
    from flotilla.server.metrics import ServerMetrics
    from flotilla.server.runs import Run, collect
    from flotilla.server.sampling import choice_jobs

    calls: list[tuple[Any, str | None]] = []

    class Engine2:
        async def stream_async(self, prompt=None, sampling_params=None, *, input_ids=None, request_id=None, accepted=False):
            calls.append((dict(sampling_params), request_id))
            n = sampling_params.get("n", 1)
            for i in reversed(range(n)):
                d = {"text": "x", "token_ids": [1], "finished": True, "finish_reason": "length",
                     "result": {"i": i, "rid": request_id}}
                if n > 1:
                    d["index"] = i
                yield d

    jobs = choice_jobs("cmpl", [[1, 2], [3]], {"seed": 5, "max_new_tokens": 1}, 3)
    assert [j.index for j in jobs] == list(range(6)) and all(j.params.get("seed") == 5 for j in jobs)

    async def run() -> list[dict[str, Any]]:
        r = Run(Engine2(), ServerMetrics(lambda: None), jobs)
        await r.start()
        return await collect(r)

    results = asyncio.run(run())
    assert calls == [({"seed": 5, "max_new_tokens": 1, "n": 3}, "cmpl-0"),
                     ({"seed": 5, "max_new_tokens": 1, "n": 3}, "cmpl-1")]
    assert results == [{"i": i, "rid": f"cmpl-{p}"} for p in range(2) for i in range(3)]
