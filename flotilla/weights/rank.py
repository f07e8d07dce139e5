"""The rank side of every weight update: stage -> agree -> commit, the same for every transport.

1. **Stage** (``UpdateWeights``): each rank reads its source through the transport's ``receive`` and narrows
   every full tensor to its shard (the parameter's own ``weight_loader``, as the checkpoint loader does) into
   a scratch copy of the parameter. The live weights are not touched; an error leaves them as they were.
2. **Agree**: the ranks of the replica group all-gather whether each staged without error (the worker does
   that for every model op); when any failed, every rank of the group drops its scratch copies (``undo``) and
   the leader reports the failure. The front end collects every replica's answer.
3. **Commit** (``CommitWeights``), sent by the front end only once every replica staged: each rank copies its
   scratch copies into the live parameters, in place (storage never moves: captured CUDA graphs stay valid).
   Otherwise the front end sends ``DiscardWeights`` and the old weights serve on everywhere.

One staged update per rank process at a time (a new one replaces one left behind by a front end that gave
up). The extra memory is one shard-sized copy of the parameters the update touches, plus one full tensor in
flight. Weight-sync group joins and leaves (``InitWeightSyncGroup`` / ``DestroyWeightSyncGroup``) are model
ops too: a join that failed on any rank of the group is undone on all of them.

Nothing here imports Ray or HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from flotilla.ipc.messages import (
    CommitWeights,
    DestroyWeightSyncGroup,
    DiscardWeights,
    FileSource,
    InitWeightSyncGroup,
    UpdateWeights,
)
from flotilla.weights import broadcast
from flotilla.weights.transport import Progress, RankContext, receive

log = logging.getLogger(__name__)

WEIGHT_OPS = (UpdateWeights, CommitWeights, DiscardWeights, InitWeightSyncGroup, DestroyWeightSyncGroup)


@dataclass
class Staged:
    """One rank's staged update: scratch copies of the parameters it touches, by our parameter name."""

    stage_id: int
    version: int
    router: Any
    scratch: dict[str, torch.nn.Parameter]

    def commit(self) -> int:
        """Copy the scratch copies into the live parameters; the number of parameters written."""
        with torch.no_grad():
            for target, dst in self.scratch.items():
                self.router.params[target].data.copy_(dst.data)
        written = len(self.scratch)
        self.scratch.clear()
        return written


_slot: Staged | None = None  # what this rank process staged and neither committed nor dropped yet


def stage(router: Any, items: Iterable[tuple[str, torch.Tensor]], progress: Progress = None,
          fail_at: int | None = None) -> dict[str, torch.nn.Parameter]:
    """Load every (HF name, full tensor) into scratch copies of the parameters it lands in (this rank's
    shard); returns them by our parameter name. An error while iterating leaves every live parameter as it
    was. ``fail_at``: test-only fault injection (raise at that tensor)."""
    from flotilla.model.loader import (
        load_into,  # the same narrowing as the checkpoint loader
    )

    scratch: dict[str, torch.nn.Parameter] = {}
    for i, (name, tensor) in enumerate(items):
        if progress is not None and i % 8 == 0:
            progress()
        if fail_at is not None and i == fail_at:
            raise ValueError(f"weights: {name!r}: fault injected while staging (FLOTILLA_FAULT_WEIGHTS)")
        hit = router.resolve(name)
        if hit is None:
            continue
        target, param, part = hit
        dst = scratch.get(target)
        if dst is None:
            dst = scratch[target] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
        with torch.no_grad():
            try:
                load_into(dst, param, tensor.to(device=param.device, dtype=param.dtype), part)
            except (ValueError, RuntimeError, IndexError, TypeError) as e:
                raise ValueError(f"weights: {name!r}: {e}") from None
    return scratch


def load_files(runner: Any, paths: Iterable[str]) -> None:
    """A replica starting up replays earlier file updates (each staged, then committed: nothing serves yet)."""
    from flotilla.model.loader import WeightRouter

    router = WeightRouter(runner.model)
    for path in paths:
        Staged(0, 0, router, stage(router, receive(FileSource(path), RankContext(0)))).commit()
    _sync(runner)


def handles(op: Any) -> bool:
    """Whether ``op`` is a weight op (this module runs it)."""
    return isinstance(op, WEIGHT_OPS)


def run(op: Any, runner: Any, group_rank: int, replica: int = 0, progress: Progress = None) -> None:
    """This rank's part of one weight op (every rank of the replica group runs it in the same step); raises
    on failure, and the worker's agreement decides what happens next (``undo`` on every rank when any
    failed)."""
    global _slot
    if isinstance(op, InitWeightSyncGroup):
        broadcast.join(op.group_name, op.master_address, op.master_port, op.world_size, op.ranks[group_rank],
                       op.backend, op.timeout_s, progress, connect_timeout_s=op.connect_timeout_s)
    elif isinstance(op, DestroyWeightSyncGroup):
        broadcast.leave(op.group_name)  # idempotent: the front end also sends it to clean up after a failed join
    elif isinstance(op, UpdateWeights):
        from flotilla.model.loader import WeightRouter
        from flotilla.worker.faults import weight_fault

        _slot = None  # a stage a front end gave up on
        if runner.weights_offloaded:
            raise RuntimeError("weights are released; resume memory before updating them")
        router = WeightRouter(runner.model)
        items = receive(op.source, RankContext(group_rank, progress))
        scratch = stage(router, items, progress, fail_at=weight_fault(op.version, replica, group_rank))
        _slot = Staged(op.op_id, op.version, router, scratch)
    elif isinstance(op, CommitWeights):
        staged, _slot = _slot, None
        if staged is None or staged.stage_id != op.stage_id:
            raise RuntimeError(f"commit: update {op.stage_id} is not staged on this rank")
        if runner.weights_offloaded:
            raise RuntimeError("weights are released; resume memory before updating them")
        staged.commit()
        _sync(runner)
    elif isinstance(op, DiscardWeights):
        if _slot is not None and _slot.stage_id == op.stage_id:
            _slot = None
    else:
        raise TypeError(f"not a weight op: {type(op).__name__}")


def undo(op: Any) -> None:
    """Some rank of the group failed ``op``: undo this rank's part (drop a staged update, leave a group)."""
    global _slot
    if isinstance(op, UpdateWeights):
        _slot = None
    elif isinstance(op, InitWeightSyncGroup):  # all ranks in the group, or none
        broadcast.leave(op.group_name)


def staged_update() -> Staged | None:
    """What this rank staged and has not committed or dropped (for tests and diagnostics)."""
    return _slot


def _sync(runner: Any) -> None:
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
