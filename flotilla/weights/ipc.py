"""CUDA IPC transport: a colocated process's CUDA tensors, shared as IPC handles (``flotilla.rl.ipc_handles``).

Front end: one list of handles every rank reads, or one list per engine rank in weight-sync order (each rank
reads the copy on its own GPU); checked from the handles' names, dtypes and shapes. Only ranks on the
producer's node can open them. Not replayable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from flotilla.ipc.messages import IpcSource, IpcTensor
from flotilla.weights.check import meta_tensor
from flotilla.weights.transport import RankContext, WeightTransport


def per_rank_lists(tensors: Any) -> list[list[IpcTensor]]:
    """``tensors`` as a list of per-rank lists (one list: every rank reads it), checked."""
    per_rank = [list(tensors)] if tensors and isinstance(tensors[0], IpcTensor) else [list(x) for x in tensors]
    if not per_rank or not all(per_rank) or not all(isinstance(t, IpcTensor) for x in per_rank for t in x):
        raise ValueError("named_tensors: expected a non-empty list of IpcTensor (flotilla.rl.ipc_handles), or "
                         "one such list per engine rank")
    if any([(t.name, t.dtype, t.shape) for t in x] != [(t.name, t.dtype, t.shape) for t in per_rank[0]]
           for x in per_rank[1:]):
        raise ValueError("named_tensors: the per-rank lists differ in names, dtypes or shapes")
    return per_rank


class IpcTransport(WeightTransport):
    name = "ipc"
    source_type = IpcSource

    def __init__(self, per_rank: list[list[IpcTensor]], lists_for: Callable[[int], list[list[IpcTensor]]]):
        """``lists_for(replica)``: the per-group-rank lists replica ``replica``'s ranks get."""
        self.per_rank, self.lists_for = per_rank, lists_for

    def describe(self, timeout: float) -> list[tuple[str, Any]]:
        return [(t.name, meta_tensor(t.name, t.shape, t.dtype)) for t in self.per_rank[0]]

    def source_for(self, replica: int) -> IpcSource:
        return IpcSource(self.lists_for(replica))

    @staticmethod
    def receive(source: IpcSource, ctx: RankContext) -> Iterator[tuple[str, torch.Tensor]]:
        return ipc_items(source.tensors, ctx.group_rank)


# ---------------------------------------------------------------------------------------------- rank side
def local_device(t: Any) -> int:
    """This process's index of the GPU an ``IpcTensor`` lives on: found by UUID (a Ray actor sees only its
    own GPUs, numbered from 0), else the producer's index."""
    if not t.device_uuid:
        return t.device
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == t.device_uuid:
            return i
    raise ValueError(f"named_tensors: {t.name!r} lives on GPU {t.device_uuid}, which this rank does not see")


def open_ipc(t: Any) -> torch.Tensor:
    """The tensor an ``IpcTensor`` describes, mapped from the producer's allocation (no copy)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from flotilla.rl.group import parse_dtype

    return rebuild_cuda_tensor(torch.Tensor, tuple(t.shape), tuple(t.stride), t.offset, torch.storage.TypedStorage,
                               parse_dtype(t.dtype), local_device(t), t.handle, t.storage_size, t.storage_offset,
                               False, t.ref_counter_handle, t.ref_counter_offset, t.event_handle,
                               t.event_sync_required)


def ipc_items(tensors: list[list[Any]], group_rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's (name, tensor) pairs of an IPC update: its own list, or the only one."""
    if len(tensors) == 1:
        mine = tensors[0]
    elif 0 <= group_rank < len(tensors):
        mine = tensors[group_rank]
    else:
        raise ValueError(f"named_tensors: {len(tensors)} per-rank lists, none for rank {group_rank}")
    # all opened before any is read, and held until the update is staged: views of one shared bucket then map
    # its allocation once (torch caches an opened handle only while a tensor of it is alive)
    opened = [(t.name, open_ipc(t)) for t in mine]
    yield from opened
