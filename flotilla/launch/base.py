"""The one interface every launcher implements: how a replica group's rank processes start, stop and die.

The front end (``Engine``, the replica fleet, the control plane) talks to a launcher only through these
protocols, so a multiprocessing launcher and a Ray launcher are interchangeable, and the fleet can be unit
tested with a fake one. What differs between launchers - where a rank runs, which device it gets, how many
CPU threads, what share of the GPU's memory - is decided inside the launcher, not by the engine.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from flotilla.launch.topology import GroupSpec
from flotilla.launch.worker_args import WorkerArgs


@runtime_checkable
class WeightStager(Protocol):
    """Hands update tensors to every rank's process without a shared file (the Ray object store).

    ``stage`` returns, for every live rank, the (name, shape, dtype) list of what it staged, so the front end
    can check the update before any weight is touched; the ranks then read ``StagedSource(key)``
    (flotilla/weights/staged.py)."""

    def stage(self, key: str, payload: Any, timeout_s: float) -> list[list[tuple]]: ...

    def stage_tensors(self, key: str, items: list[tuple[str, Any]], timeout_s: float) -> list[list[tuple]]: ...

    def unstage(self, key: str) -> None: ...


@runtime_checkable
class Launcher(Protocol):
    """Starts and watches replica groups (``GroupSpec``: one torch.distributed world, one failure domain)."""

    #: any rank on another node than the front end (then sockets are tcp:// + CURVE, and update files are
    #: not readable by every rank)
    multi_node: bool
    #: the address tcp sockets bind to when ``multi_node``
    bind_host: str | None
    #: a way to stage weight updates in rank processes, where the launcher has one (else None)
    stager: WeightStager | None

    def start_group(self, spec: GroupSpec, ranks: list[WorkerArgs]) -> None:
        """Start the group's ranks; fills in what only the launcher knows (device, CPU threads, memory
        share, rendezvous) on each ``WorkerArgs``."""
        ...

    def stop_group(self, group_id: int, timeout: float = 10.0) -> None:
        """Wait for a group told to shut down, then make sure every rank is gone."""
        ...

    def kill_group(self, group_id: int) -> None: ...

    def dead_groups(self) -> dict[int, str]:
        """Groups with at least one rank gone, and why."""
        ...

    def pids(self, group_id: int) -> list[int]: ...

    def ensure_capacity(self, num_ranks: int) -> None:
        """Room for ``num_ranks`` ranks in all (scaling up); raises ValueError when there cannot be."""
        ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


def memory_share(ranks: int, devices: int) -> float:
    """The fraction of one GPU's memory budget each rank takes when ``ranks`` share ``devices`` GPUs."""
    if devices <= 0 or ranks <= devices:
        return 1.0
    return 1.0 / -(-ranks // devices)


def with_memory_share(config: dict[str, Any], share: float) -> dict[str, Any]:
    """A rank's copy of the engine config with its share of ``gpu_memory_utilization`` (the engine's own
    config stays as the user gave it)."""
    if share >= 1.0:
        return config
    return {**config, "gpu_memory_utilization": config["gpu_memory_utilization"] * share}
