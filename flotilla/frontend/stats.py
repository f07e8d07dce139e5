"""What ``Engine.stats()`` reports, as typed structs: the engine's figures and one ``ReplicaStats`` per replica.

Each key is written once, as a field here. ``to_dict()`` gives the plain dict (JSON, a Ray handle, a log line);
the structs also read as that dict (``stats["paused"]``, ``stats.get("replicas")``), so code written against the
dict keeps working.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


class _ReadsAsDict(Mapping[str, Any]):
    """A struct that also reads as its ``to_dict()`` (a read-only mapping)."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def _flat(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict in field order; a nested dataclass field contributes its own fields in its
    place (or nothing when it is None); lists are copied."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("flatten"):
            if value is not None:
                out.update(_flat(value))
        else:
            out[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


@dataclass(frozen=True, kw_only=True)
class PipelineStats:
    """A routed replica's pipeline figures: forwards run by each stage, the most micro-batches in flight."""

    stage_forwards: list[int] = field(default_factory=list)
    max_in_flight: int = 0


@dataclass(frozen=True, kw_only=True)
class DownStats:
    """A replica of a group that is down (until its replacement is ready): why, and whether it is restarting."""

    down_reason: str | None
    restarting: bool


@dataclass(frozen=True, kw_only=True, eq=False)
class ReplicaStats(_ReadsAsDict):
    """One replica: its group's state and processes, its load (from its last report) and its restarts. A routed
    replica has ``pipeline``; a replica of a group that is down has ``down`` (and zeros for the rest)."""

    id: int
    group: int | None = None
    state: str
    pids: list[int] = field(default_factory=list)
    alive: bool = False
    accepting: bool = False
    running: int = 0
    waiting: int = 0
    kv_used: float = 0.0
    cached_tokens: int = 0
    outstanding_tokens: int = 0
    num_steps: int = 0
    num_preemptions: int = 0
    num_overlapped_steps: int = 0
    weight_version: int | None = None
    pipeline: PipelineStats | None = field(default=None, metadata={"flatten": True})
    down: DownStats | None = field(default=None, metadata={"flatten": True})
    restarts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _flat(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplicaStats) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, kw_only=True, eq=False)
class EngineStats(_ReadsAsDict):
    """``Engine.stats()``: every replica, the requests in flight, the layout, the weights' version, whether the
    engine is paused and which control operation is under way, and the front end's own health."""

    replicas: list[ReplicaStats]
    num_requests_inflight: int
    max_model_len: int
    load_balance: str
    dp_size: int
    replica_restarts: int
    weight_version: int
    paused: bool
    control_op: dict[str, Any] | None  # name, on_ranks, for_s (ControlPlane.current_op)
    engine_loop_alive: bool
    dropped_frames: int
    # LoRA adapters served (Engine.list_lora_adapters: name, path, version, rank, id, ...)
    lora_adapters: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["replicas"] = [r.to_dict() for r in self.replicas]
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EngineStats) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]
