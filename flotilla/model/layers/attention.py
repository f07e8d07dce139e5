"""The attention layer: writes this pass's K/V into the paged cache, then asks the backend for outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flotilla.model.attention import AttentionMetadata, write_kv


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache: torch.Tensor | None = None  # bound by the model runner after the KV pool is allocated
        self.v_cache: torch.Tensor | None = None
        self.backend: Any = None  # bound by the model runner with the KV pool

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # A backend may bring its own store (Triton's skips negative slots: padded CUDA-graph rows).
        store = getattr(self.backend, "write_kv", write_kv)
        store(self.k_cache, self.v_cache, k, v, meta.slot_mapping)
        o = self.backend.forward(q, self.k_cache, self.v_cache, meta, self.scale)
        return o.reshape(-1, self.num_heads * self.head_dim)
