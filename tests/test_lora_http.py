"""LoRA adapters over HTTP (flotilla/server/lora.py, rl_routes.py) and on the command line (--lora-modules), against
the synthetic engine (no model: adapters are bookkeeping there, but it refuses an unknown lora_name at submit as the
real engine does, and records the lora_name every request reached it with)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from flotilla.errors import InvalidParameter
from flotilla.server import build_app
from flotilla.server.synthetic import SyntheticEngine

MODEL = "tiny-llama"
KEY = "sk-lora-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def adapter_folder(root: Path, name: str, rank: int = 8) -> str:
    """A PEFT-shaped folder: adapter_config.json (rank r) and adapter_model.safetensors."""
    folder = root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16, "peft_type": "LORA",
                                                            "target_modules": ["q_proj", "v_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(rank, 8)},
              str(folder / "adapter_model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(llama_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {"sql": adapter_folder(root, "sql"), "chat": adapter_folder(root, "chat"),
            "big": adapter_folder(root, "big", rank=64), "other": adapter_folder(root, "other")}


@pytest.fixture()
def engine(tokenizer: Any, folders: dict[str, str]):
    eng = SyntheticEngine(tokenizer, step_ms=0.5, max_model_len=256, lora_modules={"sql": folders["sql"]})
    yield eng
    eng.shutdown()


@pytest.fixture()
def client(engine: SyntheticEngine):
    with TestClient(build_app(engine, MODEL, api_key=KEY), headers=AUTH) as tc:
        yield tc


def _err(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]


def _last_lora(engine: SyntheticEngine) -> str | None:
    return engine.lora_requests[-1][1]


# ============================================================================================ /v1/models


def test_models_list_the_base_then_each_adapter_with_its_parent(client: TestClient, folders: dict[str, str]) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [MODEL, "sql"]
    base, sql = data
    assert base["parent"] is None and base["object"] == "model" and base["owned_by"] == "flotilla"
    assert sql["parent"] == MODEL and sql["root"] == folders["sql"] and sql["object"] == "model"
    assert sql["created"] == base["created"] and sql["max_model_len"] == 256
    assert client.get("/v1/models/sql").json()["root"] == folders["sql"]
    assert client.get(f"/v1/models/{MODEL}").json()["parent"] is None
    err = _err(client.get("/v1/models/nope"), 404)
    assert err["code"] == "model_not_found" and "`nope`" in err["message"]


def test_an_engine_without_lora_lists_only_the_base(tokenizer: Any) -> None:
    class NoLora:  # the minimum EngineClient: no LoRA methods at all
        def __init__(self) -> None:
            self.tokenizer, self.max_model_len = tokenizer, 64

        def stats(self) -> dict[str, Any]:
            return {"replicas": [{"id": 0, "alive": True}]}

    with TestClient(build_app(NoLora(), MODEL)) as tc:  # type: ignore[arg-type]
        assert [m["id"] for m in tc.get("/v1/models").json()["data"]] == [MODEL]
        err = _err(tc.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"}), 400)
        assert err["code"] == "lora_not_supported"
        assert _err(tc.post("/v1/completions", json={"model": "a", "prompt": "hi"}), 404)["code"] == "model_not_found"


# ============================================================================================ load / unload


def test_load_and_unload_routes(client: TestClient, engine: SyntheticEngine, folders: dict[str, str]) -> None:
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "chat", "lora_path": folders["chat"]})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'chat' added successfully."
    assert [a["name"] for a in engine.list_lora_adapters()] == ["sql", "chat"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL, "sql", "chat"]
    # bad input: a 400 naming the field, and nothing changed
    cases = [({"lora_name": "chat", "lora_path": folders["chat"]}, "lora_name", "already loaded"),
             ({"lora_name": "x", "lora_path": "/no/such/folder"}, "lora_path", "adapter_config.json"),
             ({"lora_name": "x", "lora_path": folders["big"]}, "lora_path", "max_lora_rank"),
             ({"lora_name": "x"}, "lora_path", "Field required"),
             ({"lora_path": folders["other"]}, "lora_name", "Field required"),
             ({"lora_name": "", "lora_path": folders["other"]}, "lora_name", ""),
             ({"lora_name": 3, "lora_path": folders["other"]}, "lora_name", ""),
             ({"lora_name": "x", "lora_path": folders["other"], "load_inplace": True}, "load_inplace", "")]
    for body, param, text in cases:
        err = _err(client.post("/v1/load_lora_adapter", json=body), 400)
        assert err["param"] == param and text in err["message"], (body, err)
    assert [a["name"] for a in engine.list_lora_adapters()] == ["sql", "chat"]

    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "chat"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'chat' removed successfully."
    assert [a["name"] for a in engine.list_lora_adapters()] == ["sql"]
    err = _err(client.post("/v1/unload_lora_adapter", json={"lora_name": "chat"}), 400)
    assert err["param"] == "lora_name" and "unknown LoRA adapter 'chat'" in err["message"]
    assert _err(client.post("/v1/unload_lora_adapter", json={}), 400)["param"] == "lora_name"
    # an unloaded adapter is an unknown model again
    assert _err(client.post("/v1/completions", json={"model": "chat", "prompt": "hi"}), 404)["code"] == \
        "model_not_found"


def test_lora_routes_need_the_key(engine: SyntheticEngine, folders: dict[str, str]) -> None:
    with TestClient(build_app(engine, MODEL, api_key=KEY)) as tc:
        calls = [("/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": folders["chat"]}),
                 ("/v1/unload_lora_adapter", {"lora_name": "sql"}),
                 ("/load_lora_adapter", {"lora_name": "chat", "lora_path": folders["chat"]}),
                 ("/unload_lora_adapter", {"lora_name": "sql"}),
                 ("/update_lora_weights", {"lora_name": "sql", "path": folders["sql"]})]
        for path, body in calls:
            assert tc.post(path, json=body).status_code == 401, path
            assert tc.post(path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert tc.get("/v1/models").status_code == 401
    assert [(a["name"], a["version"]) for a in engine.list_lora_adapters()] == [("sql", 0)]  # untouched


def test_sglang_load_and_unload_routes(client: TestClient, engine: SyntheticEngine, folders: dict[str, str]) -> None:
    r = client.post("/load_lora_adapter", json={"lora_name": "chat", "lora_path": folders["chat"]})
    assert r.status_code == 200 and r.json()["success"] and r.json()["loaded_adapters"] == ["sql", "chat"]
    r = client.post("/load_lora_adapter", json={"lora_name": "chat", "lora_path": folders["chat"]})
    assert r.status_code == 400 and not r.json()["success"] and "already loaded" in r.json()["message"]
    r = client.post("/unload_lora_adapter", json={"lora_name": "chat"})
    assert r.status_code == 200 and r.json()["loaded_adapters"] == ["sql"]


# ============================================================================================ requests


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_model_naming_an_adapter_reaches_the_engine_as_lora_name(client: TestClient, engine: SyntheticEngine,
                                                                  endpoint: str, stream: bool) -> None:
    def ask(model: str | None, **extra: Any) -> Any:
        body: dict[str, Any] = {"max_tokens": 3, "stream": stream, **extra}
        if model is not None:
            body["model"] = model
        if endpoint == "chat":
            return client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "hi"}]})
        return client.post("/v1/completions", json={**body, "prompt": "hi", "n": 2})

    def echoed(r: Any) -> str:
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()["model"]
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert chunks and len({c["model"] for c in chunks}) == 1
        return chunks[0]["model"]

    before = len(engine.lora_requests)
    assert echoed(ask("sql")) == "sql"
    assert _last_lora(engine) == "sql"
    assert echoed(ask(MODEL)) == MODEL and _last_lora(engine) is None
    assert echoed(ask(None)) == MODEL and _last_lora(engine) is None
    assert echoed(ask(f"{MODEL}:sql")) == f"{MODEL}:sql" and _last_lora(engine) == "sql"  # sglang's base:adapter
    assert echoed(ask(None, lora_name="sql")) == MODEL and _last_lora(engine) == "sql"
    assert echoed(ask(MODEL, lora_path="sql")) == MODEL and _last_lora(engine) == "sql"  # sglang's field name
    per_request = 2 if endpoint == "completions" else 1  # n=2 choices are two engine requests
    recorded = list(engine.lora_requests)[before:]
    assert [name for _, name in recorded] == [x for x in ["sql", None, None, "sql", "sql", "sql"]
                                              for _ in range(per_request)]


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_and_bad_lora_fields_are_400(client: TestClient, engine: SyntheticEngine,
                                                          stream: bool) -> None:
    before = len(engine.lora_requests)
    for path, extra in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        err = _err(client.post(path, json={"model": "nope", "stream": stream, **extra}), 404)
        assert err["message"].startswith("The model `nope` does not exist") and err["param"] == "model"
        assert err["code"] == "model_not_found" and "sql" in err["message"]
        err = _err(client.post(path, json={"lora_name": "nope", "stream": stream, **extra}), 400)
        assert err["param"] == "lora_name" and "unknown LoRA adapter 'nope'" in err["message"]
        err = _err(client.post(path, json={"lora_path": "nope", "stream": stream, **extra}), 400)
        assert err["param"] == "lora_path"
        client.post("/v1/load_lora_adapter", json={"lora_name": "chat", "lora_path": engine._adapters["sql"]["path"]})
        err = _err(client.post(path, json={"model": "sql", "lora_name": "chat", "stream": stream, **extra}), 400)
        assert err["param"] == "lora_name" and "model names 'sql'" in err["message"]
        err = _err(client.post(path, json={"lora_name": 5, "stream": stream, **extra}), 400)
        assert err["param"] == "lora_name"
        client.post("/v1/unload_lora_adapter", json={"lora_name": "chat"})
    assert len(engine.lora_requests) == before  # none reached the engine


def test_the_engine_refuses_an_unknown_adapter_at_submit(client: TestClient, engine: SyntheticEngine,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async def first(params: dict[str, Any]) -> Any:
        agen = engine.stream_async("hi", params)
        try:
            return await agen.__anext__()
        finally:
            await agen.aclose()

    with pytest.raises(InvalidParameter) as e:
        asyncio.run(first({"max_new_tokens": 2, "lora_name": "nope"}))
    assert e.value.field == "lora_name"
    assert asyncio.run(first({"max_new_tokens": 2, "lora_name": "sql"})) is not None
    # an adapter unloaded between the server's check and the submit: the engine's 400, under the field the
    # client used (model)
    import flotilla.server.state as state
    from flotilla.server.lora import Choice

    monkeypatch.setattr(state, "choose", lambda *a: Choice("gone", "model", "gone"))
    err = _err(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}), 400)
    assert err["param"] == "model" and "unknown LoRA adapter 'gone'" in err["message"]


# ============================================================================================ RL route


def test_update_lora_weights_route(client: TestClient, engine: SyntheticEngine, folders: dict[str, str],
                                   tmp_path: Path) -> None:
    from flotilla.rl.weight_sync import encode_tensors

    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    body = {"lora_name": "sql", "serialized_named_tensors": [encode_tensors([(name, torch.ones(8, 8))])]}
    r = client.post("/update_lora_weights", json=body)
    assert r.status_code == 200 and r.json() == {"success": True, "message": "LoRA adapter 'sql' updated",
                                                 "lora_name": "sql", "version": 1}
    assert engine.last_lora_update == ("sql", [name])
    r = client.post("/update_lora_weights", json={"lora_name": "sql", "path": folders["sql"], "weight_version": "7"})
    assert r.status_code == 200 and r.json()["version"] == 7  # a PEFT folder, read in the server
    file = tmp_path / "w.safetensors"
    save_file({"a.lora_B.weight": torch.zeros(8, 8), "b.lora_B.weight": torch.zeros(8, 8)}, str(file))
    r = client.post("/update_lora_weights", json={"lora_name": "sql", "path": str(file)})
    assert r.json()["version"] == 8 and engine.last_lora_update == ("sql", ["a.lora_B.weight", "b.lora_B.weight"])
    assert client.get("/v1/models").json()["data"][1]["id"] == "sql"
    assert engine.list_lora_adapters()[0]["version"] == 8

    bad = [({"lora_name": "nope", "path": folders["sql"]}, "unknown LoRA adapter 'nope'"),
           ({"lora_name": "sql"}, "exactly one of"),
           ({"lora_name": "sql", "path": folders["sql"], **body}, "exactly one of"),
           ({"lora_name": "sql", "path": "/no/such.safetensors"}, "path:"),
           ({**body, "load_format": "ipc"}, "load_format"),
           ({"lora_name": "sql", "serialized_named_tensors": ["gAR..."]}, "pickled payloads are refused")]
    for b, text in bad:
        r = client.post("/update_lora_weights", json=b)
        assert r.status_code == 400 and not r.json()["success"] and text in r.json()["message"], (b, r.text)
    assert engine.list_lora_adapters()[0]["version"] == 8  # nothing changed


# ============================================================================================ command line


def _lora_kwargs(*argv: str) -> dict[str, Any]:
    from flotilla.cli import parse_args
    from flotilla.launch.factory import engine_kwargs

    args, _ = parse_args(["serve", *argv])
    return {k: v for k, v in engine_kwargs(args).items() if "lora" in k}


def test_lora_modules_flag_takes_both_forms_and_implies_enable_lora(llama_path: str, tmp_path: Path) -> None:
    from flotilla.config import EngineConfig

    kw = _lora_kwargs("--model", llama_path, "--lora-modules", "sql=/a/sql",
                      '{"name": "chat", "path": "/a/chat", "base_model_name": "x"}', '{"x": "/a/x", "y": "/a/y"}')
    assert kw == {"enable_lora": True, "lora_modules": {"sql": "/a/sql", "chat": "/a/chat", "x": "/a/x", "y": "/a/y"}}
    EngineConfig(model=llama_path, **kw)  # what the engine accepts
    assert _lora_kwargs("--model", llama_path, "--enable-lora", "--max-loras", "2", "--max-lora-rank", "64") == \
        {"enable_lora": True, "max_loras": 2, "max_lora_rank": 64}
    assert _lora_kwargs("--model", llama_path) == {}
    kw = _lora_kwargs("--model", llama_path, "--no-enable-lora", "--lora-modules", "sql=/a")
    with pytest.raises(ValueError, match="lora_modules"):  # an explicit conflict stays one
        EngineConfig(model=llama_path, **kw)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {llama_path}\nlora_modules: {{sql: /a/sql, chat: /a/chat}}\nmax-lora-rank: 32\n")
    assert _lora_kwargs("--config", str(config)) == {"enable_lora": True, "max_lora_rank": 32,
                                                     "lora_modules": {"sql": "/a/sql", "chat": "/a/chat"}}
    assert _lora_kwargs("--config", str(config), "--lora-modules", "z=/z")["lora_modules"] == {"z": "/z"}
    from flotilla.cli import parse_args

    args, _ = parse_args(["generate", "hi", "--model", llama_path, "--lora-modules", "sql=/a", "--lora-name", "sql"])
    assert args.lora_name == "sql" and args.enable_lora is True  # generate's sampling flag and the implied switch


@pytest.mark.parametrize("items, text", [
    (["sql"], "'sql' must be NAME=PATH"),
    (["=/a"], "non-empty"),
    (["sql="], "non-empty"),
    (["{not json"], "not valid JSON"),
    (['["a"]'], "must be NAME=PATH"),
    (['{"name": "a"}'], 'needs both "name" and "path"'),
    (['{"a": 1}'], "non-empty strings"),
    (["a=/x", "a=/y"], "'a' is given twice"),
])
def test_bad_lora_modules_are_usage_errors_naming_the_flag(llama_path: str, items: list[str], text: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        _lora_kwargs("--model", llama_path, "--lora-modules", *items)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--lora-modules:" in err and text in err, err


@pytest.mark.parametrize("value, text", [("[1]", "must be a mapping"), ("{sql: 3}", "must be a mapping"),
                                         ("{}", "must be a mapping"), ("sql", "must be NAME=PATH")])
def test_bad_lora_modules_in_a_config_file(llama_path: str, tmp_path: Path, value: str, text: str,
                                           capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {llama_path}\nlora_modules: {value}\n")
    with pytest.raises(SystemExit):
        _lora_kwargs("--config", str(config))
    err = capsys.readouterr().err
    assert "lora_modules:" in err and text in err, err
