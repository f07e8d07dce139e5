"""RayEngine: the Engine whose rank workers are Ray actors on a placement group."""

from __future__ import annotations

import uuid
from typing import Any

from flotilla.control import DEFAULT_TIMEOUT_S, collect_named_tensors, meta_tensor
from flotilla.engine import Engine
from flotilla.launch.topology import group_world_size, world_size


class RayEngine(Engine):
    """``RayEngine(model, tp_size, dp_size, placement_group=None, bundle_indices=None, gpus_per_rank=1.0)``.

    With no group given, it uses the current one (an actor scheduled on a placement group), or creates
    one and removes it at shutdown. A group it was given is never removed.
    """

    def __init__(self, model: str, *, placement_group=None, bundle_indices: list[int] | None = None,
                 gpus_per_rank: float = 1.0, placement_timeout_s: float = 60.0, **kwargs: Any):
        if isinstance(gpus_per_rank, bool) or not isinstance(gpus_per_rank, (int, float)) or not (
                0 < gpus_per_rank <= 1 or (gpus_per_rank > 1 and float(gpus_per_rank).is_integer())):
            raise ValueError(f"gpus_per_rank: must be in (0, 1] or a whole number, got {gpus_per_rank!r}")
        self._ray_opts = dict(placement_group=placement_group, bundle_indices=bundle_indices,
                              gpus_per_rank=gpus_per_rank, placement_timeout_s=placement_timeout_s)
        super().__init__(model, **kwargs)

    def _make_launcher(self):
        from flotilla.launch.ray import RayLauncher

        cfg = self.config
        share = self._ray_opts["gpus_per_rank"]
        if cfg.device == "cuda" and share < 1:
            if group_world_size(cfg) > 1:
                raise ValueError(f"gpus_per_rank: {share} puts ranks of one TP/PP group on one GPU, which NCCL "
                                 f"cannot do; a fraction is for replicas of one rank (tp_size=1, pp_size=1), got "
                                 f"tp_size={cfg.tp_size}, pp_size={cfg.pp_size}")
            # ranks sharing a GPU each take their fraction of the memory budget
            cfg.gpu_memory_utilization *= share
        return RayLauncher(num_ranks=world_size(cfg.tp_size, cfg.dp_size, cfg.enable_dp_attention, cfg.pp_size),
                           use_gpu=cfg.device == "cuda", **self._ray_opts)

    # ------------------------------------------------------------------------------------------ weight updates
    def update_weights_from_refs(self, refs: Any, *, version: int | None = None, flush_cache: bool = True,
                                 timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Like ``update_weights`` with the tensors in the Ray object store: ``refs`` is an ObjectRef or a
        list of them, each holding a dict {name: tensor} or a list of (name, tensor) pairs. Every rank
        actor fetches them itself (while requests keep running), the front end checks the names and
        shapes the ranks report, and only then are requests paused and the weights copied in place.
        Returns the new weight version. A replica restarted later cannot replay such an update: it comes
        back with the checkpoint's weights (weight_version 0 in stats) until the next update."""
        import ray

        refs = [refs] if isinstance(refs, ray.ObjectRef) else list(refs)
        if not refs or not all(isinstance(r, ray.ObjectRef) for r in refs):
            raise ValueError("refs: expected an ObjectRef or a non-empty list of ObjectRefs")
        key = f"refs-{uuid.uuid4().hex}"
        with self._control_lock:
            self._check_resident()
            try:
                staged = self._launcher.stage_weights(key, refs, timeout)
            except ray.exceptions.RayTaskError as e:
                raise ValueError(f"refs: the rank actors could not read the update: {str(e).splitlines()[-1]}") from None
            try:
                if not staged:
                    raise RuntimeError("update_weights: no replica is up")
                if any(s != staged[0] for s in staged[1:]):
                    raise RuntimeError("refs: the ranks fetched different contents")
                full = self._check_weights([(n, meta_tensor(n, shape, dtype)) for n, shape, dtype in staged[0]])
                version = self._next_version(version)
                return self._apply_update(f"staged:{key}", version, flush_cache, timeout, replay=None, full=full)
            finally:
                self._launcher.unstage_weights(key)

    def update_weights(self, named_tensors: Any, *, version: int | None = None, flush_cache: bool = True,
                       timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """As ``Engine.update_weights``; when ranks sit on other nodes the tensors travel through the object
        store (a file in the front end's private folder is only readable on its own node)."""
        if not self._launcher.multi_node:
            return super().update_weights(named_tensors, version=version, flush_cache=flush_cache, timeout=timeout)
        import ray

        items = collect_named_tensors(named_tensors)
        with self._control_lock:
            self._check_weights(items)
            ref = ray.put([(n, t.detach().cpu()) for n, t in items])
            return self.update_weights_from_refs([ref], version=version, flush_cache=flush_cache, timeout=timeout)
