"""sglang's RL control routes (flotilla/server/rl_routes.py): every path, its JSON body and answer, the API
key, and the failure answers; then the routes against a real engine."""

from __future__ import annotations

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla.rl.weight_sync import encode_ipc, encode_tensors
from flotilla.server.rl_routes import add_rl_routes

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}


class FakeEngine:
    """Records each call; ``fail`` makes the next call raise."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.fail: BaseException | None = None
        self.version = 7

    def __getattr__(self, name):
        def method(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if self.fail is not None:
                err, self.fail = self.fail, None
                raise err
            return {"update_weights_from_distributed": 8, "update_weights_from_tensor": 9,
                    "update_weights_from_disk": 10, "abort_request": 2, "get_weight_version": self.version}.get(name)
        return method


@pytest.fixture()
def fake():
    engine = FakeEngine()
    app = FastAPI()
    add_rl_routes(app, lambda: engine, api_key=KEY)
    return engine, TestClient(app)


ROUTES = [
    ("post", "/init_weights_update_group", {"master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 1,
                                            "world_size": 3, "backend": "gloo"},
     ("init_weights_update_group", ("10.0.0.1", 29500, 1, 3, "weight_update_group", "gloo"), {})),
    ("post", "/update_weights_from_distributed", {"names": ["a"], "dtypes": ["bfloat16"], "shapes": [[2, 3]],
                                                  "group_name": "g", "flush_cache": False},
     ("update_weights_from_distributed", (["a"], ["bfloat16"], [[2, 3]], "g", False, None), {})),
    ("post", "/destroy_weights_update_group", {"group_name": "g"}, ("destroy_weights_update_group", ("g",), {})),
    ("post", "/update_weights_from_disk", {"model_path": "/ckpt/1", "weight_version": 4},
     ("update_weights_from_disk", ("/ckpt/1",), {"version": 4, "flush_cache": True})),
    ("post", "/pause_generation", {"mode": "retract"}, ("pause_generation", ("retract",), {})),
    ("post", "/continue_generation", None, ("continue_generation", (), {})),
    ("post", "/release_memory_occupation", {"tags": ["kv_cache"]}, ("release_memory_occupation", (["kv_cache"],), {})),
    ("post", "/resume_memory_occupation", {}, ("resume_memory_occupation", (None,), {})),
    ("post", "/abort_request", {"rid": "r1"}, ("abort_request", ("r1", False), {})),
    ("post", "/flush_cache", None, ("flush_cache", (), {})),
    ("get", "/get_weight_version", None, ("get_weight_version", (), {})),
]


@pytest.mark.parametrize("method, path, body, call", ROUTES, ids=[r[1] for r in ROUTES])
def test_every_route_calls_the_engine_and_needs_the_key(fake, method, path, body, call):
    engine, client = fake
    kw = {"json": body} if body is not None else {}
    assert getattr(client, method)(path, **kw).status_code == 401
    assert getattr(client, method)(path, headers={"Authorization": "Bearer wrong"}, **kw).status_code == 401
    assert not engine.calls
    r = getattr(client, method)(path, headers=AUTH, **kw)
    assert r.status_code == 200, r.text
    assert engine.calls == [call]
    if path == "/get_weight_version":
        assert r.json() == {"weight_version": 7}
    elif path == "/flush_cache":
        assert "flushed" in r.text
    else:
        assert r.json()["success"] is True


@pytest.mark.parametrize("method, path, body, call", [r for r in ROUTES if r[1] not in ("/get_weight_version",)],
                         ids=[r[1] for r in ROUTES if r[1] != "/get_weight_version"])
def test_a_failure_is_400_with_the_reason(fake, method, path, body, call):
    engine, client = fake
    engine.fail = ValueError("world_size: too small")
    kw = {"json": body} if body is not None else {}
    r = getattr(client, method)(path, headers=AUTH, **kw)
    assert r.status_code == 400
    if path != "/flush_cache":
        assert r.json() == {"success": False, "message": "ValueError: world_size: too small"}
    else:
        assert "world_size" in r.text


def test_answers_carry_the_new_version(fake):
    _, client = fake
    r = client.post("/update_weights_from_distributed", headers=AUTH, json={"names": [], "dtypes": [], "shapes": []})
    assert r.json()["weight_version"] == 8
    r = client.post("/update_weights_from_disk", headers=AUTH, json={"model_path": "/x", "abort_all_requests": True})
    assert r.json()["weight_version"] == 10 and r.json()["num_paused_requests"] == 2


def test_weight_version_strings(fake):
    engine, client = fake
    body = {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "weight_version": "12"}
    assert client.post("/update_weights_from_distributed", headers=AUTH, json=body).status_code == 200
    assert engine.calls[-1][1][-1] == 12
    r = client.post("/update_weights_from_disk", headers=AUTH, json={"model_path": "/x", "weight_version": "v2"})
    assert r.status_code == 400 and "weight_version" in r.json()["message"]
    assert len(engine.calls) == 1


def test_update_weights_from_tensor_decodes_json_and_refuses_pickles(fake):
    engine, client = fake
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    r = client.post("/update_weights_from_tensor", headers=AUTH,
                    json={"serialized_named_tensors": [encode_tensors({"w": t})], "flush_cache": False})
    assert r.status_code == 200 and r.json()["weight_version"] == 9
    name, args, _ = engine.calls[-1]
    assert name == "update_weights_from_tensor" and args[1:] == (None, False, None)
    assert [n for n, _ in args[0]] == ["w"] and torch.equal(args[0][0][1], t)
    for bad, match in [(["gASVpickle"], "pickled payloads are refused"), ([], "at least one"),
                       ([[{"name": "w"}]], "name, dtype, shape, data"),
                       ([[dict(encode_tensors({"w": t})[0], shape=[4, 3])]], "bytes of data"),
                       ([[dict(encode_tensors({"w": t})[0], dtype="int8")]], "floating-point")]:
        r = client.post("/update_weights_from_tensor", headers=AUTH, json={"serialized_named_tensors": bad})
        assert r.status_code == 400 and match in r.json()["message"], (bad, r.json())
    assert len(engine.calls) == 1  # none of the bad bodies reached the engine


def test_update_weights_from_tensor_ipc_handles_round_trip(fake):
    from flotilla.ipc.messages import IpcTensor

    engine, client = fake
    h = IpcTensor("model.norm.weight", "bfloat16", [64], [1], 0, 0, b"\x01\x02", 128, 0, b"ref", 3, b"", False)
    r = client.post("/update_weights_from_tensor", headers=AUTH,
                    json={"serialized_named_tensors": [encode_ipc([h]), encode_ipc([h])], "load_format": "ipc"})
    assert r.status_code == 200, r.text
    _, args, _ = engine.calls[-1]
    assert args[0] == [[h], [h]] and args[1] == "ipc"
    r = client.post("/update_weights_from_tensor", headers=AUTH,
                    json={"serialized_named_tensors": [[{"name": "x"}]], "load_format": "ipc"})
    assert r.status_code == 400 and "not an IPC handle" in r.json()["message"]


def test_loading_engine_is_503():
    app = FastAPI()
    add_rl_routes(app, lambda: None)
    client = TestClient(app)
    assert client.get("/get_weight_version").status_code == 503
    assert client.post("/pause_generation", json={"mode": "abort"}).status_code == 503


# ---------------------------------------------------------------------------------------------- a real engine
def test_routes_against_an_engine(tmp_path):
    from flotilla import Engine, SamplingParams
    from test_weight_update import weights

    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    with Engine(model=a, device="cpu", dtype="float32") as engine:
        app = FastAPI()
        add_rl_routes(app, lambda: engine, api_key=KEY)
        client = TestClient(app)
        body = {"serialized_named_tensors": [encode_tensors(weights(b))]}
        r = client.post("/update_weights_from_tensor", headers=AUTH, json=body)
        assert r.status_code == 200 and r.json()["weight_version"] == 1, r.text
        assert client.get("/get_weight_version", headers=AUTH).json() == {"weight_version": 1}
        out = engine.generate(PROMPTS[:1], greedy, use_tqdm=False)[0]["token_ids"]
        assert out == hf_greedy(b, hf_tokenize(b, PROMPTS[0]), 10)
        assert client.post("/pause_generation", headers=AUTH, json={"mode": "in_place"}).json()["success"]
        assert engine.stats()["paused"]
        assert client.post("/continue_generation", headers=AUTH).json()["success"]
        assert not engine.stats()["paused"]
        r = client.post("/update_weights_from_disk", headers=AUTH, json={"model_path": a})
        assert r.json()["weight_version"] == 2
        r = client.post("/update_weights_from_disk", headers=AUTH, json={"model_path": str(tmp_path / "none")})
        assert r.status_code == 400 and "path" in r.json()["message"]
        assert client.post("/release_memory_occupation", headers=AUTH, json={"tags": ["kv_cache"]}).json()["success"]
        r = client.post("/update_weights_from_tensor", headers=AUTH, json=body)
        assert r.status_code == 400 and "resume_memory" in r.json()["message"]
        assert client.post("/resume_memory_occupation", headers=AUTH, json={"tags": ["kv_cache"]}).json()["success"]
        assert client.post("/flush_cache", headers=AUTH).status_code == 200
        r = client.post("/init_weights_update_group", headers=AUTH,
                        json={"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 2,
                              "backend": "nccl"})
        assert r.status_code == 400 and "device='cuda'" in r.json()["message"]
        assert client.post("/abort_request", headers=AUTH, json={"abort_all": True}).json()["num_aborted"] == 0
        out = engine.generate(PROMPTS[:1], greedy, use_tqdm=False)[0]["token_ids"]
        assert out == hf_greedy(a, hf_tokenize(a, PROMPTS[0]), 10)


def test_routes_inside_the_server_app():
    """Mounted on the server's app (what the lead wires): the server's error handlers shape the 401."""
    from flotilla.server.app import build_app

    engine = FakeEngine()
    app = build_app(None, "m", api_key=KEY)  # build_app mounts the RL routes itself, over the app's engine
    client = TestClient(app)
    assert client.post("/pause_generation", headers=AUTH, json={"mode": "in_place"}).status_code == 503  # loading
    app.state.flotilla.engine = engine
    r = client.post("/pause_generation", json={"mode": "in_place"})
    assert r.status_code == 401 and "API key" in r.text
    r = client.post("/pause_generation", headers=AUTH, json={"mode": "in_place"})
    assert r.status_code == 200 and engine.calls == [("pause_generation", ("in_place",), {})]
    assert client.get("/v1/models").status_code == 401  # the server's own routes keep their auth
