"""DP attention: attention runs per attention-DP group on its own tokens; the MLP/MoE runs tensor parallel
over every group's tokens at once.

Around each MLP: the groups' hidden states are all-gathered over the attention-DP group (token counts
differ per group and are host data every rank has, so nothing syncs), every rank computes its partial sum
of the MLP over all the tokens, and the partial sums are reduced in two steps that together sum over the
whole TP world (rank = dp_rank * attn_tp_size + attn_tp_rank):

1. a reduce-scatter over the attention-DP group: each rank receives, for its own group's rows only, the sum
   over the DP groups of the partial sums of the ranks with its attention-TP rank;
2. an all-reduce over the attention-TP group, of those rows only, sums over the attention-TP ranks.

Against the old all-reduce of every group's rows followed by a slice, each rank moves and sums
(dp - 1) / dp of the gathered rows once instead of all of them, and the attention-TP all-reduce carries one
group's rows rather than all.

Layouts: when the groups' counts are close (decode; ``padded_layout``), the gathered tensor stays in the
padded [dp * width] layout and the MLP runs on it as is (padding rows are zeros and are dropped by the
reduce-scatter's slice), so there is no compaction copy at all and the collectives have fixed shapes; a
CUDA graph of a DP-attention layout pads every group to the graph's width and an idle group runs an empty
batch of that width, so every rank issues the same collectives. Otherwise (unbalanced prefill) the rows are
compacted first, so the MLP does no padded work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flotilla.distributed.groups import get_group

# The padded layout costs (dp * width - sum(counts)) rows of MLP work; accept it up to this share.
PADDING_SLACK = 1.25


def padded_layout(counts: list[int]) -> bool:
    width = max(max(counts), 1)
    return len(counts) * width <= PADDING_SLACK * max(sum(counts), 1)


def dp_attention_mlp(counts: list[int],
                     padded: bool | None = None) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The ``mlp_fn`` of a forward with DP attention; ``counts``: every attention-DP group's token count
    this step. ``padded``: force the layout (None: ``padded_layout(counts)``)."""
    dp = get_group("attn_dp")
    attn_tp = get_group("attn_tp")
    mine = counts[dp.rank]
    width = max(max(counts), 1)
    use_padded = padded_layout(counts) if padded is None else padded

    def run(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if use_padded:
            partial = mlp(dp.all_gather_padded(x, width), reduce=False)
            own = dp.reduce_scatter_padded(partial, width)[:mine]
        else:
            partial = mlp(dp.all_gather_varlen(x, counts), reduce=False)
            own = dp.reduce_scatter_varlen(partial, counts)
        if mine == 0:  # the whole attention-TP group is idle (its ranks share the counts): nothing to sum
            return own
        return attn_tp.all_reduce(own.contiguous())

    return run


def dp_attention_mlp_reference(counts: list[int]) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The old path, kept as the reference: gather, the MLP with its own all-reduce over the world, slice."""
    group = get_group("attn_dp")
    offset = sum(counts[: group.rank])
    mine = counts[group.rank]

    def run(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        full = group.all_gather_varlen(x, counts)
        return mlp(full)[offset:offset + mine]

    return run
