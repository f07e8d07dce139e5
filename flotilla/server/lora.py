"""LoRA adapters over HTTP, in vLLM's shapes: a request's ``model`` naming an adapter, the adapters in
``/v1/models`` (``parent``: the base model), and ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``
(behind the API key, as every ``/v1/`` route is).

A request picks its adapter by ``model`` (the adapter's name; sglang's ``<base>:<adapter>`` too) or by an explicit
``lora_name`` field (sglang's ``lora_path`` is read as the same: a loaded adapter's name). The base model's name
(or no ``model``) is the base model; an unknown ``model`` is a 404 (``model_not_found``), an unknown ``lora_name``
a 400 naming that field. The engine checks the name again at submit (an adapter unloaded meanwhile is a 400).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from flotilla.server.engine_client import EngineClient
from flotilla.server.errors import APIError, bad_param, from_value_error, unavailable
from flotilla.server.tokens import off_loop

log = logging.getLogger(__name__)

LORA_FIELDS = ("lora_name", "lora_path")
"""The request fields that name an adapter explicitly (declared in ``protocol.SamplingFields``)."""


def adapters(engine: EngineClient | None) -> list[dict[str, Any]]:
    """The engine's loaded adapters; none for an engine without LoRA (the method missing, or a RuntimeError
    because ``enable_lora`` is off)."""
    fn = getattr(engine, "list_lora_adapters", None) if engine is not None else None
    if fn is None:
        return []
    try:
        return list(fn())
    except (RuntimeError, NotImplementedError):
        return []


def adapter_card(adapter: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """vLLM's card of an adapter: the base model's, with the adapter's name, folder and the base as parent."""
    return {**base, "id": adapter["name"], "root": adapter.get("path"), "parent": base["id"]}


class Choice:
    """Which adapter a generation request runs with, and the name its responses echo as ``model``."""

    __slots__ = ("lora_name", "field", "model")

    def __init__(self, lora_name: str | None, field: str, model: str):
        self.lora_name, self.field, self.model = lora_name, field, model

    def aliases(self, base: dict[str, str]) -> dict[str, str]:
        """The route's engine-field aliases, plus the engine's ``lora_name`` under the field the client used."""
        return base if self.lora_name is None or self.field == "lora_name" else {**base, "lora_name": self.field}

    def apply(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.lora_name is not None:
            params["lora_name"] = self.lora_name
        return params


def model_adapter(model_name: str, engine: EngineClient | None, name: str | None) -> str | None:
    """None for the base model (its name, or no name); the adapter ``name`` names (its own name, or sglang's
    ``<base>:<adapter>``); a 404 for anything else (a 503 while the engine loads: its adapters are not known)."""
    if name is None or name == model_name:
        return None
    if engine is None:
        raise unavailable("the engine is still loading")
    known = [a["name"] for a in adapters(engine)]
    if name in known:
        return name
    prefix = model_name + ":"
    if name.startswith(prefix) and name[len(prefix):] in known:
        return name[len(prefix):]
    served = f"`{model_name}`" + (f" and the LoRA adapters {sorted(known)}" if known else "")
    raise APIError(404, f"The model `{name}` does not exist; this server serves {served}.", param="model",
                   code="model_not_found")


def choose(model_name: str, engine: EngineClient, body: Any) -> Choice:
    """The adapter of a generation request (``model``, or ``lora_name`` / ``lora_path``; they must agree)."""
    from_model = model_adapter(model_name, engine, getattr(body, "model", None))
    explicit = [(f, getattr(body, f, None)) for f in LORA_FIELDS if getattr(body, f, None) is not None]
    if len(explicit) == 2 and explicit[0][1] != explicit[1][1]:
        raise bad_param("lora_path", f"names adapter {explicit[1][1]!r} but lora_name names {explicit[0][1]!r}")
    echo = getattr(body, "model", None) if from_model is not None else model_name
    if not explicit:
        return Choice(from_model, "model", echo)
    field, name = explicit[0]
    if from_model is not None and name != from_model:
        raise bad_param(field, f"names adapter {name!r} but model names {from_model!r}")
    known = [a["name"] for a in adapters(engine)]
    if name not in known:
        raise bad_param(field, f"unknown LoRA adapter {name!r}; loaded: {sorted(known)}")
    return Choice(name, field, echo)


# ============================================================================================ routes


class _AdapterBody(BaseModel):
    # vLLM's bodies; fields of newer vLLM versions are ignored. Strict: {"lora_name": 1} is a 400, not "1"
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(min_length=1, max_length=256)


class LoadAdapterBody(_AdapterBody):
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False  # vLLM's: replace a loaded adapter of that name (refused, see the route)


class UnloadAdapterBody(_AdapterBody):
    pass


def add_lora_routes(app: FastAPI, state: Any) -> None:
    """``state`` is the app's ``ServerState``."""

    def engine_call(name: str) -> Any:
        engine = state.ready_engine()
        fn = getattr(engine, name, None)
        if fn is None:
            raise APIError(400, "this engine does not serve LoRA adapters", code="lora_not_supported")
        return fn

    async def run(fn: Any, *args: Any) -> None:
        """``fn`` in a worker thread (the engine's calls block); a client whose calls are coroutines (the Ray Serve
        ingress's) is awaited on the loop instead."""
        try:
            if inspect.iscoroutinefunction(fn):
                await fn(*args)
            else:
                await off_loop(fn, *args)
        except ValueError as e:  # InvalidParameter names lora_name / lora_path (enable_lora: LoRA is off)
            raise from_value_error(e, {}) from None
        except RuntimeError as e:
            raise unavailable(f"{e}") from None
        except TimeoutError as e:
            raise unavailable(f"{e}") from None

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterBody) -> PlainTextResponse:
        """Load a PEFT folder (``adapter_config.json`` + safetensors, on the server's file system) as
        ``lora_name``; the next requests naming it use it."""
        if body.load_inplace:
            raise bad_param("load_inplace", "is not supported: unload the adapter first, or replace its weights "
                                            "with POST /update_lora_weights")
        await run(engine_call("load_lora_adapter"), body.lora_name, body.lora_path)
        log.info("loaded LoRA adapter %r from %s", body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterBody) -> PlainTextResponse:
        await run(engine_call("unload_lora_adapter"), body.lora_name)
        log.info("unloaded LoRA adapter %r", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
