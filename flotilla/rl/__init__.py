"""RL on Flotilla: the trainer-side helpers for weight sync (no Ray, no HTTP imports).

``TrainerGroup`` (rank 0 of a weight-sync group beside a trainer's own default group), ``broadcast_weights``
(for a trainer that joined with plain ``init_process_group``), ``weights_meta`` (the names, dtypes and
shapes ``update_weights_from_distributed`` takes), ``ipc_handles`` (CUDA IPC handles of a colocated
trainer's tensors). The engine's side is ``flotilla.rl.api.RLControl`` (its methods are forwarded by Engine /
RayEngine).
"""

from flotilla.rl.weight_sync import TrainerGroup, broadcast_weights, ipc_handles, weights_meta

__all__ = ["TrainerGroup", "broadcast_weights", "ipc_handles", "weights_meta"]
