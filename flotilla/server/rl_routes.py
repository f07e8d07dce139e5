"""sglang's RL control routes on a FastAPI app: the paths and JSON bodies slime, AReaL and verl's server
mode call, each behind the API key.

``add_rl_routes(app, get_engine, api_key)`` adds them; the server app calls it once. Every route answers
sglang's ``{"success": bool, "message": str}`` (plus the route's own fields), 200 on success and 400 with
the reason on failure; 401 without the key, 503 while the engine loads.

LoRA: sglang's ``/load_lora_adapter`` and ``/unload_lora_adapter`` (``{lora_name, lora_path}``; vLLM's
``/v1/...`` routes are in ``lora.py``), and ``/update_lora_weights``: one adapter's weights replaced in place (the
engine stages and commits them all-or-none; the base weights are untouched), from ``serialized_named_tensors`` (as
``/update_weights_from_tensor`` carries plain tensors) or from ``path``, a safetensors file (or a PEFT folder's
``adapter_model.safetensors``) that the server process reads; it answers the adapter's new ``version``.

One deliberate difference: ``/update_weights_from_tensor`` never unpickles. sglang's body carries pickled
tensors (unpickling a request body runs whatever code it names); here each entry of
``serialized_named_tensors`` is JSON, built by ``flotilla.rl.weight_sync.encode_tensors`` (plain tensors)
or ``encode_ipc`` (CUDA IPC handles of a colocated trainer, ``load_format="ipc"``).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from typing import Protocol

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict

from flotilla.errors import InvalidParameter, type_name


class RLEngineClient(Protocol):
    """What these routes use of an engine (``Engine`` and ``RayEngine`` satisfy it; flotilla/rl/api.py)."""

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = ..., backend: str = ...) -> None: ...

    def update_weights_from_distributed(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                                        group_name: str = ..., flush_cache: bool = ...,
                                        weight_version: int | None = ...) -> int: ...

    def update_weights_from_tensor(self, named_tensors: Any, load_format: str | None = ..., flush_cache: bool = ...,
                                   weight_version: int | None = ...) -> int: ...

    def destroy_weights_update_group(self, group_name: str = ...) -> None: ...

    def update_weights_from_disk(self, path: Any, **kwargs: Any) -> int: ...

    def pause_generation(self, mode: str = ...) -> None: ...

    def continue_generation(self) -> None: ...

    def flush_cache(self) -> None: ...

    def release_memory_occupation(self, tags: list[str] | None = ...) -> None: ...

    def resume_memory_occupation(self, tags: list[str] | None = ...) -> None: ...

    def get_weight_version(self) -> int: ...

    def abort_request(self, rid: str = ..., abort_all: bool = ...) -> int: ...

    def load_lora_adapter(self, name: str, path: str) -> None: ...

    def unload_lora_adapter(self, name: str) -> None: ...

    def update_lora_weights(self, name: str, named_tensors: Any, *, version: int | None = ...) -> int: ...


RL_PATHS = ("/init_weights_update_group", "/update_weights_from_distributed", "/update_weights_from_tensor",
            "/destroy_weights_update_group", "/update_weights_from_disk", "/pause_generation", "/continue_generation",
            "/flush_cache", "/release_memory_occupation", "/resume_memory_occupation", "/get_weight_version",
            "/abort_request", "/load_lora_adapter", "/unload_lora_adapter", "/update_lora_weights")
"""Every route here: the server's auth middleware checks the key on these before any body is read."""


class _Body(BaseModel):
    # sglang clients send fields of newer sglang versions too; strict: "world_size": "2" is a 400, not 2
    model_config = ConfigDict(extra="ignore", strict=True)


