"""Serving with Ray Serve: ``build_openai_app(FlotillaServeConfig(...))`` is a Serve application with the OpenAI routes.

Two deployments, the shape of ``ray.serve.llm``'s OpenAI app:

* ``FlotillaIngress``: the FastAPI app of ``flotilla.server`` (the same routes, errors and SSE streaming as
  ``flotilla serve``) behind Serve's HTTP proxy. It holds a tokenizer, never weights, and reaches the engines
  through a ``DeploymentHandle`` wrapped as the server's ``EngineClient``; so it scales on its own.
* ``FlotillaEngine``: each replica owns one Flotilla engine (with its own dp/tp inside), built in ``__init__``.
  ``num_replicas`` / ``autoscaling_config`` are Serve's. Requests reach it as token ids, which is what lets a
  request router route on the prompt: the proxy-to-ingress hop carries only an ASGI scope, no body.

``prefix_affinity=True`` installs ``PrefixAffinityRouter`` (Serve's custom request router API) on the engine
deployment: a request goes to the replica that rendezvous hashing assigns to its prompt's first whole KV blocks,
so requests sharing a prefix find it in that replica's prefix cache; unless that replica is busier than the least
busy by ``affinity_imbalance`` requests, or full, when Serve's usual least-loaded choice applies.

LoRA adapters: ``engine_kwargs={"lora_modules": {name: folder}}`` (``enable_lora`` is implied) loads them on every
engine replica at start; a request's ``model`` naming one runs with it, as under ``flotilla serve``, and
``/v1/models`` lists them. ``POST /v1/load_lora_adapter`` through the ingress loads the adapter on one engine
replica (which checks it: a bad folder is a 400) and records it in the ingress; the other replicas load it the first
time a request for it reaches them (the ingress sends the folder along), so every replica serves every adapter
without the ingress having to reach each one. ``/v1/unload_lora_adapter`` forgets it in the ingress (requests for
it are then 404s) and unloads it on one replica; the others drop it when it is loaded again under that name.
Adapters loaded at run time live in the ingress replica that loaded them: keep ``ingress_replicas=1`` for them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from flotilla.errors import InvalidParameter
from flotilla.integrations.config_args import config_from_args
from flotilla.integrations.engine_options import (check_engine_options, imply_lora, positive_int, rank_count,
                                                  with_device)
from flotilla.frontend.request import RequestFailed

log = logging.getLogger(__name__)

LAUNCHERS = ("ray", "mp")
STATS_PERIOD_S = 2.0


@dataclass
class FlotillaServeConfig:
    """The application: one model, its engines and how requests reach them.

    ``model_source``: a checkpoint folder visible on every node (the ingress loads its tokenizer).
    ``engine_kwargs``: ``EngineConfig`` options of each replica's engine, checked here. ``served_model_name``: the
    name clients pass as ``model`` (default: ``model_source``). ``api_key``: required on every route when set.

    Engine deployment: ``num_replicas`` (an int, or "auto" with ``autoscaling_config``), ``autoscaling_config``
    (Serve's dict: ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``...), ``max_ongoing_requests``
    per replica (default 4 x the engine's running batch, so the engine's queue and not Serve's holds the backlog).
    ``launcher``: ``"ray"`` (default) runs the ranks as Ray actors in the replica's placement group (one bundle for
    the replica, one per rank), so Serve reserves a whole engine per replica and the ranks die with it; ``"mp"``
    runs them as child processes, the replica then asks for ``num_gpus`` = ranks. ``engine_options``: any other
    ``serve.deployment`` option (``health_check_period_s``, ``ray_actor_options``...), applied last.
    ``accelerator_type`` (``"H100"``, ``"A10G"``...): the ranks' GPUs must be of that type (Ray's
    ``accelerator_type:<type>`` node resource, asked of each rank bundle, as ``ray.serve.llm`` does).

    ``prefix_affinity``: route by prompt prefix (``PrefixAffinityRouter``); ``affinity_prefix_tokens`` (the prefix
    hashed, rounded down to whole KV blocks) and ``affinity_imbalance`` (ongoing requests more than the least busy
    replica before affinity yields). ``ingress_replicas`` / ``ingress_options``: the ingress deployment's.
    """

    model_source: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    served_model_name: str | None = None
    api_key: str | None = None
    num_replicas: int | str | None = 1
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int | None = None
    launcher: str = "ray"
    gpus_per_rank: float = 1.0
    accelerator_type: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    prefix_affinity: bool = False
    affinity_prefix_tokens: int = 256
    affinity_imbalance: int = 16
    ingress_replicas: int = 1
    ingress_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.engine_kwargs = imply_lora(self.engine_kwargs)
        self.engine_config = check_engine_options(self.model_source, self.engine_kwargs)
        for name in ("served_model_name", "api_key", "accelerator_type"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidParameter(name, f"must be a non-empty str or None, got {value!r}")
        n = self.num_replicas
        if self.autoscaling_config is not None:
            if not isinstance(self.autoscaling_config, dict):
                raise InvalidParameter("autoscaling_config", f"must be a dict, got {self.autoscaling_config!r}")
            if n not in (None, "auto", 1):
                raise InvalidParameter("num_replicas", f"must be 'auto' or None with autoscaling_config, got {n!r}")
            self.num_replicas = "auto" if n == "auto" else None
        elif n != "auto" and not positive_int(n):
            raise InvalidParameter("num_replicas", f"must be an int >= 1 or 'auto', got {n!r}")
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = 4 * self.engine_config.max_num_seqs * self.engine_config.dp_size
        for name in ("max_ongoing_requests", "affinity_prefix_tokens", "affinity_imbalance", "ingress_replicas"):
            if not positive_int(getattr(self, name)):
                raise InvalidParameter(name, f"must be an int >= 1, got {getattr(self, name)!r}")
        if self.launcher not in LAUNCHERS:
            raise InvalidParameter("launcher", f"must be one of {list(LAUNCHERS)}, got {self.launcher!r}")
        for name in ("engine_options", "ingress_options"):
            if not isinstance(getattr(self, name), dict):
                raise InvalidParameter(name, f"must be a dict of serve.deployment options, got {getattr(self, name)!r}")
        if not isinstance(self.prefix_affinity, bool):
            raise InvalidParameter("prefix_affinity", f"must be a bool, got {self.prefix_affinity!r}")

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "FlotillaServeConfig":
        """The config from Ray's application arguments (a dict; command-line strings read as each field's type;
        unknown keys refused naming them)."""
        return config_from_args(cls, args)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_source

    @property
    def ranks(self) -> int:
        return rank_count(self.engine_config)

    def resolved(self, on_gpu: bool) -> "FlotillaServeConfig":
        """This config with ``device="auto"`` decided here: a replica holds no GPU itself (its placement group's
        rank bundles do), so inside it CUDA is hidden and the engine would pick the CPU."""
        kwargs = with_device(self.engine_kwargs, self.engine_config, on_gpu)
        return self if kwargs is None else dataclasses.replace(self, engine_kwargs=kwargs)

    def engine_deployment_options(self, on_gpu: bool) -> dict[str, Any]:
        """``serve.deployment`` options of the engine deployment."""
        opts: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests,
                                "autoscaling_config": self.autoscaling_config}
        if self.num_replicas is not None:
            opts["num_replicas"] = self.num_replicas
        if self.launcher == "ray":
            rank: dict[str, float] = {"CPU": 1, "GPU": 1} if on_gpu else {"CPU": 1}
            if self.accelerator_type is not None:
                rank[f"accelerator_type:{self.accelerator_type}"] = 0.001
            opts["ray_actor_options"] = {"num_cpus": 1}
            opts["placement_group_bundles"] = [{"CPU": 1}] + [dict(rank) for _ in range(self.ranks)]
            opts["placement_group_strategy"] = "PACK"
        else:
            opts["ray_actor_options"] = {"num_cpus": 1, **({"num_gpus": self.ranks} if on_gpu else {})}
            if self.accelerator_type is not None:
                opts["ray_actor_options"]["accelerator_type"] = self.accelerator_type
        if self.prefix_affinity:
            opts["request_router_config"] = {
                "request_router_class": PrefixAffinityRouter,
                "request_router_kwargs": {"prefix_tokens": self.affinity_prefix_tokens,
                                          "block_size": self.engine_config.block_size,
                                          "imbalance": self.affinity_imbalance}}
        opts.update(self.engine_options)
        return opts


# ---------------------------------------------------------------------------------------------- routing
def prefix_key(input_ids: Sequence[int] | None, prefix_tokens: int, block_size: int) -> bytes | None:
    """The routing key of a prompt: its first whole KV blocks, at most ``prefix_tokens`` tokens (only whole
    blocks are cached, and the last prompt token is never served from the cache). None for prompts shorter than
    a block: they have nothing to share, so they go where the load is lowest."""
    if not input_ids:
        return None
    n = min(len(input_ids) - 1, prefix_tokens) // block_size * block_size
    if n <= 0:
        return None
    return b",".join(str(int(t)).encode() for t in input_ids[:n])


def rendezvous_order(key: bytes, replica_ids: Sequence[str]) -> list[int]:
    """Indices of ``replica_ids``, the key's preferred replica first (highest-random-weight hashing): when a
    replica joins or leaves, only the keys it wins or held move, so the other replicas' caches stay useful."""
    def weight(rid: str) -> bytes:
        return hashlib.blake2b(key + b"|" + rid.encode(), digest_size=8).digest()

    return sorted(range(len(replica_ids)), key=lambda i: weight(replica_ids[i]), reverse=True)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Serve request router for ``FlotillaEngine``: a ``stream`` request's preferred replica is the one its
    prompt prefix hashes to; the rest follow as the fallback rank (Serve probes a rank and takes its least
    loaded replica that accepts, so a full preferred replica never blocks a request)."""

    def initialize_state(self, prefix_tokens: int = 256, block_size: int = 16, imbalance: int = 16, **_: Any) -> None:
        self.prefix_tokens, self.block_size, self.imbalance = prefix_tokens, block_size, imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = None
        if pending_request is not None and pending_request.metadata.call_method == "stream":
            key = prefix_key(_stream_input_ids(pending_request), getattr(self, "prefix_tokens", 256),
                             getattr(self, "block_size", 16))
        if key is None or len(candidate_replicas) == 1:
            return [candidate_replicas]
        order = rendezvous_order(key, [r.replica_id.unique_id for r in candidate_replicas])
        ranked = [candidate_replicas[i] for i in order]
        if self._busier_than_rest(ranked):
            return [ranked[1:], ranked[:1]]
        return [ranked[:1], ranked[1:]]

    def _busier_than_rest(self, ranked: list[RunningReplica]) -> bool:
        cache = self.replica_queue_len_cache
        lens = [cache.get(r.replica_id) or 0 for r in ranked]
        return lens[0] - min(lens[1:]) > getattr(self, "imbalance", 16)


def _stream_input_ids(pending: PendingRequest) -> Sequence[int] | None:
    ids = pending.args[0] if pending.args else pending.kwargs.get("input_ids")
    return ids if isinstance(ids, (list, tuple)) else None


# ---------------------------------------------------------------------------------------------- engine replicas
class FlotillaEngineReplica:
    """One Serve replica: one engine, built in ``__init__`` (in the replica's own placement group with the Ray
    launcher), shut down in ``__del__`` (Serve's graceful stop)."""

    def __init__(self, config: FlotillaServeConfig):
        kwargs = dict(config.engine_kwargs)
        if config.launcher == "ray":
            from flotilla.frontend.ray_engine import RayEngine

            self.engine = RayEngine(model=config.model_source, gpus_per_rank=config.gpus_per_rank, **kwargs)
        else:
            from flotilla.frontend.engine import Engine

            self.engine = Engine(model=config.model_source, **kwargs)  # type: ignore[assignment]
        # adapters loaded at run time through the ingress: name -> the load's token (a new load of a name, even
        # from the same folder, replaces what this replica holds)
        self._lora_tokens: dict[str, str] = {}
        self._lora_lock = asyncio.Lock()

    async def stream(self, input_ids: list[int] | None, params: dict[str, Any] | None, request_id: str | None,
                     prompt: str | None = None, lora: tuple[str, str, str] | None = None, accepted: bool = False
                     ) -> AsyncIterator[dict[str, Any]]:
        """The engine's deltas; Serve cancelling the call (the ingress aborted) closes this, which aborts it.
        ``lora``: (name, folder, token) of an adapter the ingress loaded at run time, loaded here first if this
        replica does not hold that load of it yet."""
        if lora is not None:
            await self._ensure_lora(*lora)
        async for delta in self.engine.stream_async(prompt, params, input_ids=input_ids, request_id=request_id,
                                                    accepted=accepted):
            yield delta

    async def _ensure_lora(self, name: str, path: str, token: str) -> None:
        async with self._lora_lock:
            if self._lora_tokens.get(name) == token:
                return
            loaded = {a["name"] for a in await asyncio.to_thread(self.engine.list_lora_adapters)}
            if name in loaded:
                await asyncio.to_thread(self.engine.unload_lora_adapter, name)
            await asyncio.to_thread(self.engine.load_lora_adapter, name, path)
            self._lora_tokens[name] = token

    async def load_lora_adapter(self, name: str, path: str, token: str) -> dict[str, Any]:
        """Load (and so check) an adapter for the ingress; returns its entry of ``list_lora_adapters``. A copy
        this replica still holds under that name (the ingress unloaded it on another replica) is replaced."""
        await self._ensure_lora(name, path, token)
        async with self._lora_lock:
            adapters = await asyncio.to_thread(self.engine.list_lora_adapters)
        return next((a for a in adapters if a["name"] == name), {"name": name, "path": path})

    async def unload_lora_adapter(self, name: str) -> None:
        async with self._lora_lock:
            self._lora_tokens.pop(name, None)
            await asyncio.to_thread(self.engine.unload_lora_adapter, name)

    def info(self) -> dict[str, Any]:
        """What the ingress needs at start: the context length and the adapters every replica loaded."""
        adapters = self.engine.list_lora_adapters() if hasattr(self.engine, "list_lora_adapters") else []
        return {"max_model_len": self.engine.max_model_len, "lora_adapters": adapters}

    def stats(self) -> dict[str, Any]:
        return self.engine.stats().to_dict()

    def check_health(self) -> None:
        """Serve replaces the replica when this raises: the engine loop stopped, or every engine replica is down
        (the engine's own failover restarts single replicas first; this is for when it has given up)."""
        stats = self.engine.stats()
        if not stats.get("engine_loop_alive", True):
            raise RuntimeError("the engine loop stopped")
        if not any(r.get("alive") for r in stats.get("replicas", [])):
            raise RuntimeError("no engine replica is alive")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# ---------------------------------------------------------------------------------------------- the ingress
class ServeEngineClient:
    """The server's ``EngineClient`` over a ``DeploymentHandle`` to the engine deployment.

    Errors keep their meaning across the hop: a ``ValueError`` raised by the engine's validation is re-raised as
    itself (a 400 naming the field), a ``RequestFailed`` as itself (a 503), and a replica that died under a
    request becomes ``RequestFailed`` (a 503 before the first token, an error event in the stream after it).
    ``stats()`` is synchronous in the protocol (``/health`` calls it on the event loop), so it returns the last
    answer of a poll every ``STATS_PERIOD_S`` instead of waiting on a replica.

    LoRA: the adapters every engine replica loaded at start (``lora_adapters``), plus those loaded through this
    client at run time, which travel with each request naming them (``lora``: name, folder, the load's token) so
    that a replica that lacks them loads them first. ``load_lora_adapter`` / ``unload_lora_adapter`` are
    coroutines (the server awaits them): each reaches one engine replica.
    """

    def __init__(self, handle: Any, tokenizer: Any, max_model_len: int,
                 lora_adapters: Sequence[Mapping[str, Any]] = ()):
        self._handle = handle
        self._stream = handle.options(method_name="stream", stream=True)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._stats: dict[str, Any] | None = None
        self._adapters: dict[str, dict[str, Any]] = {str(a["name"]): dict(a) for a in lora_adapters}
        self._runtime: dict[str, tuple[str, str, str]] = {}  # adapters loaded here at run time: name -> lora

    async def stream_async(self, prompt: str | None = None, sampling_params: Mapping[str, Any] | None = None, *,
                           input_ids: list[int] | None = None, request_id: str | None = None,
                           accepted: bool = False) -> AsyncIterator[dict[str, Any]]:
        params = dict(sampling_params) if sampling_params is not None else None
        lora = self._runtime.get(params.get("lora_name")) if params else None  # type: ignore[arg-type]
        extra: dict[str, Any] = {"lora": lora} if lora is not None else {}
        if accepted:
            extra["accepted"] = True
        gen = self._stream.remote(list(input_ids) if input_ids is not None else None, params, request_id, prompt,
                                  **extra)
        finished = False
        try:
            async for delta in gen:
                finished = bool(delta.get("finished"))
                yield delta
        except Exception as e:
            raise translate_error(e) from None
        finally:
            if not finished:
                gen.cancel()

    async def refresh_stats(self) -> None:
        try:
            self._stats = await self._handle.stats.remote()
        except Exception as e:  # a replica restarting: /health says so until one answers again
            log.warning("engine stats: %s", e)
            self._stats = None

    async def poll_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_PERIOD_S)
            await self.refresh_stats()

    def stats(self) -> dict[str, Any]:
        """The last stats one engine replica gave (Serve's own metrics cover the deployment as a whole); raises
        while none has answered, which /health reports as 503."""
        if self._stats is None:
            raise RuntimeError("no engine replica has answered yet")
        return self._stats

    def scale(self, dp_size: int, drain_timeout_s: float = 60.0) -> None:
        raise InvalidParameter("dp_size", "under Ray Serve the number of engines is Serve's: set num_replicas or "
                                          "autoscaling_config on the application")

    def list_lora_adapters(self) -> list[dict[str, Any]]:
        return [dict(a) for a in self._adapters.values()]

    async def load_lora_adapter(self, name: str, path: str) -> None:
        if name in self._adapters:
            raise InvalidParameter("lora_name", f"LoRA adapter {name!r} is already loaded")
        token = uuid.uuid4().hex
        try:
            entry = await self._handle.load_lora_adapter.remote(name, path, token)
        except Exception as e:
            raise translate_error(e) from None
        self._adapters[name] = dict(entry)
        self._runtime[name] = (name, path, token)

    async def unload_lora_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise InvalidParameter("lora_name", f"unknown LoRA adapter {name!r}; loaded: {sorted(self._adapters)}")
        self._runtime.pop(name, None)
        try:  # best effort: the replica reached may be one that never loaded it
            await self._handle.unload_lora_adapter.remote(name)
        except Exception as e:
            log.info("unloading LoRA adapter %r on one engine replica: %s", name, translate_error(e))


