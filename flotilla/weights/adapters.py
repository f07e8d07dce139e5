"""LoRA adapters on the front end: the registry of loaded adapters and the one flow that loads, replaces and
unloads them on every replica (docs/lora.md).

Adapters are weights, so they go the weight-update way: the folder is checked here first (config, every tensor
name and shape against the model; a bad adapter fails in the caller's process and no rank is told), then every
rank of every replica stages it (``LoadLora``) and the groups agree, then all commit (``CommitLora``) or all drop
it (``DiscardLora``). Unlike a base-weight update nothing pauses: requests already running keep their adapter
(a new one is used by requests submitted after the load returns), and replacing an adapter's weights
(``update``) makes only that adapter's running requests recompute their KV.

The registry is what a replica started later replays (``replay_args``), and what requests are checked against
(``check``) before they reach a replica.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flotilla.errors import InvalidParameter
from flotilla.ipc.messages import CommitLora, DiscardLora, LoadLora, UnloadLora
from flotilla.lora.adapter import (ATTENTION_TARGETS, TARGETS, AdapterConfig, iter_weights, parse_tensor_names,
                                   read_config, write_adapter)
from flotilla.weights.check import collect_named_tensors

if TYPE_CHECKING:
    from flotilla.config import EngineConfig
    from flotilla.weights.ports import ControlPort

log = logging.getLogger(__name__)

DISCARD_TIMEOUT_S = 30.0
Shapes = tuple[tuple[int, ...], tuple[int, ...]]  # an adapter weight's (A shape, B shape)
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@+")


@dataclass
class LoadedAdapter:
    """One adapter as the front end knows it. ``shapes``: (layer, target) -> (A shape, B shape), what an update
    must match. ``path``: what a replica starting later reads (the latest update's folder, once replaced)."""

    name: str
    path: str
    source: str                     # the folder the user loaded (``path`` moves to an update's own folder)
    lora_id: int
    version: int
    config: AdapterConfig
    shapes: dict[tuple[int, str], tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.source, "version": self.version, "rank": self.config.rank,
                "id": self.lora_id, "target_modules": list(self.config.target_modules),
                "created": int(self.loaded_at)}


def model_dims(hf: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA target of a Llama-family checkpoint's config."""
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    hd = int(hf.get("head_dim") or hidden // heads)
    inter = int(hf.get("intermediate_size") or 0)
    dims = {"q_proj": (hidden, heads * hd), "k_proj": (hidden, kv * hd), "v_proj": (hidden, kv * hd),
            "o_proj": (heads * hd, hidden)}
    if inter:
        dims.update({"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)})
    return dims


def model_targets(hf: dict[str, Any]) -> tuple[str, ...]:
    """The LoRA targets of the model: a MoE model's experts take none (attention projections only)."""
    moe = bool(hf.get("num_experts") or hf.get("num_local_experts"))
    return ATTENTION_TARGETS if moe else TARGETS


class AdapterRegistry:
    """The adapters the engine serves. Public: ``check``, ``rows``, ``replay_args``; changed by ``AdapterUpdater``
    only (under the control plane's lock)."""

    def __init__(self, config: "EngineConfig"):
        self.enabled = config.enable_lora
        self.max_rank = config.max_lora_rank
        self.num_layers = int(config.hf_config.get("num_hidden_layers") or 0)
        self.dims = model_dims(config.hf_config) if config.hf_config else {}
        self.targets = model_targets(config.hf_config) if config.hf_config else TARGETS
        self._lock = threading.Lock()
        self.adapters: dict[str, LoadedAdapter] = {}
        self.closing: set[str] = set()  # being unloaded: new requests naming them are refused
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def check(self, name: str) -> None:
        """Raise unless a request may run with adapter ``name`` now."""
        if not self.enabled:
            raise InvalidParameter("lora_name", f"adapter {name!r} asked for, but this engine serves no adapters "
                                                "(start it with enable_lora=True)")
        with self._lock:
            if name not in self.adapters or name in self.closing:
                raise InvalidParameter("lora_name", f"unknown adapter {name!r}; loaded: {sorted(self.adapters)}",
                                       allowed=sorted(self.adapters))

    def get(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            return self.adapters.get(name)

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return [a.row() for a in sorted(self.adapters.values(), key=lambda a: a.lora_id)]

    def replay_args(self) -> dict[str, Any]:
        """WorkerArgs fields for a replica that starts now: every adapter to load before it serves."""
        with self._lock:
            return {"lora_adapters": [[a.name, a.path, a.lora_id, a.version] for a in self.adapters.values()]}

    def put(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            self.closing.discard(name)
            return self.adapters.pop(name, None)

    # ------------------------------------------------------------------------------------------ checks
    def inspect(self, path: str) -> tuple[AdapterConfig, dict[tuple[int, str], Shapes]]:
        """Config and tensor shapes of the folder, checked against the model (nothing is loaded anywhere)."""
        cfg = read_config(path, self.max_rank, self.targets)
        found: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
        for (layer, target, side), shape in iter_weights(path, cfg, self.num_layers, shapes_only=True):
            found.setdefault((layer, target), {})[side] = shape
        shapes = {}
        for (layer, target), ab in found.items():
            a_shape, b_shape = ab.get("A"), ab.get("B")
            self.check_shapes(layer, target, a_shape, b_shape, cfg.rank, cfg.target_modules, "lora_path")
            shapes[(layer, target)] = (a_shape, b_shape)
        if not shapes:
            raise InvalidParameter("lora_path", f"{path!r} holds no LoRA weights")
        return cfg, shapes

    def check_shapes(self, layer: int, target: str, a_shape, b_shape, rank: int, targets: list[str],
                      field_name: str) -> None:
        where = f"layer {layer} {target}"
        if target not in targets:
            raise InvalidParameter(field_name, f"{where}: not in the adapter's target_modules {targets}")
        if not 0 <= layer < self.num_layers:
            raise InvalidParameter(field_name, f"{where}: the model has {self.num_layers} layers")
        if a_shape is None or b_shape is None:
            raise InvalidParameter(field_name, f"{where}: lora_A and lora_B must both be present")
        fan_in, fan_out = self.dims[target]
        if tuple(a_shape) != (rank, fan_in) or tuple(b_shape) != (fan_out, rank):
            raise InvalidParameter(field_name, f"{where}: expected A {(rank, fan_in)} and B {(fan_out, rank)} "
                                               f"(r={rank}), got {tuple(a_shape)} and {tuple(b_shape)}")


class AdapterUpdater:
    """Load, replace and unload adapters on every replica. ``port``: the control plane (its lock and the op
    round trip); ``inflight(name)``: how many requests of adapter ``name`` the front end has in flight."""

    def __init__(self, config: "EngineConfig", port: "ControlPort", private_dir: str, files_shared: bool,
                 inflight: Callable[[str], int]):
        self.config, self.port, self.private_dir, self.files_shared = config, port, private_dir, files_shared
        self.inflight = inflight
        self.registry = AdapterRegistry(config)

    def _require_enabled(self, what: str) -> None:
        if not self.config.enable_lora:
            raise InvalidParameter("enable_lora", f"{what}: this engine was started without enable_lora=True")

    def load(self, name: str, path: str, timeout: float) -> LoadedAdapter:
        """Check the folder, then stage it on every rank and commit it everywhere (or nowhere)."""
        self._require_enabled("load_lora_adapter")
        _check_name(name)
        if not isinstance(path, (str, Path)) or not str(path):
            raise InvalidParameter("lora_path", f"must be a path to a PEFT adapter folder, got {path!r}")
        path = str(Path(path).expanduser().resolve())
        with self.port.lock:
            if self.registry.get(name) is not None:
                raise InvalidParameter("lora_name", f"an adapter named {name!r} is loaded already (unload it "
                                                    "first, or update_lora_weights to replace its weights)")
            cfg, shapes = self.registry.inspect(path)
            adapter = LoadedAdapter(name, path, path, self.registry.next_id(), 1, cfg, shapes)
            self._stage_and_commit(adapter, timeout, "load_lora_adapter")
            return adapter

    def update(self, name: str, named_tensors: Any, version: int | None, timeout: float) -> int:
        """Replace every tensor of adapter ``name`` (same names and shapes as it was loaded with); returns the
        adapter's new version. The tensors go to the ranks through a PEFT folder in the engine's private
        folder (every rank on this node reads it)."""
        self._require_enabled("update_lora_weights")
        with self.port.lock:
            old = self._known(name)
            if version is not None and (isinstance(version, bool) or not isinstance(version, int) or
                                        version <= old.version):
                raise InvalidParameter("version", f"must be an int above the adapter's version {old.version}, "
                                                  f"got {version!r}")
            if not self.files_shared:
                raise RuntimeError("update_lora_weights: some ranks run on other nodes; write the adapter to a "
                                   "shared folder and load it under a new name instead")
            parts = parse_tensor_names(collect_named_tensors(named_tensors))
            tensors = {}
            for key, ab in parts.items():
                a, b = ab.get("A"), ab.get("B")
                self.registry.check_shapes(key[0], key[1], None if a is None else tuple(a.shape),
                                            None if b is None else tuple(b.shape), old.config.rank,
                                            old.config.target_modules, "named_tensors")
                if key not in old.shapes:
                    raise InvalidParameter("named_tensors", f"layer {key[0]} {key[1]}: adapter {name!r} has no "
                                                            "such weights")
                tensors[key] = (a, b)
            missing = sorted(set(old.shapes) - set(tensors))
            if missing:
                raise InvalidParameter("named_tensors", f"an update replaces every weight of the adapter; missing "
                                                        f"{len(missing)}, first {missing[:3]}")
            folder = Path(tempfile.mkdtemp(prefix=f"lora-{old.lora_id}-", dir=self.private_dir))
            write_adapter(folder, old.config, {k: (a.to(torch.float32), b.to(torch.float32))
                                               for k, (a, b) in tensors.items()})
            new = LoadedAdapter(name, str(folder), old.source, self.registry.next_id(),
                                version if version is not None else old.version + 1, old.config, old.shapes)
            try:
                self._stage_and_commit(new, timeout, "update_lora_weights")
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            if old.path != old.source:  # the previous update's folder: nobody replays it any more
                shutil.rmtree(old.path, ignore_errors=True)
            return new.version

    def unload(self, name: str, timeout: float) -> None:
        """Refuse new requests of ``name``, wait (up to ``timeout``) until none is in flight, then unload it on
        every replica. An adapter still in use after ``timeout`` stays loaded (RuntimeError)."""
        self._require_enabled("unload_lora_adapter")
        with self.port.lock:
            adapter = self._known(name)
            self.registry.closing.add(name)
            deadline = time.monotonic() + timeout
            while (n := self.inflight(name)) and time.monotonic() < deadline:
                time.sleep(0.05)
            if n:
                self.registry.closing.discard(name)
                raise RuntimeError(f"unload_lora_adapter: {n} request(s) of adapter {name!r} still in flight after "
                                   f"{timeout}s; it stays loaded")
            self.port.run_op("unload_lora_adapter", timeout, make=lambda i: UnloadLora(i, name), check=False)
            self.registry.remove(name)
            if adapter.path != adapter.source:
                shutil.rmtree(adapter.path, ignore_errors=True)

    def _known(self, name: str) -> LoadedAdapter:
        adapter = self.registry.get(name)
        if adapter is None:
            raise InvalidParameter("lora_name", f"unknown adapter {name!r}; loaded: "
                                                f"{[r['name'] for r in self.registry.rows()]}")
        return adapter

    def _stage_and_commit(self, adapter: LoadedAdapter, timeout: float, what: str) -> None:
        stage_ids: list[int] = []

        def stage(op_id: int) -> LoadLora:
            stage_ids.append(op_id)
            return LoadLora(op_id, adapter.name, adapter.path, adapter.lora_id, adapter.version)

        try:
            self.port.run_op(what, timeout, make=stage)
        except BaseException:
            if stage_ids:  # every replica drops what it staged
                self.port.run_op(what, DISCARD_TIMEOUT_S, make=lambda i: DiscardLora(i, stage_ids[0]), check=False)
            raise
        previous = self.registry.get(adapter.name)
        self.registry.put(adapter)  # from here a replica that starts replays it
        try:
            self.port.run_op(what, timeout, make=lambda i: CommitLora(i, stage_ids[0], adapter.name, adapter.lora_id))
        except BaseException:
            # some replica failed to commit (others may serve it): none keeps it, so every replica agrees again
            log.error("%s: commit of adapter %r failed; unloading it everywhere", what, adapter.name)
            self.registry.remove(adapter.name)
            self.port.run_op(what, DISCARD_TIMEOUT_S, make=lambda i: UnloadLora(i, adapter.name), check=False)
            if previous is not None:
                log.error("adapter %r (version %d) is no longer served", adapter.name, previous.version)
            raise

    def preload(self, modules: dict[str, str]) -> None:
        """Adapters named in the config: checked and registered before the replicas start (they load them as
        they start, from ``replay_args``)."""
        for name, path in modules.items():
            _check_name(name)
            resolved = str(Path(path).expanduser().resolve())
            cfg, shapes = self.registry.inspect(resolved)
            self.registry.put(LoadedAdapter(name, resolved, resolved, self.registry.next_id(), 1, cfg, shapes))


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or len(name) > 256 or not set(name) <= _NAME_CHARS:
        raise InvalidParameter("lora_name", "must be a non-empty name of at most 256 letters, digits and -_.:/@+, "
                                            f"got {name!r}")
