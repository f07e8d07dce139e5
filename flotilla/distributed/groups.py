"""Process groups and the collectives the model needs.

The registry below is the one piece of module-level mutable state Flotilla allows: layers look their
group up by name when they are built, so a model file does not thread groups through every constructor.
A group of size 1 never touches torch.distributed, so a single-rank engine needs no rendezvous at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class ParallelGroup:
    """A set of ranks that run one collective together (TP, attention-TP, attention-DP)."""

    name: str
    rank: int
    size: int
    pg: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.pg)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate equal-shaped shards of all ranks along ``dim``."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.pg)
        return torch.cat(parts, dim=dim)

    def all_gather_varlen(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate along dim 0 shards whose first dimension differs per rank (``counts``, known to all).

        One padded all-gather into one buffer, then one gather of the real rows by an index built on the host
        from ``counts``: no host sync, no per-rank tensors."""
        if self.size == 1:
            return x
        width = max(max(counts), 1)
        full = self.all_gather_padded(x, width)
        return full.index_select(0, varlen_rows(counts, width, full.device))

    def all_gather_padded(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """[size * width, ...]: rank r's rows at [r * width, r * width + len(x)), zeros after them."""
        if self.size == 1 and x.shape[0] == width:
            return x
        if x.shape[0] == width:
            shard = x.contiguous()
        else:
            shard = x.new_zeros((width, *x.shape[1:]))
            shard[: x.shape[0]] = x
        if self.size == 1:
            return shard
        out = x.new_empty((self.size * width, *x.shape[1:]))
        dist.all_gather_into_tensor(out, shard, group=self.pg)
        return out

    def reduce_scatter_padded(self, y: torch.Tensor, width: int) -> torch.Tensor:
        """Sum ``y`` [size * width, ...] over the ranks and keep this rank's block of ``width`` rows."""
        if self.size == 1:
            return y[:width]
        out = y.new_empty((width, *y.shape[1:]))
        dist.reduce_scatter_tensor(out, y.contiguous(), group=self.pg)
        return out

    def reduce_scatter_varlen(self, y: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Sum ``y`` [sum(counts), ...] (rank r's rows contiguous, in rank order) over the ranks and keep this
        rank's ``counts[rank]`` rows: the inverse layout of ``all_gather_varlen``."""
        if self.size == 1:
            return y
        width = max(max(counts), 1)
        padded = y.new_zeros((self.size * width, *y.shape[1:]))
        padded.index_copy_(0, varlen_rows(counts, width, y.device), y)
        return self.reduce_scatter_padded(padded, width)[: counts[self.rank]]

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Share a few small integers with every rank (CPU tensors over gloo, device tensors over NCCL)."""
        if self.size == 1:
            return [list(values)]
        device = _collective_device(self.pg)
        t = torch.tensor(values, dtype=torch.int64, device=device)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.pg)
        return [p.tolist() for p in parts]

    def broadcast_bytes(self, payload: bytes | None, src_rank: int = 0) -> bytes:
        """Send ``payload`` from the group's ``src_rank`` to all ranks: a length, then the bytes."""
        if self.size == 1:
            assert payload is not None
            return payload
        device = _collective_device(self.pg)
        src = self._global(src_rank)
        length = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64, device=device)
        dist.broadcast(length, src=src, group=self.pg)
        if self.rank == src_rank:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        else:
            buf = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        dist.broadcast(buf, src=src, group=self.pg)
        return payload if self.rank == src_rank else bytes(buf.cpu().numpy())

    def broadcast_tensor(self, x: torch.Tensor, src_rank: int = 0) -> torch.Tensor:
        """Overwrite ``x`` on every rank with the group's ``src_rank``'s ``x``, in place (on the device's
        stream over NCCL: the host does not wait)."""
        if self.size > 1:
            dist.broadcast(x, src=self._global(src_rank), group=self.pg)
        return x

    def _global(self, group_rank: int) -> int:
        """The world rank of this group's ``group_rank`` (what torch.distributed's ``src`` wants)."""
        return dist.get_global_rank(self.pg, group_rank) if self.pg is not None else group_rank

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.pg)


def varlen_rows(counts: list[int], width: int, device: torch.device) -> torch.Tensor:
    """Rows of the real entries of a padded [len(counts) * width] layout, in rank order (built on the host:
    ``counts`` is host data every rank already has, so this costs a small copy and no sync)."""
    import numpy as np

    idx = np.concatenate([np.arange(r * width, r * width + c, dtype=np.int64) for r, c in enumerate(counts)])
    return torch.from_numpy(idx).to(device, non_blocking=True)


def _collective_device(pg: dist.ProcessGroup | None) -> torch.device:
    backend = dist.get_backend(pg)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_GROUPS: dict[str, ParallelGroup] = {}


def get_group(name: str = "tp") -> ParallelGroup:
    """The group ``name`` of this process (a size-1 group when none was set up, e.g. in unit tests)."""
    return _GROUPS.get(name) or ParallelGroup(name, 0, 1)


def init_groups(rank: int, world_size: int, init_method: str | None, backend: str, attn_tp_size: int | None = None,
                timeout_s: float = 600.0, store: dist.Store | None = None, pp_size: int = 1) -> None:
    """Join the replica's (or DP-attention group's) world and build its sub-groups.

    ``tp`` spans the whole world (the MLP/MoE group). With DP attention, ``attn_tp`` is each block of
    ``attn_tp_size`` consecutive ranks and ``attn_dp`` holds the ranks with the same attention-TP rank.
    """
    attn_tp_size = attn_tp_size or world_size
    _GROUPS.clear()
    if world_size > 1:
        dist.init_process_group(backend=backend, init_method=None if store is not None else init_method,
                                store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        world = dist.group.WORLD
    else:
        world = None
    _GROUPS["world"] = ParallelGroup("world", rank, world_size, world)
    if pp_size > 1:
        _init_pipeline_groups(rank, world_size, pp_size, world)
        return
    _GROUPS["tp"] = ParallelGroup("tp", rank, world_size, world)
    dp = world_size // attn_tp_size
    attn_tp = attn_dp = None
    for d in range(dp):
        ranks = list(range(d * attn_tp_size, (d + 1) * attn_tp_size))
        pg = dist.new_group(ranks) if world_size > 1 and attn_tp_size not in (1, world_size) else None
        if rank in ranks:
            attn_tp = pg if attn_tp_size < world_size else world
    for t in range(attn_tp_size):
        ranks = list(range(t, world_size, attn_tp_size))
        pg = dist.new_group(ranks) if world_size > 1 and dp not in (1, world_size) else None
        if rank in ranks:
            attn_dp = pg if dp < world_size else world
    _GROUPS["attn_tp"] = ParallelGroup("attn_tp", rank % attn_tp_size, attn_tp_size, attn_tp)
    _GROUPS["attn_dp"] = ParallelGroup("attn_dp", rank // attn_tp_size, dp, attn_dp)


def _init_pipeline_groups(rank: int, world_size: int, pp_size: int, world) -> None:
    """Pipeline layout: rank = stage * tp + tp_rank. ``tp`` (and ``attn_tp``, the same group) holds one
    stage's ranks; ``pp`` holds the whole world, its rank being the stage; ``attn_dp`` is trivial."""
    if world_size % pp_size:
        raise ValueError(f"pp_size: must divide the group's world size, got pp_size={pp_size}, world={world_size}")
    tp = world_size // pp_size
    stage = rank // tp
    mine = None
    for s in range(pp_size):
        ranks = list(range(s * tp, (s + 1) * tp))
        pg = dist.new_group(ranks) if tp > 1 else None  # every rank makes every group, in the same order
        if s == stage:
            mine = pg
    _GROUPS["tp"] = ParallelGroup("tp", rank % tp, tp, mine)
    _GROUPS["attn_tp"] = ParallelGroup("attn_tp", rank % tp, tp, mine)
    _GROUPS["attn_dp"] = ParallelGroup("attn_dp", 0, 1, None)
    _GROUPS["pp"] = ParallelGroup("pp", stage, pp_size, world)


def destroy_groups() -> None:
    _GROUPS.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def single_node_env() -> None:
    """Keep gloo's listening sockets on loopback when every rank is on this machine."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
