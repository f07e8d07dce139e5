"""DP attention: attention runs per attention-DP group on its own tokens; the MLP/MoE runs tensor parallel
over every group's tokens at once. Around each MLP the groups' hidden states are gathered (token counts
differ per group) and each group then keeps only its own rows of the all-reduced result."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flotilla.distributed.groups import get_group


def dp_attention_mlp(counts: list[int]) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    group = get_group("attn_dp")
    offset = sum(counts[: group.rank])
    mine = counts[group.rank]

    def run(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        full = group.all_gather_varlen(x, counts)
        return mlp(full)[offset:offset + mine]

    return run