def _version(value: int | str | None) -> int | None:
    """sglang sends weight versions as strings; Flotilla's are ints ("7" is taken as 7)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise InvalidParameter("weight_version", f"must be an int >= 0 (or its digits as a string), got {value!r}")


class InitGroupBody(_Body):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"
    # how long the ranks try to reach the trainer's store at master_address:master_port (an unreachable one
    # fails the call after this long; generation goes on meanwhile)
    connect_timeout_s: float | None = None


class DistributedBody(_Body):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    weight_version: int | str | None = None


class TensorBody(_Body):
    serialized_named_tensors: list[Any]
    load_format: str | None = None
    flush_cache: bool = True
    weight_version: int | str | None = None


class GroupNameBody(_Body):
    group_name: str = "weight_update_group"


class DiskBody(_Body):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    flush_cache: bool = True
    weight_version: int | str | None = None


class PauseBody(_Body):
    mode: str = "abort"


class TagsBody(_Body):
    tags: list[str] | None = None


class AbortBody(_Body):
    rid: str = ""
    abort_all: bool = False


class LoraAdapterBody(_Body):
    lora_name: str
    lora_path: str | None = None


class LoraWeightsBody(_Body):
    lora_name: str
    serialized_named_tensors: list[Any] | None = None
    load_format: str | None = None
    path: str | None = None
    weight_version: int | str | None = None


def _ok(message: str = "", **extra: Any) -> dict[str, Any]:
    return {"success": True, "message": message, **extra}


def _fail(e: BaseException) -> JSONResponse:
    return JSONResponse({"success": False, "message": f"{type_name(e)}: {e}"}, status_code=400)


def bearer_check(api_key: str | None) -> Callable[[Request], None]:
    """A dependency that refuses a request without ``Authorization: Bearer <api_key>`` (none: open)."""
    from fastapi import HTTPException

    key = api_key.encode("utf-8") if api_key else None

    def check(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), key):
            raise HTTPException(401, "Incorrect or missing API key; send the header 'Authorization: Bearer <key>'.",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def _tensors(body: TensorBody) -> tuple[Any, str | None]:
    """The update's tensors out of ``serialized_named_tensors`` (JSON only; pickles are refused)."""
    from flotilla.rl.weight_sync import decode_ipc, decode_tensors

    entries = body.serialized_named_tensors
    if not entries:
        raise InvalidParameter("serialized_named_tensors", "must hold at least one entry")
    if any(isinstance(e, str) for e in entries):
        raise InvalidParameter("serialized_named_tensors",
                               "pickled payloads are refused (unpickling a request body runs arbitrary code); "
                               "send JSON entries from flotilla.rl.weight_sync.encode_tensors / encode_ipc")
    if not all(isinstance(e, list) for e in entries):
        raise InvalidParameter("serialized_named_tensors", "each entry must be a list of tensor objects")
    if body.load_format == "ipc":
        lists = [decode_ipc(e) for e in entries]
        return (lists[0] if len(lists) == 1 else lists), "ipc"
    if len(entries) > 1 and any(e != entries[0] for e in entries[1:]):
        raise InvalidParameter("serialized_named_tensors", "plain tensors are the same for every rank; send one entry")
    return decode_tensors(entries[0]), body.load_format


def _lora_tensors(body: LoraWeightsBody) -> Any:
    """The adapter's new tensors: from ``serialized_named_tensors`` (plain tensors, JSON; one entry) or read from
    ``path`` (a ``.safetensors`` file, or a folder holding ``adapter_model.safetensors``), exactly one of them."""
    import os

    if (body.serialized_named_tensors is None) == (body.path is None):
        raise InvalidParameter("serialized_named_tensors", "give exactly one of serialized_named_tensors or path")
    if body.path is None:
        if body.load_format not in (None, "direct"):
            raise InvalidParameter("load_format", f"adapter tensors travel as plain tensors only (no CUDA IPC), got "
                                                  f"{body.load_format!r}")
        tensors, _ = _tensors(TensorBody(serialized_named_tensors=body.serialized_named_tensors))
        return tensors
    path = os.path.join(body.path, "adapter_model.safetensors") if os.path.isdir(body.path) else body.path
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        raise InvalidParameter("path", f"must be a .safetensors file or a PEFT folder holding "
                                       f"adapter_model.safetensors, got {body.path!r}")
    from safetensors.torch import load_file

    try:
        return list(load_file(path).items())
    except Exception as e:  # a truncated or foreign file
        raise InvalidParameter("path", f"cannot read {path}: {type(e).__name__}: {e}") from None


