"""LoRA adapters through the Ray integrations, without a Ray cluster: engine kwargs (``lora_modules`` implies
``enable_lora``; Serve's string arguments), a Ray Data row's adapter, and the Serve ingress's engine client and
engine replica with stand-ins for the deployment handle and the engine."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from flotilla.errors import InvalidParameter  # noqa: E402
from flotilla.integrations.ray_data import FlotillaProcessorConfig, FlotillaStage, sampling_of  # noqa: E402
from flotilla.integrations.ray_serve import (FlotillaEngineReplica, FlotillaServeConfig,  # noqa: E402
                                             ServeEngineClient)

MODS = {"sql": "/adapters/sql"}


def test_lora_modules_pass_through_and_imply_enable_lora() -> None:
    serve_cfg = FlotillaServeConfig(model_source="/m", engine_kwargs={"lora_modules": MODS, "max_lora_rank": 32})
    assert serve_cfg.engine_kwargs == {"lora_modules": MODS, "max_lora_rank": 32, "enable_lora": True}
    assert serve_cfg.engine_config.lora_modules == MODS and serve_cfg.engine_config.enable_lora
    # `serve run ... engine_kwargs='{...}'`: a JSON string, as Serve's command line hands it over
    from_cli = FlotillaServeConfig.from_args({"model_source": "/m", "engine_kwargs": json.dumps({"lora_modules": MODS})})
    assert from_cli.engine_kwargs == {"lora_modules": MODS, "enable_lora": True}
    data_cfg = FlotillaProcessorConfig(model_source="/m", engine_kwargs={"lora_modules": MODS})
    assert data_cfg.engine_kwargs["enable_lora"] is True and data_cfg.resolved(False).engine_kwargs["enable_lora"]
    with pytest.raises(ValueError, match="lora_modules"):  # an explicit False with adapters stays a conflict
        FlotillaProcessorConfig(model_source="/m", engine_kwargs={"lora_modules": MODS, "enable_lora": False})
    with pytest.raises(ValueError, match="lora_modules"):
        FlotillaServeConfig(model_source="/m", engine_kwargs={"lora_modules": {"sql": 3}})


def test_a_ray_data_row_names_its_adapter() -> None:
    assert sampling_of({"lora_name": "sql", "sampling_params": {"max_tokens": 4}}) == \
        {"max_new_tokens": 4, "lora_name": "sql"}
    assert sampling_of({"sampling_params": {"lora_name": "sql"}}) == {"lora_name": "sql"}
    assert sampling_of({"lora_name": None, "sampling_params": {"lora_name": None}}) == {}  # Arrow's None: the base
    assert sampling_of({"lora_name": "sql", "sampling_params": {"lora_name": "sql"}}) == {"lora_name": "sql"}
    with pytest.raises(InvalidParameter) as e:
        sampling_of({"lora_name": "sql", "sampling_params": {"lora_name": "chat"}})
    assert e.value.field == "lora_name"

    class Engine:  # what the stage calls: generate_async, tokenizer
        tokenizer = None

        def __init__(self) -> None:
            self.params: list[dict[str, Any]] = []

        async def generate_async(self, prompt: Any, params: dict[str, Any], input_ids: Any = None) -> dict[str, Any]:
            self.params.append(params)
            return {"text": "x", "token_ids": [1], "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "length"}

    stage = FlotillaStage.__new__(FlotillaStage)  # no engine started: the row handling alone
    stage.engine = Engine()
    asyncio.run(stage._one({"prompt": "hi", "lora_name": "sql"}))
    asyncio.run(stage._one({"prompt": "hi", "lora_name": None}))
    assert stage.engine.params == [{"lora_name": "sql"}, {}]
    stage.engine = None  # (so __del__ has nothing to close)


class _Method:
    def __init__(self, owner: "_Handle", name: str):
        self.owner, self.name = owner, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.owner.calls.append((self.name, args, kwargs))

        async def answer() -> Any:
            if self.owner.fail is not None:
                raise self.owner.fail
            return {"name": args[0], "path": args[1], "version": 0, "rank": 8, "id": 2} if args[1:] else None
        return answer() if self.name != "stream" else self.owner.gen()


class _Handle:
    """A DeploymentHandle stand-in: records each call (method, args, kwargs)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail: BaseException | None = None
        self.load_lora_adapter = _Method(self, "load_lora_adapter")
        self.unload_lora_adapter = _Method(self, "unload_lora_adapter")

    def options(self, method_name: str, **_: Any) -> _Method:
        return _Method(self, method_name)

    async def _deltas(self) -> Any:
        yield {"finished": True, "token_ids": [], "text": "", "finish_reason": "length", "result": {}}

    def gen(self) -> Any:
        return self._deltas()


