"""Weight-sync groups with a trainer, on the front end (sglang's ``init_weights_update_group``).

Every rank of every replica joins one torch.distributed group in which the trainer is rank 0 and engine rank
``i`` is ``rank_offset + i``. Engine ranks are numbered replica by replica in ``stats()`` order (replica id),
and within a replica by their rank in its group (TP rank; with pipeline parallelism stage-major). ``layout``
says which is which. A group is bound to the replicas that joined it: a replica restarted or added later is
not in it, so an update through the group is refused until it is destroyed and made again.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from flotilla.ipc.messages import DestroyWeightSyncGroup, InitWeightSyncGroup
from flotilla.frontend.timeouts import check_timeout
from flotilla.weights.ports import ControlPort, FleetView

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
JOIN_MARGIN_S = 30.0  # the front end waits this much longer than the ranks' own join / receive time-out
DEFAULT_CONNECT_TIMEOUT_S = 30.0  # how long a join tries to reach the trainer's store before it fails
MAX_RANK = 2**31 - 1  # torch.distributed ranks and world sizes are C ints


@dataclass(frozen=True)
class SyncRank:
    """One engine rank's place in weight-sync groups: index ``i`` gets group rank ``rank_offset + i``."""

    index: int
    replica: int
    group_id: int
    rank: int          # its rank within its replica group (what the worker knows itself by)


@dataclass
class SyncGroupRecord:
    name: str
    backend: str
    world_size: int
    rank_offset: int
    replicas: frozenset[int]
    ranks: list[SyncRank]


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: must be an int {bound}, got {value!r}")
    return value


def check_address(master_address: Any) -> str:
    if not isinstance(master_address, str) or not master_address.strip():
        raise ValueError(f"master_address: must be a host name or IP address, got {master_address!r}")
    try:
        ipaddress.ip_address(master_address)
    except ValueError:
        if any(c.isspace() or c in "/:@" for c in master_address):
            raise ValueError(f"master_address: {master_address!r} is neither an IP address nor a host name") from None
    return master_address


def by_group(ranks: list[SyncRank], value: Any) -> dict[int, list[Any]]:
    """For each replica group id, ``value(s)`` of its ranks, indexed by rank in group."""
    out: dict[int, list[Any]] = {}
    for s in ranks:
        out.setdefault(s.group_id, []).append(None)
    for s in ranks:
        out[s.group_id][s.rank] = value(s)
    return out