def add_rl_routes(app: FastAPI, get_engine: Callable[[], RLEngineClient | None],
                  api_key: str | None = None) -> APIRouter:
    """Add the RL control routes to ``app``; ``get_engine()`` returns the engine (None while it loads).
    Handlers are plain functions: FastAPI runs them in its thread pool, since most block until every
    replica answered."""
    router = APIRouter(dependencies=[Depends(bearer_check(api_key))])

    def engine() -> RLEngineClient:
        e = get_engine()
        if e is None:
            from fastapi import HTTPException

            raise HTTPException(503, "the engine is loading")
        return e

    def call(fn: Callable[[], Any], message: str, **extra: Callable[[Any], Any]) -> Any:
        try:
            out = fn()
        except (ValueError, RuntimeError, TimeoutError, TypeError) as e:
            return _fail(e)
        return _ok(message, **{k: f(out) for k, f in extra.items()})

    @router.post("/init_weights_update_group")
    def init_weights_update_group(body: InitGroupBody) -> Any:
        e = engine()
        kw = {} if body.connect_timeout_s is None else {"connect_timeout_s": body.connect_timeout_s}
        return call(lambda: e.init_weights_update_group(body.master_address, body.master_port, body.rank_offset,
                                                         body.world_size, body.group_name, body.backend, **kw),
                    f"joined weight-sync group {body.group_name!r}")

    @router.post("/update_weights_from_distributed")
    def update_weights_from_distributed(body: DistributedBody) -> Any:
        e = engine()
        return call(lambda: e.update_weights_from_distributed(body.names, body.dtypes, body.shapes, body.group_name,
                                                               body.flush_cache, _version(body.weight_version)),
                    "weights updated", weight_version=lambda v: v)

    @router.post("/update_weights_from_tensor")
    def update_weights_from_tensor(body: TensorBody) -> Any:
        e = engine()

        def run() -> int:
            tensors, load_format = _tensors(body)
            return e.update_weights_from_tensor(tensors, load_format, body.flush_cache, _version(body.weight_version))

        return call(run, "weights updated", weight_version=lambda v: v)

    @router.post("/destroy_weights_update_group")
    def destroy_weights_update_group(body: GroupNameBody) -> Any:
        e = engine()
        return call(lambda: e.destroy_weights_update_group(body.group_name),
                    f"left weight-sync group {body.group_name!r}")

    @router.post("/update_weights_from_disk")
    def update_weights_from_disk(body: DiskBody) -> Any:
        e = engine()

        def run() -> tuple[int, int]:
            if body.load_format not in (None, "auto", "safetensors"):
                raise InvalidParameter("load_format",
                                       f"must be None, 'auto' or 'safetensors', got {body.load_format!r}")
            aborted = e.abort_request(abort_all=True) if body.abort_all_requests else 0
            return e.update_weights_from_disk(body.model_path, version=_version(body.weight_version),
                                              flush_cache=body.flush_cache), aborted

        return call(run, "weights updated", weight_version=lambda out: out[0], num_paused_requests=lambda out: out[1])

    @router.post("/pause_generation")
    def pause_generation(body: PauseBody | None = None) -> Any:
        e = engine()
        mode = (body or PauseBody()).mode
        return call(lambda: e.pause_generation(mode), f"generation paused ({mode})")

    @router.post("/continue_generation")
    def continue_generation() -> Any:
        e = engine()
        return call(e.continue_generation, "generation continued")

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    def flush_cache() -> Any:
        e = engine()
        try:
            e.flush_cache()
        except (RuntimeError, ValueError) as err:
            return PlainTextResponse(f"Cache flush failed: {err}", status_code=400)
        return PlainTextResponse("Cache flushed.\n")

    @router.post("/release_memory_occupation")
    def release_memory_occupation(body: TagsBody | None = None) -> Any:
        e = engine()
        return call(lambda: e.release_memory_occupation((body or TagsBody()).tags), "memory released")

    @router.post("/resume_memory_occupation")
    def resume_memory_occupation(body: TagsBody | None = None) -> Any:
        e = engine()
        return call(lambda: e.resume_memory_occupation((body or TagsBody()).tags), "memory resumed")

    @router.api_route("/get_weight_version", methods=["GET", "POST"])
    def get_weight_version() -> Any:
        return {"weight_version": engine().get_weight_version()}

    @router.post("/abort_request")
    def abort_request(body: AbortBody) -> Any:
        e = engine()
        return call(lambda: e.abort_request(body.rid, body.abort_all), "aborted", num_aborted=lambda n: n)

    @router.post("/load_lora_adapter")
    def load_lora_adapter(body: LoraAdapterBody) -> Any:
        e = engine()

        def run() -> list[str]:
            if not body.lora_path:
                raise InvalidParameter("lora_path", "is required")
            e.load_lora_adapter(body.lora_name, body.lora_path)
            return _names(e)

        return call(run, f"LoRA adapter {body.lora_name!r} loaded", loaded_adapters=lambda names: names)

    @router.post("/unload_lora_adapter")
    def unload_lora_adapter(body: LoraAdapterBody) -> Any:
        e = engine()

        def run() -> list[str]:
            e.unload_lora_adapter(body.lora_name)
            return _names(e)

        return call(run, f"LoRA adapter {body.lora_name!r} unloaded", loaded_adapters=lambda names: names)

    @router.post("/update_lora_weights")
    def update_lora_weights(body: LoraWeightsBody) -> Any:
        e = engine()

        def run() -> int:
            tensors = _lora_tensors(body)
            return e.update_lora_weights(body.lora_name, tensors, version=_version(body.weight_version))

        return call(run, f"LoRA adapter {body.lora_name!r} updated", lora_name=lambda _: body.lora_name,
                    version=lambda v: v)

    app.include_router(router)
    return router


def _names(engine: Any) -> list[str]:
    """The loaded adapters' names (sglang answers them after a load or unload)."""
    fn = getattr(engine, "list_lora_adapters", None)
    return [a["name"] for a in fn()] if fn is not None else []
