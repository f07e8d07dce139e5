"""Rank layout, as pure functions: which processes make up each failure domain and whom the router sees.

A *group* is one torch.distributed world (one failure domain, restarted as a unit). A *target* is what the
DP controller routes to: a replica without DP attention, an attention-DP rank with it.

- Without DP attention: dp groups of tp ranks; group d is target d; its rank 0 leads.
- With DP attention: one group of tp ranks; target a is led by rank a * (tp / dp).
- With pipeline parallelism (pp_size > 1, no DP attention): each group has pp * tp ranks; rank
  = stage * tp + tp_rank, stage 0's tp-rank 0 leads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupSpec:
    group_id: int
    world_size: int
    attn_tp_size: int
    leaders: tuple[tuple[int, int], ...]   # (target id, rank within the group that owns it)
    first_global_rank: int                 # for device placement: global rank of the group's rank 0
    pp_size: int = 1                       # pipeline stages; world_size = pp_size * (ranks per stage)

    @property
    def targets(self) -> list[int]:
        return [t for t, _ in self.leaders]

    def leader_rank(self, target: int) -> int:
        return dict(self.leaders)[target]

    def target_of_rank(self, rank: int) -> int:
        """The target a rank works for (its stage's position picks the attention group)."""
        return self.targets[(rank % (self.world_size // self.pp_size)) // self.attn_tp_size]


def layout(tp_size: int, dp_size: int, enable_dp_attention: bool, pp_size: int = 1) -> list[GroupSpec]:
    if tp_size < 1 or dp_size < 1:
        raise ValueError(f"tp_size and dp_size must be >= 1, got tp_size={tp_size}, dp_size={dp_size}")
    if pp_size < 1:
        raise ValueError(f"pp_size: must be >= 1, got {pp_size}")
    if pp_size > 1:
        if enable_dp_attention:
            raise ValueError("pp_size: pipeline parallelism is not supported with enable_dp_attention")
        per = pp_size * tp_size
        return [GroupSpec(d, per, tp_size, ((d, 0),), d * per, pp_size) for d in range(dp_size)]
    if enable_dp_attention:
        if tp_size % dp_size:
            raise ValueError(f"dp_size: must divide tp_size with DP attention, got dp_size={dp_size}, tp_size={tp_size}")
        attn_tp = tp_size // dp_size
        return [GroupSpec(0, tp_size, attn_tp, tuple((a, a * attn_tp) for a in range(dp_size)), 0)]
    return [GroupSpec(d, tp_size, tp_size, ((d, 0),), d * tp_size) for d in range(dp_size)]


def replica_group(group_id: int, target: int, tp_size: int, first_global_rank: int, pp_size: int = 1) -> GroupSpec:
    """One more plain replica (what scaling adds): ``pp_size * tp_size`` ranks leading one target."""
    return GroupSpec(group_id, tp_size * pp_size, tp_size, ((target, 0),), first_global_rank, pp_size)


def world_size(tp_size: int, dp_size: int, enable_dp_attention: bool, pp_size: int = 1) -> int:
    return tp_size if enable_dp_attention else tp_size * dp_size * pp_size


def group_world_size(cfg) -> int:
    """Ranks in one torch.distributed group (one replica, or the one DP-attention group) for an EngineConfig:
    these ranks talk over NCCL, so on GPUs each needs a device of its own."""
    return layout(cfg.tp_size, cfg.dp_size, cfg.enable_dp_attention, cfg.pp_size)[0].world_size


def device_index(global_rank: int, num_devices: int) -> int | None:
    """GPU of a rank on one node (mp launcher): ranks fill devices in order, wrapping when shared."""
    return None if num_devices <= 0 else global_rank % num_devices
