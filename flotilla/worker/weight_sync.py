"""The rank side of RL weight sync: joining a trainer's torch.distributed group, receiving its broadcasts,
and reading a colocated trainer's CUDA tensors through IPC handles.

The group itself (a gloo / NCCL backend object keyed in the trainer's store as ``init_process_group`` keys
its default group) is ``flotilla/rl/group.py``, shared with the trainer's side.

Why receive everything before writing: a trainer that dies half-way, a wrong dtype on the wire, a time-out
must leave the old weights serving. Each rank narrows every full tensor to its shard as it arrives (the
parameter's own ``weight_loader``, as the checkpoint loader does) into a scratch copy of the parameter, and
copies the scratch copies into the live parameters only after the last tensor arrived. The extra memory is
one shard-sized copy of the parameters the update touches, plus one full tensor in flight.

Nothing here imports Ray or HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from flotilla.rl.group import BACKENDS, Progress, SyncGroup, connect, parse_dtype

__all__ = ["BACKENDS", "SyncGroup", "apply", "connect", "get", "ipc_items", "is_sync_op", "join", "joined",
           "leave", "open_ipc", "parse_dtype", "receive", "stage"]


# ---------------------------------------------------------------------------------------------- registry
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


# ---------------------------------------------------------------------------------------------- receiving
def receive(group: SyncGroup, names: list[str], dtypes: list[str], shapes: list[list[int]],
            progress: Progress = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of the trainer's broadcast, in ``names`` order, as it arrives (full shape)."""
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        buf = torch.empty(tuple(shape), dtype=parse_dtype(dtype), device=group.device)
        yield name, group.broadcast(buf, progress)


def stage(router: Any, items: Iterable[tuple[str, torch.Tensor]]) -> Callable[[], int]:
    """Load every (HF name, full tensor) into scratch copies of the parameters it lands in (this rank's
    shard); returns the commit, which copies them into the live parameters in place. An error while
    iterating leaves every live parameter as it was; the worker commits only once every rank of the group
    staged without error, so a replica never serves a mix of old and new shards."""
    from flotilla.model.loader import _load_into  # the same narrowing as the checkpoint loader

    scratch: dict[str, torch.nn.Parameter] = {}
    for name, tensor in items:
        hit = router.resolve(name)
        if hit is None:
            continue
        target, param, part = hit
        dst = scratch.get(target)
        if dst is None:
            dst = scratch[target] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
        with torch.no_grad():
            try:
                _load_into(dst, param, tensor.to(device=param.device, dtype=param.dtype), part)
            except (ValueError, RuntimeError, IndexError, TypeError) as e:
                raise ValueError(f"weights: {name!r}: {e}") from None

    def commit() -> int:
        written = len(scratch)
        with torch.no_grad():
            for target, dst in scratch.items():
                router.params[target].data.copy_(dst.data)
        scratch.clear()
        return written

    return commit


# ---------------------------------------------------------------------------------------------- CUDA IPC
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


# ---------------------------------------------------------------------------------------------- model ops
def apply(op: Any, runner: Any, group_rank: int, progress: Progress = None) -> Callable[[], Any] | None:
    """Run one weight-sync model op on this rank (the worker calls this from ``_apply_model_op``; every rank
    of the replica group runs it in the same step). For an update, returns the commit to run once every rank
    of the group staged its shards."""
    from flotilla.ipc.messages import (DestroyWeightSyncGroup, InitWeightSyncGroup, UpdateWeightsFromDistributed,
                                       UpdateWeightsFromIpc)
    from flotilla.model.loader import WeightRouter

    if isinstance(op, InitWeightSyncGroup):
        join(op.group_name, op.master_address, op.master_port, op.world_size, op.ranks[group_rank], op.backend,
             op.timeout_s, progress, connect_timeout_s=op.connect_timeout_s)
        return None
    if isinstance(op, DestroyWeightSyncGroup):
        leave(op.group_name)  # idempotent: the front end also sends it to clean up after a failed join
        return None
    if getattr(runner, "_offloaded", None):
        raise RuntimeError("weights are released; resume memory before updating them")
    if isinstance(op, UpdateWeightsFromDistributed):
        items = receive(get(op.source), op.names, op.dtypes, op.shapes, progress)
    elif isinstance(op, UpdateWeightsFromIpc):
        items = ipc_items(op.tensors, group_rank)
    else:
        raise TypeError(f"not a weight-sync op: {type(op).__name__}")
    commit = stage(WeightRouter(runner.model), items)

    def commit_and_sync() -> None:
        commit()
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)

    return commit_and_sync


def is_sync_op(op: Any) -> bool:
    from flotilla.ipc.messages import (DestroyWeightSyncGroup, InitWeightSyncGroup, UpdateWeightsFromDistributed,
                                       UpdateWeightsFromIpc)

    return isinstance(op, (InitWeightSyncGroup, DestroyWeightSyncGroup, UpdateWeightsFromDistributed,
                           UpdateWeightsFromIpc))
