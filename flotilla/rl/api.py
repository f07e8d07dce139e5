"""The control calls RL frameworks make, with sglang's names and arguments, on Engine and RayEngine.

An object built with the control plane and the engine's abort; ``Engine`` forwards each of its methods under
its own name, written out in ``flotilla/frontend/engine.py``. verl, OpenRLHF, slime, SkyRL, NeMo-RL and AReaL drive an
inference engine through these names; with them, a framework's sglang adapter works against Flotilla with the
import changed.

Differences from sglang, on purpose: a failure raises (``ValueError`` for a bad argument, ``RuntimeError``
when a rank failed, ``TimeoutError``), naming the field or the replica, instead of returning
``(False, message)``; the HTTP routes (``flotilla/server/rl_routes.py``) turn that back into sglang's
``{"success": false, "message": ...}``. Weight versions are ints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flotilla.ipc.messages import IpcTensor

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


def memory_tags(tags: Any) -> bool:
    """Whether ``tags`` (None: all) asks for the weights; the KV cache and CUDA graphs always go together."""
    if tags is None:
        return True
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)) or not tags or \
            any(t not in MEMORY_TAGS for t in tags):
        raise ValueError(f"tags: must be None or a non-empty list of {list(MEMORY_TAGS)}, got {tags!r}")
    return "weights" in tags


def is_ipc(named_tensors: Any) -> bool:
    """A list of IpcTensor, or a list of such lists (one per engine rank)."""
    if not isinstance(named_tensors, list) or not named_tensors:
        return False
    first = named_tensors[0]
    return isinstance(first, IpcTensor) or (isinstance(first, list) and bool(first) and isinstance(first[0], IpcTensor))


class RLControl:
    """sglang-named control methods over a ControlPlane (``control``) and the engine's ``abort``."""

    def __init__(self, control: Any, abort: Callable[[str], bool]):
        self.control, self.abort = control, abort

    # ------------------------------------------------------------------------------------------ groups
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl",
                                  timeout: float = 600.0, connect_timeout_s: float = 30.0) -> None:
        """Every rank of every replica joins one torch.distributed group with the trainer as rank 0 and
        engine rank ``i`` (``weight_sync_ranks()`` order) as ``rank_offset + i``. The trainer joins at the same
        time, with ``torch.distributed.init_process_group(backend, init_method=f"tcp://{master_address}:
        {master_port}", world_size=world_size, rank=0)`` or ``flotilla.rl.TrainerGroup``; this call returns
        once everyone is in. A store that accepts no connection within ``connect_timeout_s`` (a wrong address)
        fails the call then, with generation going on meanwhile; ``timeout`` bounds the whole join."""
        self.control.weights.groups.init_group(master_address, master_port, rank_offset, world_size, group_name,
                                               backend, timeout, connect_timeout_s)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        self.control.weights.groups.destroy_group(group_name)

    def weight_sync_ranks(self, rank_offset: int = 1) -> list[dict[str, Any]]:
        """Which group rank each engine rank takes for ``rank_offset``: one entry per engine rank."""
        return [{"rank": rank_offset + s.index, "replica": s.replica, "group": s.group_id, "rank_in_group": s.rank}
                for s in self.control.weights.layout()]

    # ------------------------------------------------------------------------------------------ updates
    def update_weights_from_distributed(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                                        group_name: str = "weight_update_group", flush_cache: bool = True,
                                        weight_version: int | None = None, timeout: float = 600.0) -> int:
        """Receive the trainer's broadcasts (from group rank 0, full Hugging Face tensors, in ``names``
        order); every rank keeps its shard. Checked against the model before any rank is told; the weights
        change only once every rank of a replica has all of them. Returns the new weight version. A trainer must not
        broadcast an update the engine refuses (the group's stream would be out of step): call
        ``check_weights_update`` first; after any failed update, destroy the group and init it again."""
        return self.control.weights.update_from_distributed(names, dtypes, shapes, group_name, flush_cache,
                                                            weight_version, timeout)

    def check_weights_update(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                             group_name: str = "weight_update_group") -> None:
        """Raise ``ValueError`` / ``RuntimeError`` for what ``update_weights_from_distributed`` would refuse,
        touching nothing: check before the trainer broadcasts (not in sglang)."""
        self.control.weights.check_distributed(names, dtypes, shapes, group_name)

    def update_weights_from_tensor(self, named_tensors: Any, load_format: str | None = None,
                                   flush_cache: bool = True, weight_version: int | None = None) -> int:
        """(name, tensor) pairs; or ``load_format="ipc"`` with ``flotilla.rl.ipc_handles(...)`` of a colocated
        trainer (one list, or one per engine rank). Plain CUDA tensors from this process go through IPC by
        themselves on an ``Engine`` (every rank on this node, every GPU visible to each)."""
        from flotilla.rl.weight_sync import ipc_handles

        if load_format not in (None, "direct", "ipc"):
            raise ValueError(f"load_format: must be None, 'direct' or 'ipc', got {load_format!r}")
        kw = {"flush_cache": flush_cache, "version": weight_version}
        if load_format == "ipc":
            return self.control.weights.update_from_ipc(named_tensors, **kw)
        if load_format is None and is_ipc(named_tensors):
            return self.control.weights.update_from_ipc(named_tensors, **kw)
        items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        on_gpu = bool(items) and all(getattr(t, "is_cuda", False) for _, t in items)
        # by itself only where every rank sees every GPU of this node (the mp launcher: no stager); a Ray rank
        # sees its own GPUs only, so there the caller opts in with load_format="ipc"
        if on_gpu and self.control.weights.ipc_by_itself():
            return self.control.weights.update_from_ipc(ipc_handles(items), **kw)  # no copy through the host
        return self.control.update_weights(items, **kw)

    # ------------------------------------------------------------------------------------------ generation
    def pause_generation(self, mode: str = "abort") -> None:
        """``"abort"`` ends every request in flight, ``"retract"`` takes them back (resumed by
        ``continue_generation`` with their tokens so far), ``"in_place"`` holds them where they are."""
        self.control.pause_generation(mode)

    def continue_generation(self) -> None:
        self.control.resume()

    def abort_request(self, rid: str = "", abort_all: bool = False) -> int:
        """Abort one request (``rid``) or every request in flight; returns how many were found."""
        if abort_all:
            rids = list(self.control.dispatcher.requests)
        elif isinstance(rid, str) and rid:
            rids = [rid]
        else:
            raise ValueError(f"rid: must be a non-empty request id (or abort_all=True), got {rid!r}")
        return sum(bool(self.abort(r)) for r in rids)

    # ------------------------------------------------------------------------------------------ memory
    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free the KV cache (always) and, when ``tags`` is None or holds "weights", move the weights to host
        memory. Pauses the engine until ``resume_memory_occupation``."""
        self.control.release_memory(memory_tags(tags))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        memory_tags(tags)
        self.control.resume_memory()

    def get_weight_version(self) -> int:
        return self.control.weight_version