class WeightSyncGroups:
    """The weight-sync groups made with trainers; ``port`` runs the ops, ``fleet`` says where ranks are."""

    def __init__(self, port: ControlPort, fleet: FleetView, device: str):
        self.port, self.fleet, self.device = port, fleet, device
        self.groups: dict[str, SyncGroupRecord] = {}

    def layout(self) -> list[SyncRank]:
        """Every engine rank in weight-sync order; refuses while a replica group is not ready (a group made
        now would miss its ranks)."""
        rows = self.fleet.rank_layout()
        if not rows:
            raise RuntimeError("weight sync: no replica is up")
        return [SyncRank(i, t, g, r) for i, (t, g, r) in enumerate(rows)]

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str = "weight_update_group", backend: str = "nccl", timeout: float = 600.0,
                   connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        """Every engine rank joins the trainer's group; returns once all joined (the trainer must join
        concurrently: its ``init_process_group`` blocks until every member is in).

        First the front end waits (up to ``connect_timeout_s``) until the trainer's store at
        master_address:master_port accepts a connection, while generation goes on; an unreachable one fails
        the call then, with nothing changed. Only then do the ranks join (their steps wait meanwhile), each
        again trying to reach the store for at most ``connect_timeout_s``, the whole join bounded by
        ``timeout``."""
        check_address(master_address)
        _int("master_port", master_port, 1, 65535)
        _int("rank_offset", rank_offset, 1, MAX_RANK)
        _int("world_size", world_size, 2, MAX_RANK)
        if not isinstance(group_name, str) or not group_name:
            raise ValueError(f"group_name: must be a non-empty string, got {group_name!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {list(BACKENDS)}, got {backend!r}")
        if backend == "nccl" and self.device != "cuda":
            raise ValueError("backend: 'nccl' needs an engine on device='cuda'; use 'gloo' on CPU")
        check_timeout("timeout", timeout)
        check_timeout("connect_timeout_s", connect_timeout_s)
        connect_timeout_s = min(float(connect_timeout_s), float(timeout))
        with self.port.lock:
            if group_name in self.groups:
                raise ValueError(f"group_name: {group_name!r} already exists; destroy_weights_update_group first")
            ranks = self.layout()
            if rank_offset + len(ranks) > world_size:
                raise ValueError(f"world_size: {world_size} is too small for the trainer and this engine's "
                                 f"{len(ranks)} ranks from rank_offset {rank_offset} (needs >= "
                                 f"{rank_offset + len(ranks)})")
            group_ranks = by_group(ranks, lambda s: rank_offset + s.index)
            group_of = {s.replica: s.group_id for s in ranks}

            def make(op_id: int, replica: int) -> InitWeightSyncGroup:
                return InitWeightSyncGroup(op_id, master_address, master_port, world_size,
                                           group_ranks[group_of[replica]], group_name, backend, float(timeout),
                                           connect_timeout_s)

            self.port.probe_store(master_address, master_port, connect_timeout_s)  # generation goes on
            try:
                self.port.run_op("init_weights_update_group", timeout + JOIN_MARGIN_S, make_for=make)
            except BaseException:
                # ranks undo a join that failed anywhere in their group, but another group may have joined (or
                # may still be joining, after a time-out): make every rank leave, so the name can be used again
                self.port.run_op("destroy_weights_update_group", 5.0,
                                 make=lambda i: DestroyWeightSyncGroup(i, group_name), check=False,
                                 targets=set(group_of))
                raise
            self.groups[group_name] = SyncGroupRecord(group_name, backend, world_size, rank_offset,
                                                      frozenset(group_of), ranks)

    def destroy_group(self, group_name: str = "weight_update_group", timeout: float = 60.0) -> None:
        with self.port.lock:
            if group_name not in self.groups:
                raise ValueError(f"group_name: {group_name!r} does not exist (groups: {sorted(self.groups)})")
            group = self.groups.pop(group_name)
            live = self.fleet.ready_replicas() & group.replicas
            if live:  # the others died with their ranks' membership
                self.port.run_op("destroy_weights_update_group", timeout,
                                 make=lambda i: DestroyWeightSyncGroup(i, group_name), targets=live)

    def group(self, group_name: str) -> SyncGroupRecord:
        """The group ``group_name``, refused when it does not exist or its replicas changed."""
        group = self.groups.get(group_name)
        if group is None:
            raise ValueError(f"group_name: {group_name!r} does not exist (groups: {sorted(self.groups)}); "
                             "call init_weights_update_group first")
        now = self.fleet.ready_replicas()
        if now != group.replicas:
            raise RuntimeError(f"group_name: {group_name!r} was made with replicas {sorted(group.replicas)}, "
                               f"now {sorted(now)} are up (a restart or a scale); destroy_weights_update_group "
                               "and init_weights_update_group again")
        return group


def wait_reachable(host: str, port: int, timeout_s: float) -> None:
    """Return once ``host:port`` accepts a TCP connection (closed again at once, nothing sent); retried until
    ``timeout_s`` has passed, then a RuntimeError naming the address and the last failure. Runs in the caller's
    thread, touching no rank: generation goes on while it waits."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.05, min(left, 5.0))):
                return
        except OSError as e:  # refused (the trainer's store not up yet), unreachable, unknown host, timed out
            last = e
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    raise RuntimeError(f"master_address: the trainer's store at {host}:{port} did not accept a connection within "
                       f"connect_timeout_s={timeout_s:g}s (last error: {type(last).__name__}: {last}); check "
                       "master_address and master_port, and that the trainer calls init_process_group with them. "
                       "Nothing changed; generation went on meanwhile")
