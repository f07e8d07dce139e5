"""RayEngine: the Engine whose rank workers are Ray actors on a placement group."""

from __future__ import annotations

from typing import Any

from flotilla.engine import Engine
from flotilla.launch.topology import world_size


class RayEngine(Engine):
    """``RayEngine(model, tp_size, dp_size, placement_group=None, bundle_indices=None, gpus_per_rank=1.0)``.

    With no group given, it uses the current one (an actor scheduled on a placement group), or creates
    one and removes it at shutdown. A group it was given is never removed.
    """

    def __init__(self, model: str, *, placement_group=None, bundle_indices: list[int] | None = None,
                 gpus_per_rank: float = 1.0, placement_timeout_s: float = 60.0, **kwargs: Any):
        self._ray_opts = dict(placement_group=placement_group, bundle_indices=bundle_indices,
                              gpus_per_rank=gpus_per_rank, placement_timeout_s=placement_timeout_s)
        super().__init__(model, **kwargs)

    def _make_launcher(self):
        from flotilla.launch.ray import RayLauncher

        cfg = self.config
        share = self._ray_opts["gpus_per_rank"]
        if cfg.device == "cuda" and share < 1:
            # ranks sharing a GPU each take their fraction of the memory budget
            cfg.gpu_memory_utilization *= share
        return RayLauncher(num_ranks=world_size(cfg.tp_size, cfg.dp_size, cfg.enable_dp_attention),
                           use_gpu=cfg.device == "cuda", **self._ray_opts)
