"""Engine configuration, validated at the edge so that a bad value fails in the user's process with a
message naming the field, never inside a worker."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from flotilla.launch.topology import check_layout

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda")
_LOAD_FORMATS = ("auto", "safetensors", "dummy")
_LOAD_BALANCE = ("round_robin", "shortest_queue", "least_tokens", "prefix_aware")
_ATTENTION = ("auto", "torch", "triton")
_WILDCARDS = ("0.0.0.0", "::", "*", "")


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    # parallelism
    tp_size: int = 1
    dp_size: int = 1
    enable_dp_attention: bool = False
    pp_size: int = 1                              # pipeline stages per replica (world per replica = pp x tp)
    pp_layer_partition: list[int] | None = None   # decoder layers per stage (default: an even split)
    # memory
    block_size: int = 16
    gpu_memory_utilization: float = 0.85
    kv_cache_tokens: int | None = None  # explicit KV pool size in tokens (the CPU default is 16384)
    max_model_len: int | None = None
    # scheduler
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    # GPU fast path
    attention_backend: str = "auto"
    enable_cuda_graph: bool = True
    cuda_graph_max_bs: int = 256
    # data parallel routing
    load_balance: str = "round_robin"
    # network
    host: str | None = None  # where tcp sockets bind when ranks span nodes (default: this node's Ray address)
    allow_wildcard_host: bool = False
    worker_start_timeout: float = 300.0
    # failover
    heartbeat_timeout_s: float = 60.0   # a leader silent this long is treated as dead
    max_replica_restarts: int = 3       # per replica slot, over the engine's life
    failover_timeout_s: float = 300.0   # how long a request waits when every replica is down
    # filled in by resolve(): the HF config as a dict, never passed by users
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        # Frozen once resolved: every process (front end, launchers, workers) must see the same settings, so
        # a per-rank difference (a GPU memory share) goes into that rank's copy, never into this object.
        if self.__dict__.get("_resolved", False):
            raise AttributeError(f"EngineConfig is frozen after resolve(): cannot set {name!r} "
                                 "(build a new config with dataclasses.replace)")
        super().__setattr__(name, value)

    # ------------------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        _choice("dtype", self.dtype, _DTYPES)
        _choice("device", self.device, _DEVICES)
        _choice("load_format", self.load_format, _LOAD_FORMATS)
        _choice("load_balance", self.load_balance, _LOAD_BALANCE)
        _choice("attention_backend", self.attention_backend, _ATTENTION)
        check_layout(self.tp_size, self.dp_size, self.enable_dp_attention, self.pp_size)
        if self.pp_layer_partition is not None:
            part = self.pp_layer_partition
            if not isinstance(part, (list, tuple)) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                          for n in part):
                raise ValueError(f"pp_layer_partition: must be a list of ints >= 1 (layers per stage), got {part!r}")
            if len(part) != self.pp_size:
                raise ValueError(f"pp_layer_partition: needs one entry per stage (pp_size={self.pp_size}), "
                                 f"got {len(part)}: {list(part)}")
            self.pp_layer_partition = list(part)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("cuda_graph_max_bs", self.cuda_graph_max_bs)
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two >= 1, got {self.block_size!r}")
        if not (0.0 < float(self.gpu_memory_utilization) <= 1.0):
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("heartbeat_timeout_s", "failover_timeout_s", "worker_start_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name}: must be a number > 0, got {value!r}")
        if isinstance(self.max_replica_restarts, bool) or not isinstance(self.max_replica_restarts, int) or \
                self.max_replica_restarts < 0:
            raise ValueError(f"max_replica_restarts: must be an int >= 0, got {self.max_replica_restarts!r}")
        if self.kv_cache_tokens is not None:
            _positive_int("kv_cache_tokens", self.kv_cache_tokens)
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if self.host is not None and self.host in _WILDCARDS and not self.allow_wildcard_host:
            raise ValueError(
                f"host: {self.host!r} listens on every interface; pass a specific address (default: this node's address) "
                "or set allow_wildcard_host=True")
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ValueError("model: must be a path to a Hugging Face checkpoint folder")

    def resolve(self) -> "EngineConfig":
        """Read config.json (raising ValueError on a missing or malformed checkpoint) and fill derived fields."""
        path = Path(self.model)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise ValueError(f"model: {str(path)!r} is not a directory holding a Hugging Face checkpoint")
        if not cfg_file.is_file():
            raise ValueError(f"model: {str(path)!r} has no config.json")
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"model: {cfg_file} is not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise ValueError(f"model: {cfg_file} must hold a JSON object")
        from flotilla.model.models import check_architecture

        check_architecture(hf)
        self._check_shapes(hf)
        self.hf_config = hf
        if self.load_format == "auto":
            self.load_format = "safetensors"
        if self.load_format == "safetensors" and not (
                list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
            raise ValueError(f"model: {str(path)!r} has no *.safetensors weights (use load_format='dummy' for random weights)")
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device == "cuda" else "float32"
        limit = int(hf.get("max_position_embeddings") or 2048)
        if self.max_model_len is None:
            self.max_model_len = limit
        if self.tokenizer is None:
            self.tokenizer = str(path)
        self.validate()
        object.__setattr__(self, "_resolved", True)
        return self

    def _check_shapes(self, hf: dict[str, Any]) -> None:
        """Refuse a layout the model cannot be split into, before any process starts."""
        attn_tp = self.tp_size // self.dp_size if self.enable_dp_attention else self.tp_size
        heads = int(hf.get("num_attention_heads") or 0)
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        if heads % attn_tp:
            raise ValueError(f"tp_size: num_attention_heads ({heads}) must be divisible by the attention TP size "
                             f"({attn_tp})")
        if kv_heads % attn_tp and attn_tp % kv_heads:
            raise ValueError(f"tp_size: num_key_value_heads ({kv_heads}) and the attention TP size ({attn_tp}) must "
                             "divide one another")
        layers = int(hf.get("num_hidden_layers") or 0)
        if self.pp_size > 1 and self.pp_size > layers:
            raise ValueError(f"pp_size: the model has {layers} decoder layers (num_hidden_layers), fewer than "
                             f"pp_size={self.pp_size} stages")
        if self.pp_layer_partition is not None and sum(self.pp_layer_partition) != layers:
            raise ValueError(f"pp_layer_partition: {self.pp_layer_partition} sums to {sum(self.pp_layer_partition)}, "
                             f"but the model has {layers} decoder layers (num_hidden_layers)")
        for key in ("intermediate_size", "moe_intermediate_size"):
            size = hf.get(key)
            if size and int(size) % self.tp_size:
                raise ValueError(f"tp_size: {key} ({size}) must be divisible by tp_size ({self.tp_size})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineConfig":
        known = {f.name for f in fields(cls)} - {"hf_config"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; allowed: {sorted(known - {'model'})}")
        return cls(model=str(model), **kwargs)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {list(allowed)}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
