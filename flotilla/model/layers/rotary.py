"""Rotary position embedding. Inverse frequencies come from transformers' own rope initialisers, so every
scaling type it knows (llama3, linear, yarn, ...) gives exactly the reference's frequencies."""

from __future__ import annotations

import torch
from torch import nn

from flotilla.model.layers import fused


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    cos: torch.Tensor  # buffers, registered in __init__
    sin: torch.Tensor

    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            partial = params.get("partial_rotary_factor", 1.0)
            dim = int(head_dim * partial)
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            scaling = 1.0
        else:
            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"rope_parameters.rope_type: {rope_type!r} is not supported")
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        pos = torch.arange(max_positions, dtype=torch.float32)
        # (scaled rope types build inv_freq on the CPU, while the model may be built under torch.device("cuda"))
        freqs = pos[:, None] * inv_freq.float().to(pos.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [N, heads, dim], k: [N, kv_heads, dim]; positions: [N]."""
        if fused.use_fused(q):  # one Triton launch for q and k instead of ~14 eager kernels (CUDA only)
            out = fused.rotary(positions, q, k, self.cos, self.sin)
            if out is not None:
                return out
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
