"""What a launcher hands each rank process to start it: plain data, so the front end can build it without
importing the worker or model code (the worker imports this, not the other way round)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flotilla.ipc.channel import CurveKeys


@dataclass
class WorkerArgs:
    config: dict
    replica_id: int   # the replica (routed unit) this rank works for
    rank: int
    world_size: int
    dist_init_method: str | None
    in_addr: str
    out_addr: str
    keys: CurveKeys | None = None
    device_index: int | None = None
    num_threads: int | None = None
    backend: str | None = None
    # weight updates made before this rank started (a restarted replica catches up): sources applied in order
    # on top of the checkpoint, and the version they amount to
    weights_sources: list[str] = field(default_factory=list)
    weight_version: int = 0
    # LoRA adapters loaded before this rank started: [name, PEFT folder, lora_id, version] each
    lora_adapters: list[list] = field(default_factory=list)
    # Dying with the front end (flotilla/worker/lifeline.py). ``parent_pid``: the front end's pid; when set,
    # the rank exits as soon as that process is gone (polled every 0.5 s), first removing ``private_dir``
    # (the engine's private directory) if given. ``pdeathsig``: also have the kernel SIGKILL the rank when
    # its parent dies (Linux); set it only when the launcher starts the rank from the parent's MAIN thread,
    # because the kernel fires it when the starting *thread* ends, even if the process lives on; and a rank
    # killed that way cannot remove ``private_dir``.
    parent_pid: int | None = None
    private_dir: str | None = None
    pdeathsig: bool = False
    # the front end's environment at launch, for ranks that start from a process with another (the fork server)
    env: dict[str, str] | None = None
