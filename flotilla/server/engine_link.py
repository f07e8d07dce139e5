"""What crosses between an HTTP process and the engine process (``flotilla serve --api-server-count N``).

With more than one HTTP process the engine lives in the process ``flotilla serve`` started (the engine process);
each HTTP process reaches it through a ``RemoteEngine`` (``remote_engine.py``) and the engine process answers
through an ``EngineService`` (``engine_service.py``). The messages are msgspec structs, msgpack on ZMQ ``ipc://``
sockets inside the engine's private 0700 folder (``flotilla.ipc.channel``): never pickle, and never a socket
another user can reach.

HTTP process -> engine process: ``ApiHello`` (a process started), ``ApiSubmit`` / ``ApiAbort`` (one stream),
``ApiCall`` (any other engine method, by name from ``CALLS``). Engine process -> HTTP process: ``ApiReady`` (the
engine is loaded), ``ApiEvents`` (a batch of stream deltas and stream errors, one frame per event-loop turn per
process) and ``ApiReply`` (one call's answer).

Tensors (weight updates through the RL routes) travel as msgpack extension ``TENSOR_EXT``: a safetensors blob
of one tensor, decoded with ``ext_hook`` on the engine side; no other object type is accepted.
"""

from __future__ import annotations

from typing import Any

import msgspec

from flotilla.errors import InvalidParameter

TENSOR_EXT = 1

#: Engine methods an HTTP process may call by name (``ApiCall.method``), and whether the engine process may answer
#: on its event loop (cheap reads) or must run them in a thread (anything that blocks: scale, updates, loads).
CALLS: dict[str, bool] = {
    "stats": True, "list_lora_adapters": True, "get_weight_version": True,
    "scale": False, "load_lora_adapter": False, "unload_lora_adapter": False, "update_lora_weights": False,
    "init_weights_update_group": False, "update_weights_from_distributed": False,
    "update_weights_from_tensor": False, "destroy_weights_update_group": False, "update_weights_from_disk": False,
    "pause_generation": False, "continue_generation": False, "flush_cache": False,
    "release_memory_occupation": False, "resume_memory_occupation": False, "abort_request": False,
}


class ApiError(msgspec.Struct):
    """An exception carried by kind: ``invalid`` (InvalidParameter: ``param`` and ``allowed`` kept), ``failed``
    (RequestFailed: a 503), ``timeout``, ``value``, ``key``, ``type``, ``runtime`` (anything else)."""

    kind: str
    message: str
    param: str | None = None
    allowed: list[Any] | None = None


# ------------------------------------------------------------------------------ HTTP process -> engine process
class ApiHello(msgspec.Struct, tag=True):
    proc: int          # the HTTP process's slot (0..N-1)
    incarnation: int   # bumped on every restart of that slot: a dead incarnation's late messages are dropped


class ApiSubmit(msgspec.Struct, tag=True):
    proc: int
    incarnation: int
    sid: int                     # the stream's id, unique within the incarnation
    prompt: str | None
    input_ids: list[int] | None
    sampling_params: dict[str, Any] | None
    request_id: str | None
    accepted: bool


class ApiAbort(msgspec.Struct, tag=True):
    proc: int
    incarnation: int
    sid: int


class ApiCall(msgspec.Struct, tag=True):
    proc: int
    incarnation: int
    cid: int
    method: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


ToEngine = ApiHello | ApiSubmit | ApiAbort | ApiCall


# ------------------------------------------------------------------------------ engine process -> HTTP process
class ApiReady(msgspec.Struct, tag=True):
    max_model_len: int
    chat_template: str | None


class ApiEvent(msgspec.Struct, array_like=True):
    """One stream's delta; or the error that ended it (``delta`` None); or, both None, the stream's end."""

    sid: int
    delta: dict[str, Any] | None
    error: ApiError | None = None


class ApiEvents(msgspec.Struct, tag=True):
    events: list[ApiEvent]


class ApiReply(msgspec.Struct, tag=True):
    cid: int
    value: Any = None
    error: ApiError | None = None


FromEngine = ApiReady | ApiEvents | ApiReply


# ------------------------------------------------------------------------------ codecs
def _tensor_blob(t: Any) -> msgspec.msgpack.Ext:
    from safetensors.torch import save

    return msgspec.msgpack.Ext(TENSOR_EXT, save({"t": t.detach().cpu().contiguous()}))


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != TENSOR_EXT:
        raise ValueError(f"unknown msgpack extension {code}")
    from safetensors.torch import load

    return load(bytes(data))["t"]


def pack_tensors(value: Any) -> Any:
    """``value`` with every torch tensor (in lists, tuples and dicts) replaced by its ``TENSOR_EXT`` blob."""
    import torch

    if isinstance(value, torch.Tensor):
        return _tensor_blob(value)
    if isinstance(value, (list, tuple)):
        return [pack_tensors(v) for v in value]
    if isinstance(value, dict):
        return {k: pack_tensors(v) for k, v in value.items()}
    return value


to_engine_decoder = msgspec.msgpack.Decoder(ToEngine, ext_hook=_ext_hook)
from_engine_decoder = msgspec.msgpack.Decoder(FromEngine)


def error_of(e: BaseException) -> ApiError:
    from flotilla.frontend.request import RequestFailed

    if isinstance(e, InvalidParameter):
        return ApiError("invalid", e.message, e.field, e.allowed)
    for kind, cls in (("failed", RequestFailed), ("timeout", TimeoutError), ("key", KeyError),
                      ("type", TypeError), ("value", ValueError)):
        if isinstance(e, cls):
            return ApiError(kind, str(e.args[0]) if kind == "key" and e.args else str(e))
    return ApiError("runtime", f"{type(e).__name__}: {e}")


def exception_of(err: ApiError) -> BaseException:
    """The exception ``error_of`` described, of the same class where the server tells classes apart."""
    from flotilla.frontend.request import RequestFailed

    if err.kind == "invalid":
        return InvalidParameter(err.param or "request", err.message, err.allowed)
    cls: type[BaseException] = {"failed": RequestFailed, "timeout": TimeoutError, "key": KeyError,
                                "type": TypeError, "value": ValueError}.get(err.kind, RuntimeError)
    return cls(err.message)
