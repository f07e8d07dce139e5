"""Ray launcher: every rank is a Ray actor on a placement-group bundle.

Only start-up and death detection differ from the multiprocessing launcher. Rendezvous of each group goes
through a small Ray actor acting as the torch.distributed store, because torch's TCPStore listens on every
interface; messages still flow over the front end's ZMQ sockets (CURVE-authenticated when any rank sits
on another node).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import ray
import torch.distributed as dist
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from flotilla.errors import InvalidParameter
from flotilla.launch.base import with_memory_share
from flotilla.launch.mp import cpu_threads_per_rank
from flotilla.launch.topology import GroupSpec, group_world_size, world_size
from flotilla.launch.worker_args import WorkerArgs

if TYPE_CHECKING:
    from flotilla.config import EngineConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- store
class _StoreActor:
    """Key-value rendezvous for one torch.distributed group (threaded, so blocking gets can wait)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.cv = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self.cv:
            self.data[key] = value
            self.cv.notify_all()

    def get(self, key: str, timeout_s: float) -> bytes | None:
        with self.cv:
            self.cv.wait_for(lambda: key in self.data, timeout=timeout_s)
            return self.data.get(key)

    def add(self, key: str, amount: int) -> int:
        with self.cv:
            value = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(value).encode()
            self.cv.notify_all()
            return value

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        with self.cv:
            current = self.data.get(key)
            if (current is None and expected == b"") or current == expected:
                self.data[key] = desired
                self.cv.notify_all()
                return desired
            return current if current is not None else expected

    def check(self, keys: list[str]) -> bool:
        with self.cv:
            return all(k in self.data for k in keys)

    def wait(self, keys: list[str], timeout_s: float) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: all(k in self.data for k in keys), timeout=timeout_s)

    def delete_key(self, key: str) -> bool:
        with self.cv:
            return self.data.pop(key, None) is not None

    def num_keys(self) -> int:
        with self.cv:
            return len(self.data)


class RayStore(dist.Store):
    """torch.distributed Store whose state lives in a ``_StoreActor``."""

    def __init__(self, actor, timeout_s: float = 300.0):
        super().__init__()
        self.actor, self.timeout_s = actor, timeout_s

    def set(self, key, value):
        ray.get(self.actor.set.remote(key, value if isinstance(value, bytes) else str(value).encode()))

    def get(self, key):
        value = ray.get(self.actor.get.remote(key, self.timeout_s))
        if value is None:
            raise TimeoutError(f"rendezvous key {key!r} not set within {self.timeout_s}s")
        return value

    def add(self, key, amount):
        return ray.get(self.actor.add.remote(key, amount))

    def compare_set(self, key, expected, desired):
        return ray.get(self.actor.compare_set.remote(key, bytes(expected), bytes(desired)))

    def check(self, keys):
        return ray.get(self.actor.check.remote(list(keys)))

    def wait(self, keys, timeout=None):
        t = timeout.total_seconds() if isinstance(timeout, timedelta) else self.timeout_s
        if not ray.get(self.actor.wait.remote(list(keys), t)):
            raise TimeoutError(f"rendezvous keys {list(keys)} not set within {t}s")

    def delete_key(self, key):
        return ray.get(self.actor.delete_key.remote(key))

    def num_keys(self):
        return ray.get(self.actor.num_keys.remote())

    def set_timeout(self, timeout):
        self.timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)


# ---------------------------------------------------------------------------------------------- ranks
def _interface_of(ip: str) -> str | None:
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            return name
    return None


