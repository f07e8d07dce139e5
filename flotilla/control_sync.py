"""RL weight sync on the front end: weight-sync groups with a trainer, broadcast updates, CUDA IPC updates.

The ControlPlane (``flotilla/control.py``) owns the lock, the op round trip and the update bookkeeping; this
module adds what RL frameworks call (sglang's names, docs/weight_updates.md):

* ``init_group``: every rank of every replica joins one torch.distributed group in which the trainer is rank
  0 and engine rank ``i`` is ``rank_offset + i``. Engine ranks are numbered replica by replica in ``stats()``
  order (replica id), and within a replica by their rank in its group (TP rank; with pipeline parallelism
  stage-major). ``layout`` says which is which.
* ``update_from_distributed``: names, dtypes and shapes are checked against the meta model before any rank is
  told; then every rank receives every tensor and stages its shard; the weights change only once every rank
  of a replica staged all of them.
* ``update_from_ipc``: the same with tensors a colocated process shares through CUDA IPC handles.

A group is bound to the replicas that joined it: a replica restarted or added later is not in it, so an
update through the group is refused until it is destroyed and made again.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flotilla.ipc.messages import (DestroyWeightSyncGroup, InitWeightSyncGroup, IpcTensor, UpdateWeightsFromDistributed,
                                   UpdateWeightsFromIpc)

if TYPE_CHECKING:
    from flotilla.control import ControlPlane

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
class _Group:
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


class WeightSync:
    """Weight-sync groups and the updates that use them (``ControlPlane.sync``)."""

    def __init__(self, plane: "ControlPlane"):
        self.plane = plane
        self.groups: dict[str, _Group] = {}

    # ------------------------------------------------------------------------------------------ layout
    def layout(self) -> list[SyncRank]:
        """Every engine rank in weight-sync order; refuses while a replica group is not ready (a group made
        now would miss its ranks)."""
        from flotilla.router.fleet import GroupState

        fleet = self.plane.fleet
        rows: list[tuple[int, int, int]] = []
        with fleet.lock:
            for rec in fleet.records:
                if rec.state is not GroupState.READY:
                    raise RuntimeError(f"weight sync: replica group {rec.spec.group_id} is {rec.state.value}; "
                                       "retry once every replica in stats() is ready")
                spec = rec.spec
                rows.extend((spec.replica_of_rank(r), spec.group_id, r) for r in range(spec.world_size))
        if not rows:
            raise RuntimeError("weight sync: no replica is up")
        rows.sort()
        return [SyncRank(i, t, g, r) for i, (t, g, r) in enumerate(rows)]

    # ------------------------------------------------------------------------------------------ groups
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
        from flotilla.control import check_timeout

        check_address(master_address)
        _int("master_port", master_port, 1, 65535)
        _int("rank_offset", rank_offset, 1, MAX_RANK)
        _int("world_size", world_size, 2, MAX_RANK)
        if not isinstance(group_name, str) or not group_name:
            raise ValueError(f"group_name: must be a non-empty string, got {group_name!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {list(BACKENDS)}, got {backend!r}")
        if backend == "nccl" and self.plane.config.device != "cuda":
            raise ValueError("backend: 'nccl' needs an engine on device='cuda'; use 'gloo' on CPU")
        check_timeout("timeout", timeout)
        check_timeout("connect_timeout_s", connect_timeout_s)
        connect_timeout_s = min(float(connect_timeout_s), float(timeout))
        with self.plane.lock:
            if group_name in self.groups:
                raise ValueError(f"group_name: {group_name!r} already exists; destroy_weights_update_group first")
            ranks = self.layout()
            if rank_offset + len(ranks) > world_size:
                raise ValueError(f"world_size: {world_size} is too small for the trainer and this engine's "
                                 f"{len(ranks)} ranks from rank_offset {rank_offset} (needs >= "
                                 f"{rank_offset + len(ranks)})")
            by_group: dict[int, list[int]] = {}
            for s in ranks:
                by_group.setdefault(s.group_id, []).append(0)
            for s in ranks:
                by_group[s.group_id][s.rank] = rank_offset + s.index
            group_of = {s.replica: s.group_id for s in ranks}

            def make(op_id: int, replica: int) -> InitWeightSyncGroup:
                return InitWeightSyncGroup(op_id, master_address, master_port, world_size,
                                           by_group[group_of[replica]], group_name, backend, float(timeout),
                                           connect_timeout_s)

            self.plane.probe_store(master_address, master_port, connect_timeout_s)  # generation goes on
            try:
                self.plane._control(None, "init_weights_update_group", timeout + JOIN_MARGIN_S, make_for=make)
            except BaseException:
                # ranks undo a join that failed anywhere in their group, but another group may have joined (or
                # may still be joining, after a time-out): make every rank leave, so the name can be used again
                self.plane._control(lambda i: DestroyWeightSyncGroup(i, group_name), "destroy_weights_update_group",
                                    5.0, check=False, targets=set(group_of))
                raise
            self.groups[group_name] = _Group(group_name, backend, world_size, rank_offset,
                                             frozenset(group_of), ranks)

    def destroy_group(self, group_name: str = "weight_update_group", timeout: float = 60.0) -> None:
        with self.plane.lock:
            if group_name not in self.groups:
                raise ValueError(f"group_name: {group_name!r} does not exist (groups: {sorted(self.groups)})")
            group = self.groups.pop(group_name)
            live = self.plane.fleet.ready_replicas() & group.replicas
            if live:  # the others died with their ranks' membership
                self.plane._control(lambda i: DestroyWeightSyncGroup(i, group_name), "destroy_weights_update_group",
                                    timeout, targets=live)

    def _group(self, group_name: str) -> _Group:
        group = self.groups.get(group_name)
        if group is None:
            raise ValueError(f"group_name: {group_name!r} does not exist (groups: {sorted(self.groups)}); "
                             "call init_weights_update_group first")
        now = self.plane.fleet.ready_replicas()
        if now != group.replicas:
            raise RuntimeError(f"group_name: {group_name!r} was made with replicas {sorted(group.replicas)}, "
                               f"now {sorted(now)} are up (a restart or a scale); destroy_weights_update_group "
                               "and init_weights_update_group again")
        return group

    # ------------------------------------------------------------------------------------------ updates
    def check_distributed(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                          group_name: str = "weight_update_group") -> None:
        """Raise what ``update_from_distributed`` would refuse, touching nothing (a trainer checks before it
        broadcasts: a broadcast the ranks never receive leaves the group out of step)."""
        from flotilla.control import meta_tensor

        names, dtypes, shapes = _check_lists(names, dtypes, shapes)
        self._group(group_name)
        self.plane._check_weights([(n, meta_tensor(n, s, d)) for n, d, s in zip(names, dtypes, shapes)])

    def update_from_distributed(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                                group_name: str = "weight_update_group", flush_cache: bool = True,
                                version: int | None = None, timeout: float = 600.0) -> int:
        """Receive ``names`` broadcast from the trainer (group rank 0) in order; returns the new version."""
        from flotilla.control import meta_tensor

        names, dtypes, shapes = _check_lists(names, dtypes, shapes)
        with self.plane.lock:
            self._group(group_name)
            full = self.plane._check_weights([(n, meta_tensor(n, s, d)) for n, d, s in zip(names, dtypes, shapes)])
            version = self.plane._next_version(version)
            return self.plane._apply_update(
                group_name, version, flush_cache, timeout + JOIN_MARGIN_S, replay=None, full=full,
                make=lambda i: UpdateWeightsFromDistributed(i, group_name, version, flush_cache, names, dtypes,
                                                            shapes))

    def update_from_ipc(self, tensors: list[IpcTensor] | list[list[IpcTensor]], flush_cache: bool = True,
                        version: int | None = None, timeout: float = 600.0) -> int:
        """``tensors``: one list of handles every rank reads, or one list per engine rank in weight-sync order
        (each rank reads the copy on its own GPU)."""
        from flotilla.control import meta_tensor

        if self.plane.config.device != "cuda":
            raise ValueError("load_format: CUDA IPC handles need an engine on device='cuda'")
        if not self.plane.files_shared:
            raise ValueError("load_format: CUDA IPC handles only reach ranks on the producer's node, and some ranks "
                             "run on other nodes")
        per_rank = [list(tensors)] if tensors and isinstance(tensors[0], IpcTensor) else [list(x) for x in tensors]
        if not per_rank or not all(per_rank) or not all(isinstance(t, IpcTensor) for x in per_rank for t in x):
            raise ValueError("named_tensors: expected a non-empty list of IpcTensor (flotilla.rl.ipc_handles), or "
                             "one such list per engine rank")
        if any([(t.name, t.dtype, t.shape) for t in x] != [(t.name, t.dtype, t.shape) for t in per_rank[0]]
               for x in per_rank[1:]):
            raise ValueError("named_tensors: the per-rank lists differ in names, dtypes or shapes")
        full = self.plane._check_weights([(t.name, meta_tensor(t.name, t.shape, t.dtype)) for t in per_rank[0]])
        with self.plane.lock:
            if len(per_rank) == 1:
                for_group: dict[int, list[list[IpcTensor]]] = {}
                group_of = {}
            else:
                ranks = self.layout()
                if len(per_rank) != len(ranks):
                    raise ValueError(f"named_tensors: {len(per_rank)} per-rank lists for {len(ranks)} engine ranks")
                for_group = {}
                for s in ranks:
                    for_group.setdefault(s.group_id, []).append([])
                for s in ranks:
                    for_group[s.group_id][s.rank] = per_rank[s.index]
                group_of = {s.replica: s.group_id for s in ranks}
            version = self.plane._next_version(version)

            def make(op_id: int, replica: int) -> UpdateWeightsFromIpc:
                lists = per_rank if len(per_rank) == 1 else for_group[group_of[replica]]
                return UpdateWeightsFromIpc(op_id, "ipc", version, flush_cache, lists)

            return self.plane._apply_update("ipc", version, flush_cache, timeout, replay=None, full=full,
                                            make_for=make)


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


def _check_lists(names: Any, dtypes: Any, shapes: Any) -> tuple[list[str], list[str], list[list[int]]]:
    from flotilla.rl.group import parse_dtype

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