def translate_error(e: BaseException) -> BaseException:
    """What a handle raised, as the server's error types."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, InvalidParameter):
            return InvalidParameter(cause.field, cause.message, cause.allowed)
        if isinstance(cause, ValueError):
            return ValueError(str(cause))
        if isinstance(cause, RequestFailed):
            return RequestFailed(str(cause))
        if isinstance(cause, (RayActorError, asyncio.CancelledError)):
            return RequestFailed(f"the engine replica running this request died: {cause}")
        return e
    if isinstance(e, RayActorError):
        return RequestFailed(f"the engine replica running this request died: {type(e).__name__}")
    return e


class FlotillaIngress:
    """The OpenAI routes of ``flotilla.server`` as a Serve ingress (the app is built per replica, after
    ``__init__``, through ``__serve_build_asgi_app__``)."""

    async def __init__(self, engine: Any, config: FlotillaServeConfig):  # type: ignore[misc]  # Serve awaits it
        from transformers import AutoTokenizer

        from flotilla.server import build_app

        tokenizer = AutoTokenizer.from_pretrained(config.engine_config.tokenizer or config.model_source)
        info = await engine.info.remote()
        self._client = ServeEngineClient(engine, tokenizer, int(info["max_model_len"]), info.get("lora_adapters", ()))
        await self._client.refresh_stats()
        self._poller = asyncio.get_running_loop().create_task(self._client.poll_stats())
        self._app = build_app(self._client, config.model_name, config.api_key)  # type: ignore[arg-type]

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


# ---------------------------------------------------------------------------------------------- the application
def build_openai_app(config: FlotillaServeConfig | Mapping[str, Any]) -> Any:
    """The Serve application (``serve.run(build_openai_app(cfg), name=..., route_prefix="/")``): the OpenAI
    routes at ``/v1/...`` through Serve's HTTP proxy, streaming included.

    ``config`` is a ``FlotillaServeConfig`` or a dict of its fields, which is how Ray calls an application
    builder: ``serve run flotilla.integrations.ray_serve:build_openai_app model_source=PATH ...`` (string values,
    read as each field's type: ``num_replicas=2``, ``engine_kwargs='{"device": "cpu"}'``) and a Serve config
    file's ``args:``. An unknown key fails naming it. (The one parameter has no pydantic annotation, so Serve
    hands the dict over as is.)"""
    import inspect

    if isinstance(config, Mapping):
        config = FlotillaServeConfig.from_args(config)
    if not isinstance(config, FlotillaServeConfig):
        raise InvalidParameter("config",
                               f"must be a FlotillaServeConfig or a dict of its fields, got {type(config).__name__}")
    if inspect.signature(serve.ingress).parameters["app"].default is not None:
        raise RuntimeError("build_openai_app needs a Ray Serve whose serve.ingress() takes no app "
                           "(__serve_build_asgi_app__); install ray[serve]>=2.60")
    on_gpu = _on_gpu(config)
    config = config.resolved(on_gpu)
    engine_cls = serve.deployment(name="FlotillaEngine")(FlotillaEngineReplica)
    engine = engine_cls.options(**config.engine_deployment_options(on_gpu)).bind(config)
    ingress_opts: dict[str, Any] = {"num_replicas": config.ingress_replicas, "max_ongoing_requests": 4096,
                                    "ray_actor_options": {"num_cpus": 1}}
    ingress_opts.update(config.ingress_options)
    ingress_cls = serve.deployment(name="FlotillaIngress")(serve.ingress()(FlotillaIngress))
    return ingress_cls.options(**ingress_opts).bind(engine, config)


def _on_gpu(config: FlotillaServeConfig) -> bool:
    """Whether the ranks need GPU bundles: ``device="cuda"``, or ``"auto"`` on a cluster (or, before
    ``ray.init``, a machine) that has GPUs."""
    device = config.engine_config.device
    if device != "auto":
        return device == "cuda"
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()
