"""The trainer's side of weight sync: the group, the broadcast, IPC handles and the HTTP encoding.

A trainer with no process group of its own needs none of this: plain
``torch.distributed.init_process_group(backend, init_method=f"tcp://{addr}:{port}", world_size=w, rank=0)``
and ``torch.distributed.broadcast(t, src=0)`` for each tensor meet the engine ranks. ``TrainerGroup`` is for a
trainer that already has a default group (FSDP, Megatron): it joins the same wire contract as rank 0 without
touching that default group.

Imports torch only (no Ray, no HTTP), so it runs inside any trainer process.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

import torch

from flotilla.ipc.messages import IpcTensor
from flotilla.rl.group import SyncGroup, connect, parse_dtype


def named_items(named_tensors: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(named_tensors, dict):
        return list(named_tensors.items())
    return [(n, t) for n, t in named_tensors]


def weights_meta(named_tensors: Any) -> tuple[list[str], list[str], list[list[int]]]:
    """(names, dtypes, shapes) of an update, as ``update_weights_from_distributed`` takes them."""
    items = named_items(named_tensors)
    return ([n for n, _ in items], [str(t.dtype).removeprefix("torch.") for _, t in items],
            [list(t.shape) for _, t in items])


class TrainerGroup:
    """Rank 0 of a weight-sync group, beside whatever default process group the trainer has. Its TCPStore
    listens on ``master_address:master_port``; the constructor returns once every engine rank joined (call
    ``engine.init_weights_update_group`` concurrently, e.g. from another thread or as a Ray call)."""

    def __init__(self, master_address: str, master_port: int, world_size: int, backend: str = "nccl",
                 timeout: float = 600.0, group_name: str = "weight_update_group"):
        self.group: SyncGroup | None = connect(master_address, master_port, world_size, 0, backend, timeout,
                                               group_name)

    def broadcast(self, tensor: torch.Tensor) -> None:
        if self.group is None:
            raise RuntimeError("weight sync: the group is closed")
        dev = self.group.device
        t = tensor.detach()
        self.group.broadcast(t.contiguous() if t.device == dev else t.to(dev).contiguous())

    def broadcast_weights(self, named_tensors: Any) -> tuple[list[str], list[str], list[list[int]]]:
        """Broadcast every tensor in order; returns its (names, dtypes, shapes) for the engine's call."""
        items = named_items(named_tensors)
        for _, t in items:
            self.broadcast(t)
        return weights_meta(items)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def broadcast_weights(named_tensors: Any, group: Any = None) -> tuple[list[str], list[str], list[list[int]]]:
    """For a trainer that joined with plain ``init_process_group``: ``torch.distributed.broadcast`` every
    tensor from rank 0 (in the default group, or ``group``)."""
    import torch.distributed as dist

    items = named_items(named_tensors)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else \
        torch.device("cpu")
    for _, t in items:
        dist.broadcast(t.detach().to(device).contiguous(), src=0, group=group)
    return weights_meta(items)


