"""What every attention backend needs to know about one forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """A flat batch of tokens from several sequences.

    Sequence i contributes tokens ``cu_q[i]:cu_q[i+1]`` of the batch, which sit at positions
    ``context_lens[i] - q_lens[i] .. context_lens[i] - 1`` of that sequence; after this pass its KV cache
    holds ``context_lens[i]`` tokens in the pages ``block_tables[i]``.
    """

    slot_mapping: torch.Tensor        # [T] int64: flat KV slot (block * block_size + offset) of each new token
    cu_q: torch.Tensor                # [B + 1] int32 on device
    context_lens: torch.Tensor        # [B] int32 on device
    block_tables: torch.Tensor        # [B, max_blocks] int32 on device (padded with 0)
    q_lens_cpu: list[int]
    context_lens_cpu: list[int]
    block_size: int
    max_q_len: int
    max_context_len: int
    is_decode: bool                   # every sequence contributes exactly one token
    extra: dict[str, Any] = field(default_factory=dict)  # a backend's per-forward plan (e.g. Triton's query tiles)

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens_cpu)
