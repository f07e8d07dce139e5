"""Multiprocessing launcher: every rank is a spawned process on this machine."""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from typing import TYPE_CHECKING, Any

from flotilla.errors import InvalidParameter
from flotilla.launch.base import memory_share, with_memory_share
from flotilla.launch.topology import GroupSpec, device_index, group_world_size, world_size
from flotilla.launch.worker_args import WorkerArgs

if TYPE_CHECKING:
    from flotilla.config import EngineConfig
    from flotilla.launch.base import WeightStager


# What the fork server imports once, so a rank forked from it starts in a fraction of a second instead of
# importing torch and the model code anew (seconds per rank, more while other ranks import on the same cores).
# transformers' configuration classes pull in torch.distributed.tensor and its activations module: seconds more.
PRELOAD = ["torch", "torch.distributed.tensor", "transformers.activations", "transformers.configuration_utils",
           "flotilla.worker.worker", "flotilla.worker.model_runner"]


def start_method() -> str:
    """``forkserver`` where the platform has it (Linux), else ``spawn``. Both start ranks from a fresh
    interpreter that never touched CUDA; the fork server (one per front-end process, started on first use) has
    the heavy imports done already. FLOTILLA_START_METHOD=spawn restores plain spawning."""
    wanted = os.environ.get("FLOTILLA_START_METHOD", "")
    if wanted in ("spawn", "forkserver"):
        return wanted
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def _mp_entry(args: WorkerArgs) -> None:
    from flotilla.distributed.groups import single_node_env

    if args.env is not None:  # a forked rank has the fork server's environment; take the front end's instead
        os.environ.clear()
        os.environ.update(args.env)
    from flotilla.worker.worker import run_worker

    single_node_env()
    run_worker(args)


class MpLauncher:
    """Starts a group's ranks as processes and notices when one of them exits.

    Rendezvous goes through a file in the engine's private 0700 directory, so no TCP store listens. On GPUs,
    ranks fill the visible devices in order; when there are more ranks than devices, whole replicas share
    devices and each rank takes its share of the memory budget (ranks of one group never share: NCCL cannot).
    """

    multi_node = False
    bind_host: str | None = None
    stager: WeightStager | None = None

    def __init__(self, config: "EngineConfig", private_dir: str):
        self._ctx: Any = mp.get_context(start_method())  # (typeshed: BaseContext, without Process)
        self._forked = self._ctx.get_start_method() == "forkserver"
        if self._forked:
            self._ctx.set_forkserver_preload(PRELOAD)
        self._dir = private_dir
        self._num_devices = 0
        ranks = world_size(config.tp_size, config.dp_size, config.enable_dp_attention, config.pp_size)
        if config.device == "cuda":
            import torch

            self._num_devices = torch.cuda.device_count()
            per_group = group_world_size(config)
            if per_group > self._num_devices:
                raise InvalidParameter("tp_size", f"one replica's {per_group} ranks (tp_size={config.tp_size} x "
                                                  f"pp_size={config.pp_size}) need a GPU each, and "
                                                  f"{self._num_devices} are visible; only whole replicas share GPUs")
        self._ranks = ranks
        self._groups: dict[int, list[mp.process.BaseProcess]] = {}

    def start_group(self, spec: GroupSpec, ranks: list[WorkerArgs]) -> None:
        init = f"file://{self._dir}/dist-g{spec.group_id}-{uuid.uuid4().hex[:8]}" if spec.world_size > 1 else None
        share = memory_share(max(self._ranks, spec.first_global_rank + spec.world_size), self._num_devices)
        procs: list = []
        for wa in ranks:
            wa.dist_init_method = init
            wa.device_index = device_index(spec.first_global_rank + wa.rank, self._num_devices)
            wa.num_threads = cpu_threads_per_rank(self._ranks)
            wa.config = with_memory_share(wa.config, share)
            # the rank exits (and removes the private folder) if the front end dies, even by SIGKILL; not the
            # kernel's parent-death signal, which fires when the *thread* that started the child ends (restarts
            # and scale-ups start ranks from short-lived threads)
            wa.parent_pid, wa.private_dir = os.getpid(), self._dir
            wa.env = dict(os.environ) if self._forked else None
            p = self._ctx.Process(target=_mp_entry, args=(wa,), name=f"flotilla-g{spec.group_id}-r{wa.rank}",
                                  daemon=True)
            p.start()
            procs.append(p)
        self._groups[spec.group_id] = procs

    @property
    def max_ranks(self) -> int:
        """The most rank processes ``scale`` may grow to here: a few per core on CPU; on GPUs whole replicas
        may share a device, up to 8 ranks per device (each then gets an eighth of its memory budget)."""
        if self._num_devices:
            return 8 * self._num_devices
        return 4 * (os.cpu_count() or 1)

    def pids(self, group_id: int) -> list[int]:
        return [p.pid for p in self._groups.get(group_id, []) if p.pid is not None]

    def dead_groups(self) -> dict[int, str]:
        dead = {}
        for gid, procs in self._groups.items():
            for rank, p in enumerate(procs):
                if not p.is_alive():
                    dead[gid] = f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                    break
        return dead

    def ensure_capacity(self, num_ranks: int) -> None:
        """Processes need no reservation; the memory share of ranks started later follows the new count."""
        self._ranks = max(self._ranks, num_ranks)

    def stop_group(self, group_id: int, timeout: float = 10.0) -> None:
        procs = self._groups.pop(group_id, [])
        for i, p in enumerate(procs):
            p.join(timeout=timeout if i == 0 else 1.0)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=3)

    def kill_group(self, group_id: int) -> None:
        for p in self._groups.get(group_id, []):
            if p.is_alive():
                p.kill()
        self.stop_group(group_id, timeout=0.5)

    def shutdown(self, timeout: float = 10.0) -> None:
        for gid in list(self._groups):
            self.stop_group(gid, timeout)


def cpu_threads_per_rank(total_ranks: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, total_ranks))
