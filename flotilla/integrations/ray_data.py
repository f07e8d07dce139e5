"""Batch inference with Ray Data: ``build_processor(FlotillaProcessorConfig(...), preprocess, postprocess)``.

Shaped like ``ray.data.llm.build_processor``: the processor is ``preprocess`` (a row map), then one Flotilla engine
per Ray Data actor (an actor pool over ``map_batches``, sized by ``concurrency``), then ``postprocess``. Rows stream
through; nothing is materialized.

Each actor submits a whole batch to its engine at once (through the async API, on one event loop the actor owns),
and runs up to ``max_concurrent_batches`` batches together, so the engine's scheduler always has the next batch's
requests queued while the current one drains: one batch at a time would idle the engine on each batch's longest
request.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flotilla.errors import InvalidParameter, type_name
from flotilla.integrations.engine_options import (check_engine_options, imply_lora, positive_int, rank_count,
                                                  with_device)

if TYPE_CHECKING:
    import pyarrow
    import ray.data

Row = dict[str, Any]
LAUNCHERS = ("ray", "mp")
ERROR_COLUMN = "__inference_error__"
OUTPUT_COLUMNS = ("generated_text", "generated_token_ids", "num_input_tokens", "num_generated_tokens")
# map_batches' own parameters; other actor options go through its (deprecated) **ray_remote_args
_NAMED_MAP_ARGS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "runtime_env", "label_selector")
# OpenAI/vLLM spellings a preprocess may use, as the engine's field names
SAMPLING_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}


@dataclass
class FlotillaProcessorConfig:
    """How many engines run, what each is, and how rows are batched into them.

    ``model_source``: a Hugging Face checkpoint folder visible on every node. ``engine_kwargs``: ``EngineConfig``
    options for each engine (``tp_size``, ``dp_size``, ``device``...), checked here, in the driver. ``concurrency``:
    engines (actors), an int for a fixed pool or ``(min, max)`` for an autoscaling one. ``batch_size``: rows per
    ``map_batches`` call. ``max_concurrent_batches``: batches one actor runs at once.

    ``launcher``: ``"ray"`` (default) builds a ``RayEngine``: the ranks are Ray actors, owned by the Ray Data actor
    (so they die with it), on a placement group of one bundle per rank (1 CPU, plus ``gpus_per_rank`` GPU on CUDA)
    that a detached holder keeps while the actor lives (``group_holder.py``), so Ray accounts for every rank.
    ``"mp"`` builds an ``Engine``: the ranks are child processes of the actor, which must then hold the devices
    itself (it asks ``num_gpus`` = ranks on CUDA); Ray does not count their CPUs.
    ``ray_remote_args``: extra options for the actors (``num_cpus``, ``num_gpus``, ``resources``, ``memory``...),
    over the defaults (1 CPU: the engine's front end, tokenizer and loop). ``gpus_per_rank``: RayEngine's GPU share.

    ``should_continue_on_error``: a row whose request fails gets ``__inference_error__`` (its error) and None
    outputs instead of failing the dataset. ``runtime_env``: the actors' Ray runtime environment.

    LoRA: ``engine_kwargs={"lora_modules": {name: folder}}`` (folders visible on every node; ``enable_lora`` is
    implied) loads the adapters in every engine; a row runs with the adapter its ``lora_name`` column names (or
    ``sampling_params["lora_name"]``; None: the base model), so one batch mixes adapters.
    """

    model_source: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    concurrency: int | tuple[int, int] = 1
    batch_size: int = 32
    max_concurrent_batches: int = 4
    launcher: str = "ray"
    gpus_per_rank: float = 1.0
    ray_remote_args: dict[str, Any] = field(default_factory=dict)
    runtime_env: dict[str, Any] | None = None
    should_continue_on_error: bool = False

    def __post_init__(self) -> None:
        self.engine_kwargs = imply_lora(self.engine_kwargs)
        self.engine_config = check_engine_options(self.model_source, self.engine_kwargs)
        self.concurrency = _check_concurrency(self.concurrency)
        for name in ("batch_size", "max_concurrent_batches"):
            if not positive_int(getattr(self, name)):
                raise InvalidParameter(name, f"must be an int >= 1, got {getattr(self, name)!r}")
        if self.launcher not in LAUNCHERS:
            raise InvalidParameter("launcher", f"must be one of {list(LAUNCHERS)}, got {self.launcher!r}")
        if not isinstance(self.ray_remote_args, dict):
            raise InvalidParameter("ray_remote_args", f"must be a dict, got {self.ray_remote_args!r}")
        if "max_concurrency" in self.ray_remote_args:
            raise InvalidParameter("ray_remote_args", "set max_concurrent_batches instead of max_concurrency")
        if "runtime_env" in self.ray_remote_args:
            raise InvalidParameter("ray_remote_args", "set runtime_env as its own field")
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            raise InvalidParameter("runtime_env", f"must be a dict, got {self.runtime_env!r}")
        if not isinstance(self.should_continue_on_error, bool):
            raise InvalidParameter("should_continue_on_error", f"must be a bool, got {self.should_continue_on_error!r}")

    @property
    def ranks(self) -> int:
        """Rank processes per engine."""
        return rank_count(self.engine_config)

    def actor_options(self, cluster_has_gpus: bool) -> dict[str, Any]:
        """The Ray options of each engine actor (its concurrency is the compute strategy's, see ``compute``)."""
        device = self.engine_config.device
        on_gpu = device == "cuda" or (device == "auto" and cluster_has_gpus)
        opts: dict[str, Any] = {"num_cpus": 1}
        if self.launcher == "mp" and on_gpu:
            opts["num_gpus"] = self.ranks
        opts.update(self.ray_remote_args)
        if self.runtime_env is not None:
            opts["runtime_env"] = self.runtime_env
        return opts

    def resolved(self, cluster_has_gpus: bool) -> "FlotillaProcessorConfig":
        """This config with ``device="auto"`` decided here, in the driver: inside an actor that holds no GPU
        (the engine's group holds them), CUDA is hidden, and the engine would pick the CPU."""
        kwargs = with_device(self.engine_kwargs, self.engine_config, cluster_has_gpus)
        return self if kwargs is None else dataclasses.replace(self, engine_kwargs=kwargs)

    def compute(self) -> Any:
        """The actor pool: fixed or autoscaling, and ``max_concurrent_batches`` calls of the UDF running at once
        in each actor (Ray Data runs one at a time unless told that the UDF is thread-safe, which it is: each
        call only submits to the engine and waits on the actor's event loop)."""
        import inspect

        from ray.data import ActorPoolStrategy

        size = ({"size": self.concurrency} if isinstance(self.concurrency, int)
                else {"min_size": self.concurrency[0], "max_size": self.concurrency[1]})
        k = self.max_concurrent_batches
        extra: dict[str, Any] = {"max_tasks_in_flight_per_actor": 2 * k}
        params = inspect.signature(ActorPoolStrategy).parameters
        if "max_concurrent_calls_per_actor" in params:
            extra["max_concurrent_calls_per_actor"] = k
        if "enable_true_multi_threading" in params:
            extra["enable_true_multi_threading"] = k > 1
        return ActorPoolStrategy(**size, **extra)  # type: ignore[arg-type]


def _check_concurrency(value: Any) -> int | tuple[int, int]:
    if positive_int(value):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and positive_int(value[0]) and positive_int(value[1]) \
            and value[0] <= value[1]:
        return (value[0], value[1])
    raise InvalidParameter("concurrency",
                           f"must be an int >= 1 or a (min, max) pair with 1 <= min <= max, got {value!r}")


# ---------------------------------------------------------------------------------------------- one row
def sampling_of(row: Row) -> dict[str, Any]:
    """A row's ``sampling_params`` as engine fields. Arrow fills a key that other rows have and this one lacks
    with None, so None means "not set"; OpenAI/vLLM names (``max_tokens``) are accepted. A ``lora_name`` column
    (the row's LoRA adapter) goes in as ``lora_name``; it must agree with one inside ``sampling_params``."""
    out = _sampling_fields(row)
    lora = row.get("lora_name")
    if lora is not None:
        if out.get("lora_name") not in (None, lora):
            raise InvalidParameter("lora_name", f"the column says {lora!r} but sampling_params says "
                                                f"{out['lora_name']!r}")
        out["lora_name"] = lora
    return out


def _sampling_fields(row: Row) -> dict[str, Any]:
    raw = row.get("sampling_params")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidParameter("sampling_params", f"must be a dict, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        name = SAMPLING_ALIASES.get(key, key)
        if name in out:
            raise InvalidParameter("sampling_params", f"{key!r} and another spelling of {name!r} are both set")
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def row_input(row: Row, tokenizer: Any) -> tuple[str | None, list[int] | None]:
    """(prompt, input_ids) of a row that has exactly one of ``prompt``, ``messages`` or ``input_ids``."""
    given = [k for k in ("prompt", "messages", "input_ids") if row.get(k) is not None]
    if len(given) != 1:
        raise InvalidParameter("preprocess",
                               f"a row needs exactly one of prompt, messages or input_ids, got {given or 'none'}")
    if given[0] == "prompt":
        return row["prompt"], None
    if given[0] == "input_ids":
        return None, [int(t) for t in row["input_ids"]]
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages", "must be a non-empty list of {role, content} dicts")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParameter("messages", "the model's tokenizer has no chat template; pass prompt or input_ids")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return None, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def result_columns(result: dict[str, Any]) -> Row:
    return {"generated_text": result["text"], "generated_token_ids": list(result["token_ids"]),
            "num_input_tokens": result["prompt_tokens"], "num_generated_tokens": result["completion_tokens"]}


class RowFailed(RuntimeError):
    """A row's request failed (bad input, or its replicas died) and ``should_continue_on_error`` is off."""


# ---------------------------------------------------------------------------------------------- the stage
class FlotillaStage:
    """The callable class Ray Data runs in each actor: one engine, built in ``__init__`` (ranks start with
    'spawn', so never at import), and one event loop in a thread that every batch's requests run on."""

    def __init__(self, config: FlotillaProcessorConfig):
        self.config = config
        self.engine: Any = None
        self._group: Any = None
        kwargs = dict(config.engine_kwargs)
        if config.launcher == "ray":
            from flotilla.integrations.group_holder import HeldGroup, rank_bundles
            from flotilla.frontend.ray_engine import RayEngine

            on_gpu = config.engine_config.device == "cuda"  # resolved in the driver (see Processor)
            self._group = HeldGroup(rank_bundles(config.ranks, on_gpu, config.gpus_per_rank))
            try:
                self.engine = RayEngine(model=config.model_source, placement_group=self._group.pg,
                                        gpus_per_rank=config.gpus_per_rank, **kwargs)
            except BaseException:
                self._group.close()
                raise
        else:
            from flotilla.frontend.engine import Engine

            self.engine = Engine(model=config.model_source, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="flotilla-ray-data", daemon=True)
        self._thread.start()
        # Ray Data usually ends its actors with ray.kill, when nothing of this runs; the engine's ranks die with
        # the actor (their owner) and its placement group with the holder's heartbeat (group_holder.py). On a
        # graceful exit (an autoscaling pool shrinking) this hook, registered after Ray connected, runs first.
        atexit.register(_close_if_alive, weakref.ref(self))

    def __call__(self, batch: "pyarrow.Table") -> "pyarrow.Table":
        import pyarrow as pa

        rows = batch.to_pylist()
        outs = asyncio.run_coroutine_threadsafe(self._run(rows), self._loop).result()
        return pa.Table.from_pylist(outs)

    async def _run(self, rows: list[Row]) -> list[Row]:
        results = await asyncio.gather(*(self._one(row) for row in rows), return_exceptions=True)
        out: list[Row] = []
        for i, (row, res) in enumerate(zip(rows, results)):
            if isinstance(res, BaseException):
                if not self.config.should_continue_on_error or not isinstance(res, Exception):
                    raise RowFailed(f"row {i} of its batch failed: {type_name(res)}: {res}") from res
                out.append({**row, **{c: None for c in OUTPUT_COLUMNS}, ERROR_COLUMN: f"{type_name(res)}: {res}"})
            else:
                extra = {ERROR_COLUMN: None} if self.config.should_continue_on_error else {}
                out.append({**row, **res, **extra})
        return out

    async def _one(self, row: Row) -> Row:
        prompt, ids = row_input(row, self.engine.tokenizer)
        result = await self.engine.generate_async(prompt, sampling_of(row), input_ids=ids)
        if result.get("finish_reason") == "error":
            from flotilla.frontend.request import RequestFailed

            raise RequestFailed(result.get("error") or "the request failed")
        return result_columns(result)

    def close(self) -> None:
        """Shut the engine down (its ranks, and the placement group it made) and stop the loop. Idempotent."""
        engine, self.engine = getattr(self, "engine", None), None
        group, self._group = getattr(self, "_group", None), None
        try:
            if engine is not None:
                engine.shutdown()
        finally:
            if group is not None:
                group.close()
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)

    def __del__(self) -> None:
        self.close()


def _close_if_alive(ref: "weakref.ref[FlotillaStage]") -> None:
    stage = ref()
    if stage is not None:
        stage.close()


# ---------------------------------------------------------------------------------------------- the processor
class KeepColumns:
    """``preprocess`` as Ray Data runs it: its output merged over the input row, as ``ray.data.llm`` does, so a
    column the dataset carried (an id, nested metadata) reaches ``postprocess`` without ``preprocess`` having to
    copy it; on a name clash ``preprocess``'s value wins (and the engine stage's columns win over both). A class,
    not a closure, so the wrapped function pickles as itself."""

    def __init__(self, fn: Callable[[Row], Row]):
        self.fn = fn

    def __call__(self, row: Row) -> Row:
        out = self.fn(row)
        if not isinstance(out, dict):
            raise InvalidParameter("preprocess", f"must return a dict (the row), got {type(out).__name__}")
        return {**row, **out}


class Processor:
    """``processor(ds)`` returns the dataset with the generation columns added (lazily, like any Ray Data op).
    ``stage_cls`` is the callable class each actor runs; a subclass of ``FlotillaStage`` can wrap it (the
    benchmark's timed stage does)."""

    stage_cls: type = FlotillaStage

    def __init__(self, config: FlotillaProcessorConfig, preprocess: Callable[[Row], Row] | None,
                 postprocess: Callable[[Row], Row] | None, preprocess_map_kwargs: dict[str, Any] | None = None,
                 postprocess_map_kwargs: dict[str, Any] | None = None):
        self.config = config
        self.preprocess, self.postprocess = preprocess, postprocess
        self.preprocess_map_kwargs = dict(preprocess_map_kwargs or {})
        self.postprocess_map_kwargs = dict(postprocess_map_kwargs or {})

    def __call__(self, ds: "ray.data.Dataset") -> "ray.data.Dataset":
        import ray

        cfg = self.config
        if self.preprocess is not None:
            ds = ds.map(KeepColumns(self.preprocess), **self.preprocess_map_kwargs)
        has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        cfg = cfg.resolved(has_gpus)
        opts = cfg.actor_options(has_gpus)
        named = {k: opts.pop(k) for k in list(opts) if k in _NAMED_MAP_ARGS}
        ds = ds.map_batches(self.stage_cls, fn_constructor_args=(cfg,), batch_size=cfg.batch_size,
                            batch_format="pyarrow", compute=cfg.compute(), zero_copy_batch=True, **named, **opts)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess, **self.postprocess_map_kwargs)
        return ds


def build_processor(config: FlotillaProcessorConfig, preprocess: Callable[[Row], Row] | None = None,
                    postprocess: Callable[[Row], Row] | None = None, *,
                    preprocess_map_kwargs: dict[str, Any] | None = None,
                    postprocess_map_kwargs: dict[str, Any] | None = None) -> Processor:
    """Like ``ray.data.llm.build_processor``. ``preprocess(row)`` returns the row the engine sees: one of
    ``prompt``, ``messages`` or ``input_ids``, and optionally ``sampling_params`` (a dict; ``max_tokens`` or
    ``max_new_tokens``...) and ``lora_name`` (the row's LoRA adapter; None: the base model), merged over the input
    row: every input column reaches ``postprocess`` unchanged
    (lists and dicts included), and ``preprocess``'s columns win on a name clash. The engine stage adds
    ``generated_text``, ``generated_token_ids``, ``num_input_tokens`` and ``num_generated_tokens``; then
    ``postprocess(row)``. ``*_map_kwargs`` go to those two ``Dataset.map`` calls (``num_cpus=0.25``...)."""
    if not isinstance(config, FlotillaProcessorConfig):
        raise InvalidParameter("config", f"must be a FlotillaProcessorConfig, got {type(config).__name__}")
    for name, fn in (("preprocess", preprocess), ("postprocess", postprocess)):
        if fn is not None and not callable(fn):
            raise InvalidParameter(name, f"must be callable, got {type(fn).__name__}")
    return Processor(config, preprocess, postprocess, preprocess_map_kwargs, postprocess_map_kwargs)
