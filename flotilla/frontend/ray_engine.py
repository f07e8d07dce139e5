"""RayEngine: the Engine whose rank workers are Ray actors on a placement group."""

from __future__ import annotations

from typing import Any

from flotilla.config import EngineConfig
from flotilla.frontend.control import DEFAULT_TIMEOUT_S
from flotilla.frontend.engine import Engine


class RayEngine(Engine):
    """``RayEngine(model, tp_size, dp_size, placement_group=None, bundle_indices=None, gpus_per_rank=1.0)``.

    With no group given, it uses the current one (an actor scheduled on a placement group), or creates
    one and removes it at shutdown. A group it was given is never removed. Placement, GPU shares and the
    object-store weight staging are the Ray launcher's (``flotilla/launch/ray.py``). The RL control calls
    (``init_weights_update_group``, ``update_weights_from_distributed``, ``pause_generation``, ...) are
    Engine's (``flotilla/rl/api.py``); ``examples/rl_loop.py`` runs them with a trainer actor in the same
    placement group.
    """

    def __init__(self, model: str, *, placement_group=None, bundle_indices: list[int] | None = None,
                 gpus_per_rank: float = 1.0, placement_timeout_s: float = 60.0, **kwargs: Any):
        from flotilla.launch.ray import RayLauncher, RayPlacement

        placement = RayPlacement(placement_group, bundle_indices, gpus_per_rank, placement_timeout_s)
        config = EngineConfig.from_kwargs(model, **kwargs).resolve()
        self._start(config, lambda private_dir: RayLauncher(config, placement))

    def update_weights_from_refs(self, refs: Any, *, version: int | None = None, flush_cache: bool = True,
                                 timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Like ``update_weights`` with the tensors in the Ray object store: ``refs`` is an ObjectRef or a
        list of them, each holding a dict {name: tensor} or a list of (name, tensor) pairs (see
        ``ControlPlane.update_weights_staged``)."""
        return self.control.update_weights_staged(refs, version=version, flush_cache=flush_cache, timeout=timeout)