# ---------------------------------------------------------------------------------------------- CUDA IPC
def bucket(named_tensors: Any) -> tuple[list[torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """The tensors copied into one flat buffer per (device, dtype), as views: their IPC handles then share one
    allocation, which a rank maps once instead of once per tensor. Returns (buffers, named views); keep the
    buffers alive as long as the views are in use."""
    items = named_items(named_tensors)
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, (_, t) in enumerate(items):
        groups.setdefault((t.device, t.dtype), []).append(i)
    views: list[tuple[str, torch.Tensor] | None] = [None] * len(items)
    buffers = []
    for (device, dtype), idx in groups.items():
        flat = torch.empty(sum(items[i][1].numel() for i in idx), dtype=dtype, device=device)
        at = 0
        for i in idx:
            name, t = items[i]
            v = flat[at: at + t.numel()].view(t.shape)
            v.copy_(t.detach())
            views[i] = (name, v)
            at += t.numel()
        buffers.append(flat)
    return buffers, [v for v in views if v is not None]


def ipc_handles(named_tensors: Any) -> list[IpcTensor]:
    """CUDA IPC handles of ``named_tensors`` (CUDA tensors of this process) for ``update_weights_from_tensor(
    ..., load_format="ipc")`` of an engine whose ranks run on this node. Keep the tensors alive, unchanged,
    until that call returns: the ranks read this process's memory directly. Tensors of one allocation (views
    of a ``bucket``) are mapped once by each rank; separate tensors once each."""
    from torch.multiprocessing.reductions import reduce_tensor

    out = []
    for name, t in named_items(named_tensors):
        if not isinstance(t, torch.Tensor) or not t.is_cuda:
            raise ValueError(f"named_tensors: {name!r}: CUDA IPC needs a CUDA tensor, got "
                             f"{getattr(t, 'device', type(t).__name__)}")
        _, args = reduce_tensor(t.detach())
        (_, size, stride, offset, _, dtype, device, handle, size_bytes, storage_offset, _, ref_handle, ref_offset,
         event_handle, event_sync) = args
        out.append(IpcTensor(name, str(dtype).removeprefix("torch."), list(size), list(stride), int(offset),
                             int(device), bytes(handle), int(size_bytes), int(storage_offset), bytes(ref_handle),
                             int(ref_offset), bytes(event_handle or b""), bool(event_sync),
                             str(torch.cuda.get_device_properties(int(device)).uuid)))
    return out


# ---------------------------------------------------------------------------------------------- HTTP bodies
# /update_weights_from_tensor takes ``serialized_named_tensors`` as sglang does (a list: one entry for every
# rank, or one per engine rank), but never pickles: each entry is a list of JSON objects, plain tensors as
# {"name", "dtype", "shape", "data": base64 of the raw little-endian bytes}, IPC handles as IpcTensor's fields
# with the byte fields in base64.
_IPC_BYTES = ("handle", "ref_counter_handle", "event_handle")


def encode_tensors(named_tensors: Any) -> list[dict[str, Any]]:
    out = []
    for name, t in named_items(named_tensors):
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                    "data": base64.b64encode(raw).decode()})
    return out


def decode_tensors(entries: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"name", "dtype", "shape", "data"} <= set(e):
            raise ValueError(f"serialized_named_tensors: entry {i} must be an object with name, dtype, shape, data")
        dtype = parse_dtype(e["dtype"])
        shape = e["shape"]
        if not isinstance(shape, list) or not all(isinstance(x, int) and x >= 0 for x in shape):
            raise ValueError(f"serialized_named_tensors: {e['name']!r}: shape must be a list of ints >= 0")
        try:
            raw = base64.b64decode(e["data"], validate=True)
        except (ValueError, TypeError):
            raise ValueError(f"serialized_named_tensors: {e['name']!r}: data is not base64") from None
        numel = 1
        for x in shape:
            numel *= x
        want = numel * torch.empty(0, dtype=dtype).element_size()
        if len(raw) != want:
            raise ValueError(f"serialized_named_tensors: {e['name']!r}: {len(raw)} bytes of data, {want} expected "
                             f"for {e['dtype']} {shape}")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        out.append((str(e["name"]), flat.view(dtype).reshape(shape)))
    return out


def encode_ipc(handles: list[IpcTensor]) -> list[dict[str, Any]]:
    import msgspec

    out = []
    for h in handles:
        d = {f: getattr(h, f) for f in h.__struct_fields__}
        for f in _IPC_BYTES:
            d[f] = base64.b64encode(d[f]).decode()
        out.append(d)
    msgspec.json.encode(out)  # JSON-able, or fail here rather than in the client
    return out


def decode_ipc(entries: Iterable[Any]) -> list[IpcTensor]:
    import msgspec

    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"serialized_named_tensors: entry {i} must be an object of IpcTensor fields")
        try:
            d = dict(e)
            d.setdefault("device_uuid", "")
            for f in _IPC_BYTES:
                d[f] = base64.b64decode(d[f], validate=True)
            out.append(msgspec.convert([d[f] for f in IpcTensor.__struct_fields__], IpcTensor))
        except (KeyError, ValueError, TypeError, msgspec.ValidationError) as err:
            raise ValueError(f"serialized_named_tensors: entry {i}: not an IPC handle ({err})") from None
    return out
