"""Engine configuration, validated at the edge so that a bad value fails in the user's process with a
message naming the field, never inside a worker."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from flotilla.errors import InvalidParameter
from flotilla.launch.topology import check_layout

# The allowed values of the choice fields, public so that the CLI's ``choices=`` are these very tuples.
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
LOAD_BALANCE = ("round_robin", "shortest_queue", "least_tokens", "prefix_aware")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
# vLLM's names: "auto" stores K/V in the model's dtype; "fp8" is "fp8_e4m3" (unscaled, saturating at +-448)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
_WILDCARDS = ("0.0.0.0", "::", "*", "")


@dataclass
class EngineConfig:
    """Every engine option. Each field's ``metadata`` holds its ``help`` (and ``choices`` for the choice fields):
    ``flotilla serve`` / ``generate`` build their options from these fields, so an option, its help and its
    allowed values are written once, here."""

    model: str = field(metadata={"help": "Hugging Face checkpoint folder (config.json, tokenizer, weights)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: the model folder)"})
    dtype: str = field(default="auto", metadata={
        "help": "weight and activation dtype; auto is bfloat16 on CUDA, float32 on CPU", "choices": DTYPES})
    device: str = field(default="auto", metadata={
        "help": "where the rank workers run; auto picks cuda when a GPU is visible", "choices": DEVICES})
    load_format: str = field(default="auto", metadata={
        "help": "how weights are loaded; dummy gives random weights (no *.safetensors needed)",
        "choices": LOAD_FORMATS})
    seed: int = field(default=0, metadata={"help": "the seed of dummy (random) weights"})
    # parallelism
    tp_size: int = field(default=1, metadata={"help": "tensor-parallel ranks per replica"})
    dp_size: int = field(default=1, metadata={"help": "data-parallel replicas"})
    enable_dp_attention: bool = field(default=False, metadata={
        "help": "data-parallel attention inside one TP group (dp_size must divide tp_size)"})
    pp_size: int = field(default=1, metadata={
        "help": "pipeline stages per replica (world per replica = pp_size x tp_size)"})
    pp_layer_partition: list[int] | None = field(default=None, metadata={
        "help": "decoder layers per pipeline stage, one number per stage (default: an even split)"})
    # memory
    block_size: int = field(default=16, metadata={"help": "KV cache block size in tokens (a power of two)"})
    gpu_memory_utilization: float = field(default=0.85, metadata={
        "help": "fraction of GPU memory the engine may use, in (0, 1]"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "the KV cache's element type: auto (the model's dtype) or fp8 (= fp8_e4m3) / fp8_e5m2, half the "
                "bytes of bf16 a token and twice the tokens in the same memory (values stored unscaled)",
        "choices": KV_CACHE_DTYPES})
    kv_cache_tokens: int | None = field(default=None, metadata={
        "help": "explicit KV pool size in tokens (default: sized from free GPU memory; 16384 on CPU)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "context length, prompt + generated tokens (default: the model's max_position_embeddings)"})
    # scheduler
    max_num_seqs: int = field(default=256, metadata={"help": "most requests running at once in a replica"})
    max_num_batched_tokens: int = field(default=8192, metadata={
        "help": "most tokens in one scheduler step of a replica"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV cache of prompt prefixes that requests share"})
    stream_interval: int = field(default=1, metadata={
        "help": "a streaming request gets a delta once this many new tokens are there (its first and last at "
                "once; sglang's --stream-interval): larger cuts the server's work per token, at the price of "
                "burstier streams"})
    detokenize_in_replicas: bool = field(default=True, metadata={
        "help": "turn token ids into text and match stop strings in each replica's leader, in parallel, instead "
                "of on the front end's one thread (off: the front end does it, as before)"})
    enable_overlap_schedule: bool = field(default=True, metadata={
        "help": "schedule and prepare step N+1 while step N runs on the device, its sampled ids fed on the "
                "device (same greedy and seeded tokens, checked on an H100: docs/benchmarks.md §16; "
                "pipeline-parallel replicas overlap by micro-batches instead)"})
    # GPU fast path
    attention_backend: str = field(default="auto", metadata={
        "help": "attention kernels (triton needs CUDA)", "choices": ATTENTION_BACKENDS})
    enable_cuda_graph: bool = field(default=True, metadata={"help": "replay decode steps from CUDA graphs"})
    cuda_graph_max_bs: int = field(default=256, metadata={
        "help": "largest decode batch replayed from a CUDA graph"})
    # LoRA adapters (docs/lora.md)
    enable_lora: bool = field(default=False, metadata={
        "help": "serve LoRA adapters (PEFT folders) beside the base model; a request names its adapter"})
    max_loras: int = field(default=4, metadata={
        "help": "most adapters one batch of a replica mixes (device slots); requests of further adapters wait"})
    max_lora_rank: int = field(default=16, metadata={"help": "largest adapter rank r accepted"})
    lora_modules: dict[str, str] | None = field(default=None, metadata={
        "help": "adapters loaded at start, name -> PEFT folder (JSON on the command line: '{\"sql\": \"/a\"}'; "
                "`flotilla serve --lora-modules name=path ...` also takes vLLM's form)"})
    # data parallel routing
    load_balance: str = field(default="round_robin", metadata={
        "help": "how requests are routed across data-parallel replicas", "choices": LOAD_BALANCE})
    # network
    host: str | None = field(default=None, metadata={
        "help": "address the engine's tcp sockets bind to when ranks span nodes (default: this node's Ray "
                "address)"})
    allow_wildcard_host: bool = field(default=False, metadata={
        "help": "allow a wildcard engine host such as 0.0.0.0"})
    worker_start_timeout: float = field(default=300.0, metadata={
        "help": "seconds to wait for the rank workers to be ready"})
    # failover
    heartbeat_timeout_s: float = field(default=60.0, metadata={
        "help": "a replica leader silent this many seconds is treated as dead"})
    max_replica_restarts: int = field(default=3, metadata={
        "help": "restarts per replica group within any restart_window_s (the budget refills as the window "
                "moves on)"})
    restart_window_s: float = field(default=600.0, metadata={
        "help": "the window of the restart budget, in seconds"})
    restart_backoff_s: float = field(default=1.0, metadata={
        "help": "wait before a group's second restart within the window; doubled for each further one"})
    restart_backoff_max_s: float = field(default=60.0, metadata={
        "help": "the longest wait between two restarts of a group"})
    step_timeout_s: float = field(default=600.0, metadata={
        "help": "a replica leader whose step loop stays inside one step this long (a hung collective, a "
                "wedged kernel) is treated as dead, although its heartbeats go on"})
    failover_timeout_s: float = field(default=300.0, metadata={
        "help": "seconds a request waits when every replica is down"})
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
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("load_format", self.load_format, LOAD_FORMATS)
        _choice("load_balance", self.load_balance, LOAD_BALANCE)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        check_layout(self.tp_size, self.dp_size, self.enable_dp_attention, self.pp_size)
        if self.pp_layer_partition is not None:
            part = self.pp_layer_partition
            if not isinstance(part, (list, tuple)) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                          for n in part):
                raise InvalidParameter("pp_layer_partition",
                                       f"must be a list of ints >= 1 (layers per stage), got {part!r}")
            if len(part) != self.pp_size:
                raise InvalidParameter("pp_layer_partition", f"needs one entry per stage (pp_size={self.pp_size}), "
                                                             f"got {len(part)}: {list(part)}")
            self.pp_layer_partition = list(part)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("stream_interval", self.stream_interval)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("cuda_graph_max_bs", self.cuda_graph_max_bs)
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidParameter("block_size", f"must be a power of two >= 1, got {self.block_size!r}")
        if not (0.0 < float(self.gpu_memory_utilization) <= 1.0):
            raise InvalidParameter("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("heartbeat_timeout_s", "failover_timeout_s", "worker_start_timeout", "restart_window_s",
                     "step_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1e9 or \
                    not math.isfinite(value):
                raise InvalidParameter(name, f"must be a finite number of seconds in (0, 1e9], got {value!r}")
        if isinstance(self.max_replica_restarts, bool) or not isinstance(self.max_replica_restarts, int) or \
                self.max_replica_restarts < 0:
            raise InvalidParameter("max_replica_restarts", f"must be an int >= 0, got {self.max_replica_restarts!r}")
        for name in ("restart_backoff_s", "restart_backoff_max_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e9 or \
                    not math.isfinite(value):
                raise InvalidParameter(name, f"must be a finite number of seconds in [0, 1e9], got {value!r}")
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise InvalidParameter("restart_backoff_max_s", f"must be >= restart_backoff_s ({self.restart_backoff_s}), "
                                   f"got {self.restart_backoff_max_s!r}")
        self._check_lora()
        if self.kv_cache_tokens is not None:
            _positive_int("kv_cache_tokens", self.kv_cache_tokens)
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if self.host is not None and self.host in _WILDCARDS and not self.allow_wildcard_host:
            raise InvalidParameter(
                "host", f"{self.host!r} listens on every interface; pass a specific address (default: this node's "
                "address) or set allow_wildcard_host=True")
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise InvalidParameter("model", "must be a path to a Hugging Face checkpoint folder")

    def _check_lora(self) -> None:
        if not isinstance(self.enable_lora, bool):
            raise InvalidParameter("enable_lora", f"must be a bool, got {self.enable_lora!r}")
        if isinstance(self.max_loras, bool) or not isinstance(self.max_loras, int) or not 1 <= self.max_loras <= 64:
            raise InvalidParameter("max_loras", f"must be an int in [1, 64], got {self.max_loras!r}")
        if isinstance(self.max_lora_rank, bool) or not isinstance(self.max_lora_rank, int) or \
                not 1 <= self.max_lora_rank <= 512:
            raise InvalidParameter("max_lora_rank", f"must be an int in [1, 512], got {self.max_lora_rank!r}")
        if self.lora_modules is not None:
            mods = self.lora_modules
            if not isinstance(mods, dict) or not all(isinstance(k, str) and k and isinstance(v, (str, os.PathLike))
                                                     for k, v in mods.items()):
                raise InvalidParameter("lora_modules", f"must be a dict of adapter name -> PEFT folder, got {mods!r}")
            if mods and not self.enable_lora:
                raise InvalidParameter("lora_modules", "adapters need enable_lora=True")
            self.lora_modules = {k: str(v) for k, v in mods.items()}
        if self.enable_lora and self.enable_dp_attention:
            raise InvalidParameter("enable_lora", "LoRA adapters are not supported with enable_dp_attention "
                                                  "(use dp_size replicas without DP attention)")

    def resolve(self) -> "EngineConfig":
        """Read config.json (raising ValueError on a missing or malformed checkpoint) and fill derived fields."""
        path = Path(self.model)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise InvalidParameter("model", f"{str(path)!r} is not a directory holding a Hugging Face checkpoint")
        if not cfg_file.is_file():
            raise InvalidParameter("model", f"{str(path)!r} has no config.json")
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise InvalidParameter("model", f"{cfg_file} is not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise InvalidParameter("model", f"{cfg_file} must hold a JSON object")
        from flotilla.model.models import check_architecture

        check_architecture(hf)
        self._check_shapes(hf)
        self.hf_config = hf
        if self.load_format == "auto":
            self.load_format = "safetensors"
        if self.load_format == "safetensors" and not (
                list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
            raise InvalidParameter("model", f"{str(path)!r} has no *.safetensors weights "
                                            "(use load_format='dummy' for random weights)")
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
            raise InvalidParameter("tp_size",
                                   f"num_attention_heads ({heads}) must be divisible by the attention TP size "
                                              f"({attn_tp})")
        if kv_heads % attn_tp and attn_tp % kv_heads:
            raise InvalidParameter("tp_size",
                                   f"num_key_value_heads ({kv_heads}) and the attention TP size ({attn_tp}) must "
                                              "divide one another")
        layers = int(hf.get("num_hidden_layers") or 0)
        if self.pp_size > 1 and self.pp_size > layers:
            raise InvalidParameter("pp_size", f"the model has {layers} decoder layers (num_hidden_layers), "
                                              f"fewer than pp_size={self.pp_size} stages")
        if self.pp_layer_partition is not None and sum(self.pp_layer_partition) != layers:
            raise InvalidParameter("pp_layer_partition",
                                   f"{self.pp_layer_partition} sums to {sum(self.pp_layer_partition)}, "
                                   f"but the model has {layers} decoder layers (num_hidden_layers)")
        for key in ("intermediate_size", "moe_intermediate_size"):
            size = hf.get(key)
            if size and int(size) % self.tp_size:
                raise InvalidParameter("tp_size", f"{key} ({size}) must be divisible by tp_size ({self.tp_size})")

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
        raise InvalidParameter(name, f"must be one of {list(allowed)}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**63 - 1:
        raise InvalidParameter(name, f"must be an int in [1, 2**63 - 1], got {value!r}")