def test_serve_client_lists_loads_and_sends_runtime_adapters_with_the_request() -> None:
    handle = _Handle()
    client = ServeEngineClient(handle, None, 64, [{"name": "sql", "path": "/a/sql", "version": 0, "rank": 8,
                                                   "id": 1}])
    assert [a["name"] for a in client.list_lora_adapters()] == ["sql"]

    async def drain(params: dict[str, Any]) -> None:
        async for _ in client.stream_async(None, params, input_ids=[1, 2]):
            pass

    asyncio.run(drain({"lora_name": "sql"}))  # loaded at start on every replica: nothing extra travels
    assert handle.calls[-1] == ("stream", ([1, 2], {"lora_name": "sql"}, None, None), {})
    asyncio.run(client.load_lora_adapter("chat", "/a/chat"))
    name, args, _ = handle.calls[-1]
    assert name == "load_lora_adapter" and args[:2] == ("chat", "/a/chat")
    token = args[2]
    assert [a["name"] for a in client.list_lora_adapters()] == ["sql", "chat"]
    asyncio.run(drain({"lora_name": "chat"}))  # a replica that lacks it loads it first
    assert handle.calls[-1] == ("stream", ([1, 2], {"lora_name": "chat"}, None, None),
                                {"lora": ("chat", "/a/chat", token)})
    with pytest.raises(InvalidParameter, match="already loaded"):
        asyncio.run(client.load_lora_adapter("chat", "/a/other"))
    asyncio.run(client.unload_lora_adapter("chat"))
    assert handle.calls[-1] == ("unload_lora_adapter", ("chat",), {})
    assert [a["name"] for a in client.list_lora_adapters()] == ["sql"]
    with pytest.raises(InvalidParameter) as e:
        asyncio.run(client.unload_lora_adapter("chat"))
    assert e.value.field == "lora_name"
    # the replica's refusal keeps its meaning across the handle (a 400 naming the field), and nothing is recorded
    from ray.exceptions import RayTaskError

    handle.fail = RayTaskError("load_lora_adapter", "tb", InvalidParameter("lora_path", "no adapter_config.json"))
    with pytest.raises(InvalidParameter) as e:
        asyncio.run(client.load_lora_adapter("bad", "/nope"))
    assert e.value.field == "lora_path" and [a["name"] for a in client.list_lora_adapters()] == ["sql"]


def test_serve_engine_replica_loads_a_runtime_adapter_once_per_load() -> None:
    class Engine:
        def __init__(self) -> None:
            self.adapters: dict[str, str] = {"sql": "/a/sql"}
            self.calls: list[tuple] = []

        def list_lora_adapters(self) -> list[dict[str, Any]]:
            return [{"name": n, "path": p} for n, p in self.adapters.items()]

        def load_lora_adapter(self, name: str, path: str) -> None:
            self.calls.append(("load", name, path))
            self.adapters[name] = path

        def unload_lora_adapter(self, name: str) -> None:
            self.calls.append(("unload", name))
            del self.adapters[name]

        async def stream_async(self, prompt: Any, params: Any, *, input_ids: Any, request_id: Any,
                               accepted: bool = False) -> Any:
            yield {"finished": True, "lora_name": params.get("lora_name")}

    replica = FlotillaEngineReplica.__new__(FlotillaEngineReplica)  # no engine started
    replica.engine = Engine()  # type: ignore[assignment]
    replica._lora_tokens, replica._lora_lock = {}, asyncio.Lock()

    async def run() -> list[Any]:
        out = []
        for lora in (None, ("chat", "/a/chat", "t1"), ("chat", "/a/chat", "t1"), ("chat", "/a/chat2", "t2"),
                     ("sql", "/a/sql2", "t3")):
            out += [d async for d in replica.stream([1], {"lora_name": lora[0] if lora else None}, None, None, lora)]
        return out

    assert len(asyncio.run(run())) == 5
    # loaded once for t1, replaced for t2 (a new load of the name), and a start-time copy replaced for t3
    assert replica.engine.calls == [("load", "chat", "/a/chat"), ("unload", "chat"), ("load", "chat", "/a/chat2"),
                                    ("unload", "sql"), ("load", "sql", "/a/sql2")]
    replica.engine = None  # (so __del__ has nothing to shut down)
