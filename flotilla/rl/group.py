"""A weight-sync group as one process sees it: a torch.distributed backend object shared with a trainer.

Pure torch (no Ray, no HTTP, nothing of the engine), so the rank side (flotilla/weights/broadcast.py) and
the trainer side (flotilla/rl/weight_sync.py) share it, and the front end can import it.

Why a backend object and not a process group: an engine rank already belongs to its replica's world, and
``torch.distributed.new_group`` can only carve groups out of that world, never add the trainer. So a member
connects to the trainer's TCPStore and builds a gloo / NCCL backend directly, keyed in the store exactly as
``torch.distributed.init_process_group`` keys its default group: a trainer that calls plain
``init_process_group(backend, init_method="tcp://addr:port", world_size=..., rank=0)`` and then
``broadcast(t, src=0)`` meets these members without knowing anything about Flotilla. The backend object is
used directly (``broadcast([t], opts)``), so the process's own default group is never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# How torch.distributed.init_process_group keys its default group in the store: PrefixStore("default_pg"),
# then the group's name (the first group a process makes is "0"), then the device the backend serves.
_INIT_PG_PREFIXES = ("default_pg", "0/")
_BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}
BACKENDS = tuple(_BACKEND_DEVICE)

Progress = Callable[[], None] | None


@dataclass
class SyncGroup:
    """One weight-sync group as this process sees it: its rank, and the backend object that talks."""

    name: str
    rank: int
    world_size: int
    backend: str
    pg: Any                     # a ProcessGroupGloo / ProcessGroupNCCL (torch's Backend object)
    store: Any                  # kept alive as long as the group (the backend holds the prefixed copy)

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor, progress: Progress = None) -> torch.Tensor:
        """Broadcast ``tensor`` from group rank 0 (in place); ``progress`` is called while waiting, so a
        leader keeps reporting signs of life during a long wait for the trainer."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        work = self.pg.broadcast([tensor], opts)
        _wait(work, progress)
        return tensor

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None) or getattr(self.pg, "abort", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # a backend that is already broken has nothing left to release
                pass
        self.pg = self.store = None


def _wait(work: Any, progress: Progress) -> None:
    if progress is not None:
        spins = 0
        while not work.is_completed():
            progress()
            spins += 1
            time.sleep(0 if spins < 100 else 0.0005)
    work.wait()


def connect(master_address: str, master_port: int, world_size: int, rank: int, backend: str,
            timeout_s: float, name: str = "weight_update_group", *,
            connect_timeout_s: float | None = None) -> SyncGroup:
    """Join (rank > 0) or host (rank 0: this process runs the TCPStore) a weight-sync group. Blocks until
    every member joined (gloo connects its full mesh here; NCCL connects at the first broadcast).

    ``connect_timeout_s`` (a member only): how long to try reaching the store (an unreachable address fails
    after this long, not after ``timeout_s``); the rest of the join waits up to ``timeout_s``."""
    if backend not in _BACKEND_DEVICE:
        raise ValueError(f"backend: must be one of {list(BACKENDS)}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
    timeout = timedelta(seconds=timeout_s)
    first = timeout if connect_timeout_s is None or rank == 0 else timedelta(seconds=min(connect_timeout_s, timeout_s))
    store = dist.TCPStore(master_address, int(master_port), world_size, rank == 0, timeout=first)
    if first != timeout:
        store.set_timeout(timeout)
    prefixed: Any = store
    for p in _INIT_PG_PREFIXES + (f"{_BACKEND_DEVICE[backend]}/",):
        prefixed = dist.PrefixStore(p, prefixed)
    pg: Any
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    return SyncGroup(name, rank, world_size, backend, pg, store)


def parse_dtype(dtype: Any) -> torch.dtype:
    """A torch dtype from a dtype or its name ("bfloat16", "torch.bfloat16"); floating point only."""
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        out = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise ValueError(f"dtypes: {dtype!r} is not a floating-point torch dtype")
    return out