class _RankActor:
    def info(self) -> dict:
        return {"pid": os.getpid(), "ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def run(self, args: WorkerArgs, store_actor) -> None:
        from flotilla.worker.worker import run_worker

        iface = _interface_of(ray.util.get_node_ip_address())
        if iface:  # keep gloo / NCCL on this node's Ray address, never a wildcard
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
        run_worker(args, store=RayStore(store_actor) if store_actor is not None else None)

    # Weight updates from the object store. ``run`` occupies one thread of this actor for its whole life, so
    # rank actors are threaded (max_concurrency=2): these run beside it. The fetched tensors are handed to
    # the worker through its Ray-free staging hook; an UpdateWeights with StagedSource(key) reads them.
    def stage_weights(self, key: str, refs: list) -> list[tuple[str, list[int] | None, str]]:
        """Fetch ``refs`` (each a dict name -> tensor or a list of (name, tensor)), stage them for this rank,
        and return (name, shape, dtype) of each, for the front end to check."""
        import numpy as np
        import torch

        from flotilla.weights.staged import stage

        items = []
        for obj in ray.get(list(refs)):
            for name, t in (obj.items() if isinstance(obj, dict) else obj):
                if isinstance(t, np.ndarray):
                    t = torch.from_numpy(t)
                items.append((name, t))
        stage(key, items)
        return [(n, list(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else (n, None, type(t).__name__)
                for n, t in items]

    def unstage_weights(self, key: str) -> None:
        from flotilla.weights.staged import unstage

        unstage(key)


# Made once: ray.remote on a class per actor would register it anew each time.
_STORE_ACTOR = ray.remote(_StoreActor)
_RANK_ACTOR: Any = ray.remote(_RankActor)


@ray.remote(num_cpus=0)
def _probe() -> tuple[str, str]:
    return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()


# ---------------------------------------------------------------------------------------------- placement
@dataclass
class Slot:
    pg: PlacementGroup
    bundle: int
    node_ip: str
    node_id: str


def _resource(bundle: dict, key: str) -> float:
    return float(bundle.get(key, 0.0))


def plan_slots(bundles: list[dict], order: list[int], num_ranks: int, use_gpu: bool, gpus_per_rank: float,
               held: dict[int, float]) -> list[int]:
    """Bundle index of each rank: bundles in ``order``, each filled to its capacity (GPUs / gpus_per_rank on
    GPU; CPUs, less what the calling actor holds there, on CPU). Pure, so it is unit-tested."""
    slots: list[int] = []
    for b in order:
        if use_gpu:
            cap = int(math.floor(_resource(bundles[b], "GPU") / gpus_per_rank + 1e-9))
        else:
            cap = int(math.floor(_resource(bundles[b], "CPU") - held.get(b, 0.0) + 1e-9))
        slots.extend([b] * max(0, cap))
    if len(slots) < num_ranks:
        kind = "GPUs" if use_gpu else "CPUs"
        raise InvalidParameter("placement_group", f"bundles {order} have room for {len(slots)} ranks ({kind}), "
                                                  f"{num_ranks} needed")
    return slots[:num_ranks]


def check_bundle_indices(indices: list[int] | None, num_bundles: int) -> list[int]:
    if indices is None:
        return list(range(num_bundles))
    if (not isinstance(indices, (list, tuple))
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)):
        raise InvalidParameter("bundle_indices", f"must be a list of ints, got {indices!r}")
    if len(set(indices)) != len(indices):
        raise InvalidParameter("bundle_indices", f"duplicates in {list(indices)}")
    bad = [i for i in indices if not 0 <= i < num_bundles]
    if bad:
        raise InvalidParameter("bundle_indices", f"{bad} out of range [0, {num_bundles})")
    return list(indices)


@dataclass(frozen=True)
class RayPlacement:
    """Where a RayEngine's ranks go: the caller's placement group (and bundles) or one made for it, and the
    GPU share of each rank. Validated here, before Ray starts."""

    placement_group: PlacementGroup | None = None
    bundle_indices: list[int] | None = None
    gpus_per_rank: float = 1.0
    placement_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        g = self.gpus_per_rank
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (
                0 < g <= 1 or (g > 1 and float(g).is_integer())):
            raise InvalidParameter("gpus_per_rank", f"must be in (0, 1] or a whole number, got {g!r}")
        t = self.placement_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise InvalidParameter("placement_timeout_s", f"must be a number > 0, got {t!r}")


class RayLauncher:
    """Rank actors on placement-group bundles; also the engine's ``WeightStager`` (the object store)."""

    def __init__(self, config: "EngineConfig", placement: RayPlacement, engine_name: str | None = None):
        use_gpu = config.device == "cuda"
        share = placement.gpus_per_rank
        if use_gpu and share < 1 and group_world_size(config) > 1:
            raise InvalidParameter("gpus_per_rank", f"{share} puts ranks of one TP/PP group on one GPU, which "
                                                    "NCCL cannot do; a fraction is for replicas of one rank "
                                                    f"(tp_size=1, pp_size=1), got tp_size={config.tp_size}, "
                                                    f"pp_size={config.pp_size}")
        num_ranks = world_size(config.tp_size, config.dp_size, config.enable_dp_attention, config.pp_size)
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        self.name = engine_name or f"flotilla-{uuid.uuid4().hex[:8]}"
        self.use_gpu, self.gpus_per_rank = use_gpu, share
        self.stager: Any = self
        # ranks sharing a GPU each take their fraction of the memory budget
        self._memory_share = share if use_gpu and share < 1 else 1.0
        self._threads = cpu_threads_per_rank(num_ranks)
        self._owns_pg = False
        pg = placement.placement_group if placement.placement_group is not None else \
            ray.util.get_current_placement_group()
        self._extra_pgs: list[PlacementGroup] = []  # made when scaling up past the first group
        self._timeout_s = placement.placement_timeout_s
        self._groups: dict[int, dict] = {}
        if pg is None:
            pg = self._create_pg(num_ranks, self._timeout_s)
            self._owns_pg = True
        else:
            self._wait_ready(pg, self._timeout_s, remove=False)
        self.pg = pg
        try:
            self.slots = self._place(pg, num_ranks, placement.bundle_indices)
        except BaseException:
            self.shutdown()
            raise
        here = ray.get_runtime_context().get_node_id()
        self.bind_host = ray.util.get_node_ip_address()
        self.multi_node = len({s.node_id for s in self.slots} | {here}) > 1

    def ensure_capacity(self, num_ranks: int) -> None:
        """Room for ``num_ranks`` ranks in all: scaling up adds a placement group of its own (only when this
        launcher made the first one; a caller's group is never grown behind its back)."""
        missing = num_ranks - len(self.slots)
        if missing <= 0:
            return
        if not self._owns_pg:
            raise InvalidParameter("placement_group", f"the caller's group has room for {len(self.slots)} ranks, "
                                                      f"{num_ranks} needed")
        pg = self._create_pg(missing, self._timeout_s)
        self._extra_pgs.append(pg)
        self.slots.extend(self._place(pg, missing, None))
        here = ray.get_runtime_context().get_node_id()
        self.multi_node = self.multi_node or any(s.node_id != here for s in self.slots)

    # -------------------------------------------------------------------------------------- placement
    def _create_pg(self, num_ranks: int, timeout_s: float) -> PlacementGroup:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        key = "GPU" if self.use_gpu else "CPU"
        per_node = max((n["Resources"].get(key, 0.0) for n in nodes), default=0.0)
        need = num_ranks * (self.gpus_per_rank if self.use_gpu else 1.0)
        if per_node <= 0:
            raise InvalidParameter("device", f"no alive Ray node has any {key} (needed {need})")
        if need <= per_node:
            bundles = [{"CPU": float(num_ranks), "GPU": need} if self.use_gpu else {"CPU": float(num_ranks)}]
            strategy = "STRICT_PACK"
        else:
            ranks_per_node = max(1, int(per_node // (self.gpus_per_rank if self.use_gpu else 1.0)))
            nnodes = math.ceil(num_ranks / ranks_per_node)
            bundles = [{"CPU": float(ranks_per_node), "GPU": float(per_node)} if self.use_gpu
                       else {"CPU": float(ranks_per_node)} for _ in range(nnodes)]
            strategy = "SPREAD"
        pg = placement_group(bundles, strategy=strategy, name=f"{self.name}-pg-{uuid.uuid4().hex[:6]}")
        self._wait_ready(pg, timeout_s, remove=True)
        return pg

    @staticmethod
    def _wait_ready(pg: PlacementGroup, timeout_s: float, remove: bool) -> None:
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            if remove:
                remove_placement_group(pg)
            raise RuntimeError(f"placement_group: {pg.bundle_specs} could not be scheduled within {timeout_s}s "
                               "(infeasible on this cluster?)") from None

    def _place(self, pg: PlacementGroup, num_ranks: int, bundle_indices: list[int] | None) -> list[Slot]:
        bundles = pg.bundle_specs
        order = check_bundle_indices(bundle_indices, len(bundles))
        probes = [_probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=b)).remote() for b in order]
        try:
            where = dict(zip(order, ray.get(probes, timeout=60)))
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError("placement_group: probe tasks did not run within 60s") from None
        here_node = ray.get_runtime_context().get_node_id()
        # Bundles on the front end's node first, so rank 0 of the first group sits beside the sockets it uses.
        order = sorted(order, key=lambda b: where[b][1] != here_node)
        held: dict[int, float] = {}
        if not self.use_gpu and ray.util.get_current_placement_group() is not None and \
                ray.util.get_current_placement_group().id == pg.id:
            mine = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
            on_my_node = [b for b in order if where[b][1] == here_node]
            if on_my_node:
                held[on_my_node[0]] = mine
        return [Slot(pg, b, *where[b]) for b in plan_slots(bundles, order, num_ranks, self.use_gpu,
                                                           self.gpus_per_rank, held)]

    # -------------------------------------------------------------------------------------- groups
    def start_group(self, spec: GroupSpec, ranks: list[WorkerArgs]) -> None:
        first = spec.first_global_rank
        store = None
        if spec.world_size > 1:
            slot0 = self.slots[first]
            store = _STORE_ACTOR.options(
                name=f"{self.name}-store-g{spec.group_id}-{uuid.uuid4().hex[:4]}", num_cpus=0, max_concurrency=256,
                scheduling_strategy=PlacementGroupSchedulingStrategy(slot0.pg,
                                                                     placement_group_bundle_index=slot0.bundle),
            ).remote()
        actors, runs = [], []
        for wa in ranks:
            wa.num_threads = self._threads
            wa.config = with_memory_share(wa.config, self._memory_share)
            slot = self.slots[first + wa.rank]
            actor = _RANK_ACTOR.options(
                name=f"{self.name}-g{spec.group_id}-r{wa.rank}-{uuid.uuid4().hex[:4]}",
                num_cpus=1, num_gpus=self.gpus_per_rank if self.use_gpu else 0, max_restarts=0, max_concurrency=2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(slot.pg, placement_group_bundle_index=slot.bundle),
            ).remote()
            actors.append(actor)
        infos = ray.get([a.info.remote() for a in actors], timeout=300)
        for actor, wa in zip(actors, ranks):
            runs.append(actor.run.remote(wa, store))
        self._groups[spec.group_id] = {"actors": actors, "runs": runs, "pids": [i["pid"] for i in infos],
                                       "store": store, "nodes": [i["ip"] for i in infos],
                                       "node_ids": [i["node_id"] for i in infos]}

    # -------------------------------------------------------------------------------------- WeightStager
    def stage(self, key: str, payload: Any, timeout_s: float) -> list[list[tuple]]:
        """Every live rank fetches ``payload`` (an ObjectRef or a list of them) from the object store and
        stages it; returns what each staged. Ranks of groups that died meanwhile are skipped (failover deals
        with them)."""
        refs = [payload] if isinstance(payload, ray.ObjectRef) else list(payload)
        if not refs or not all(isinstance(r, ray.ObjectRef) for r in refs):
            raise InvalidParameter("refs", "expected an ObjectRef or a non-empty list of ObjectRefs")
        calls = [a.stage_weights.remote(key, list(refs)) for g in self._groups.values() for a in g["actors"]]
        out = []
        try:
            for call in calls:
                try:
                    out.append(ray.get(call, timeout=timeout_s))
                except ray.exceptions.RayActorError:
                    continue
        except ray.exceptions.RayTaskError as e:
            self.unstage(key)
            raise InvalidParameter("refs",
                                   f"the rank actors could not read the update: {str(e).splitlines()[-1]}") from None
        except BaseException:
            self.unstage(key)
            raise
        return out

    def stage_tensors(self, key: str, items: list[tuple[str, Any]], timeout_s: float) -> list[list[tuple]]:
        """Tensors from the front end's process, through the object store (ranks on other nodes cannot read
        the front end's private folder)."""
        return self.stage(key, [ray.put([(n, t.detach().cpu()) for n, t in items])], timeout_s)

    def unstage(self, key: str) -> None:
        calls = [a.unstage_weights.remote(key) for g in self._groups.values() for a in g["actors"]]
        for call in calls:
            try:
                ray.get(call, timeout=30)
            except Exception:
                pass

    def pids(self, group_id: int) -> list[int]:
        return list(self._groups.get(group_id, {}).get("pids", []))

    def dead_groups(self) -> dict[int, str]:
        dead = {}
        for gid, g in self._groups.items():
            ready, _ = ray.wait(g["runs"], num_returns=len(g["runs"]), timeout=0)
            if ready:
                rank = g["runs"].index(ready[0])
                try:
                    ray.get(ready[0], timeout=1)
                    why = "returned"
                except Exception as e:  # RayActorError, a worker exception, ...
                    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                dead[gid] = f"rank {rank} actor ended ({why})"
        return dead

    def stop_group(self, group_id: int, timeout: float = 10.0) -> None:
        g = self._groups.pop(group_id, None)
        if g is None:
            return
        ray.wait(g["runs"], num_returns=len(g["runs"]), timeout=timeout)
        for a in g["actors"] + ([g["store"]] if g["store"] is not None else []):
            try:
                ray.kill(a)
            except Exception:
                pass

    def kill_group(self, group_id: int) -> None:
        self.stop_group(group_id, timeout=0)

    def shutdown(self, timeout: float = 10.0) -> None:
        for gid in list(getattr(self, "_groups", {})):
            self.stop_group(gid, timeout)
        owned = ([self.pg] if self._owns_pg and getattr(self, "pg", None) is not None else []) + \
            getattr(self, "_extra_pgs", [])
        for pg in owned:
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        self._extra_pgs = []
        if self._owns_pg:
            self.pg = None
