"""Rank layout, as pure functions: which processes make up each failure domain and whom the router sees.

A *group* is one torch.distributed world (one failure domain, restarted as a unit). A *replica* is what the
DP controller routes to: it owns its requests and KV cache and is led by one rank. Without DP attention a
group holds one replica; with DP attention its attention-DP ranks are the replicas (docs/architecture.md's
glossary).

- Without DP attention: dp groups of tp ranks; group d is replica d; its rank 0 leads.
- With DP attention: one group of tp ranks; replica a is led by rank a * (tp / dp).
- With pipeline parallelism (pp_size > 1, no DP attention): each group has pp * tp ranks; rank
  = stage * tp + tp_rank, stage 0's tp-rank 0 leads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flotilla.errors import InvalidParameter

MAX_DP_SIZE = 256  # replicas ``scale`` grows to at most (a launcher may hold fewer: ``max_ranks``)
MAX_DRAIN_TIMEOUT_S = 24 * 3600.0


def check_scale(dp_size: Any, drain_timeout_s: Any, ranks_per_replica: int = 1, max_ranks: int | None = None) -> None:
    """``scale``'s arguments, before anything changes: dp_size within what the machine holds, a finite drain."""
    limit = MAX_DP_SIZE if max_ranks is None else max(1, min(MAX_DP_SIZE, max_ranks // max(1, ranks_per_replica)))
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or not 1 <= dp_size <= limit:
        why = "" if max_ranks is None else f" ({max_ranks} ranks fit this launcher, {ranks_per_replica} per replica)"
        raise InvalidParameter("dp_size", f"must be an int in [1, {limit}]{why}, got {dp_size!r}")
    if isinstance(drain_timeout_s, bool) or not isinstance(drain_timeout_s, (int, float)) or \
            not 0 <= drain_timeout_s <= MAX_DRAIN_TIMEOUT_S or not math.isfinite(drain_timeout_s):
        raise InvalidParameter("drain_timeout_s",
                               f"must be a finite number of seconds in [0, {MAX_DRAIN_TIMEOUT_S:.0f}], "
                                                  f"got {drain_timeout_s!r}")


@dataclass(frozen=True)
class GroupSpec:
    group_id: int
    world_size: int
    attn_tp_size: int
    leaders: tuple[tuple[int, int], ...]   # (replica id, rank within the group that leads it)
    first_global_rank: int                 # for device placement: global rank of the group's rank 0
    pp_size: int = 1                       # pipeline stages; world_size = pp_size * (ranks per stage)

    @property
    def replicas(self) -> list[int]:
        return [t for t, _ in self.leaders]

    def leader_rank(self, replica: int) -> int:
        return dict(self.leaders)[replica]

    def replica_of_rank(self, rank: int) -> int:
        """The replica a rank works for (its stage's position picks the attention group)."""
        return self.replicas[(rank % (self.world_size // self.pp_size)) // self.attn_tp_size]

    def renumbered(self, group_id: int, replica_ids: list[int], first_global_rank: int | None = None) -> GroupSpec:
        """The same layout under fresh ids (a restart or a new replica never reuses one)."""
        return GroupSpec(group_id, self.world_size, self.attn_tp_size,
                         tuple((new, r) for new, (_, r) in zip(replica_ids, self.leaders)),
                         self.first_global_rank if first_global_rank is None else first_global_rank, self.pp_size)


def check_layout(tp_size: int, dp_size: int, enable_dp_attention: bool, pp_size: int = 1) -> None:
    """The one home of the layout rules (EngineConfig.validate calls this too)."""
    for name, value in (("tp_size", tp_size), ("dp_size", dp_size), ("pp_size", pp_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidParameter(name, f"must be an int >= 1, got {value!r}")
    if pp_size > 1 and enable_dp_attention:
        raise InvalidParameter("pp_size", "pipeline parallelism is not supported with enable_dp_attention "
                                          f"(got pp_size={pp_size}); use pp_size=1 or enable_dp_attention=False")
    if enable_dp_attention and tp_size % dp_size:
        raise InvalidParameter("dp_size",
                               f"with enable_dp_attention, dp_size must divide tp_size; got dp_size={dp_size}, "
                                          f"tp_size={tp_size}")


def layout(tp_size: int, dp_size: int, enable_dp_attention: bool, pp_size: int = 1) -> list[GroupSpec]:
    check_layout(tp_size, dp_size, enable_dp_attention, pp_size)
    if pp_size > 1:
        per = pp_size * tp_size
        return [GroupSpec(d, per, tp_size, ((d, 0),), d * per, pp_size) for d in range(dp_size)]
    if enable_dp_attention:
        attn_tp = tp_size // dp_size
        return [GroupSpec(0, tp_size, attn_tp, tuple((a, a * attn_tp) for a in range(dp_size)), 0)]
    return [GroupSpec(d, tp_size, tp_size, ((d, 0),), d * tp_size) for d in range(dp_size)]


def replica_group(group_id: int, replica: int, tp_size: int, first_global_rank: int, pp_size: int = 1) -> GroupSpec:
    """One more plain replica (what scaling adds): ``pp_size * tp_size`` ranks leading one replica."""
    return GroupSpec(group_id, tp_size * pp_size, tp_size, ((replica, 0),), first_global_rank, pp_size)


def world_size(tp_size: int, dp_size: int, enable_dp_attention: bool, pp_size: int = 1) -> int:
    return tp_size if enable_dp_attention else tp_size * dp_size * pp_size


def group_world_size(cfg) -> int:
    """Ranks in one torch.distributed group (one replica, or the one DP-attention group) for an EngineConfig:
    these ranks talk over NCCL, so on GPUs each needs a device of its own."""
    return layout(cfg.tp_size, cfg.dp_size, cfg.enable_dp_attention, cfg.pp_size)[0].world_size


def device_index(global_rank: int, num_devices: int) -> int | None:
    """GPU of a rank on one node (mp launcher): ranks fill devices in order, wrapping when shared."""
    return None if num_devices <= 0 else global_rank % num_devices
