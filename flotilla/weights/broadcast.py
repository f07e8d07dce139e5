"""Broadcast transport: full tensors broadcast by rank 0 (the trainer) of a weight-sync group (NCCL / gloo).

Front end: the trainer's names, dtypes and shapes are checked (the tensors never pass through the front end);
every replica's ranks get a ``BroadcastSource`` and receive every tensor in ``names`` order. Not replayable.

Rank side: the registry of the groups this rank joined (``join`` / ``leave`` / ``get``; the group object itself
is ``flotilla/rl/group.py``, shared with the trainer's side), and ``receive``. A join waits in a side thread so
the leader keeps reporting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch

from flotilla.ipc.messages import BroadcastSource
from flotilla.rl.group import BACKENDS, Progress, SyncGroup, connect, parse_dtype
from flotilla.weights.check import meta_tensor
from flotilla.weights.transport import RankContext, WeightTransport

__all__ = ["BACKENDS", "BroadcastTransport", "SyncGroup", "check_lists", "connect", "get", "join", "joined",
           "leave", "parse_dtype", "receive_broadcast"]


class BroadcastTransport(WeightTransport):
    name = "broadcast"
    source_type = BroadcastSource

    def __init__(self, group_name: str, names: list[str], dtypes: list[str], shapes: list[list[int]]):
        self.source = BroadcastSource(group_name, names, dtypes, shapes)

    def describe(self, timeout: float) -> list[tuple[str, Any]]:
        s = self.source
        return [(n, meta_tensor(n, shape, d)) for n, d, shape in zip(s.names, s.dtypes, s.shapes)]

    def source_for(self, replica: int) -> BroadcastSource:
        return self.source

    @staticmethod
    def receive(source: BroadcastSource, ctx: RankContext) -> Iterator[tuple[str, torch.Tensor]]:
        return receive_broadcast(get(source.group_name), source.names, source.dtypes, source.shapes, ctx.progress)


def check_lists(names: Any, dtypes: Any, shapes: Any) -> tuple[list[str], list[str], list[list[int]]]:
    """A trainer's names, dtypes and shapes, checked and normalised (dtypes as torch names without prefix)."""
    for field, value in (("names", names), ("dtypes", dtypes), ("shapes", shapes)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{field}: must be a list, got {type(value).__name__}")
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names, dtypes, shapes: must have the same length, got {len(names)}, {len(dtypes)}, "
                         f"{len(shapes)}")
    out_dtypes = [str(parse_dtype(d)).removeprefix("torch.") for d in dtypes]
    out_shapes = []
    for name, shape in zip(names, shapes):
        if not isinstance(shape, (list, tuple)) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
            raise ValueError(f"shapes: {name!r}: must be a list of ints >= 0, got {shape!r}")
        out_shapes.append([int(x) for x in shape])
    return list(names), out_dtypes, out_shapes


# ---------------------------------------------------------------------------------------------- rank side
_groups: dict[str, SyncGroup] = {}


def join(name: str, master_address: str, master_port: int, world_size: int, rank: int, backend: str,
         timeout_s: float, progress: Progress = None, connect_timeout_s: float | None = None) -> SyncGroup:
    """A rank joins group ``name`` (in a side thread, so ``progress`` keeps the leader's heartbeat going)."""
    if name in _groups:
        raise ValueError(f"group_name: {name!r} is already joined; destroy it first")
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["group"] = connect(master_address, master_port, world_size, rank, backend, timeout_s, name,
                                   connect_timeout_s=connect_timeout_s)
        except BaseException as e:  # re-raised in the rank's thread
            box["error"] = e

    th = threading.Thread(target=run, name=f"flotilla-join-{name}", daemon=True)
    th.start()
    while th.is_alive():
        if progress is not None:
            progress()
        th.join(0.2)
    if "error" in box:
        raise RuntimeError(f"joining weight-sync group {name!r} at {master_address}:{master_port} as rank {rank} "
                           f"failed: {type(box['error']).__name__}: {box['error']}")
    _groups[name] = box["group"]
    return box["group"]


def get(name: str) -> SyncGroup:
    group = _groups.get(name)
    if group is None:
        raise ValueError(f"group_name: {name!r} is not joined (joined: {sorted(_groups)})")
    return group


def leave(name: str) -> bool:
    """Forget group ``name``; False when it was not joined."""
    group = _groups.pop(name, None)
    if group is None:
        return False
    group.close()
    return True


def joined() -> list[str]:
    return sorted(_groups)


def receive_broadcast(group: SyncGroup, names: list[str], dtypes: list[str], shapes: list[list[int]],
                      progress: Progress = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of the trainer's broadcast, in ``names`` order, as it arrives (full shape)."""
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        buf = torch.empty(tuple(shape), dtype=parse_dtype(dtype), device=group.device)
        yield name, group.broadcast(buf, progress)
