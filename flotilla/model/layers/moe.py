"""Mixture-of-experts MLP with experts sharded tensor-parallel (each rank holds a slice of every expert's
intermediate dimension).

Two backends compute the same thing: on CUDA the Triton fused MoE (``fused_moe.py``: routing, sort/pad and
grouped GEMMs on the device, no host sync, graph-capturable); elsewhere, and as the reference, the torch
grouped path below (tokens sorted by expert once, one matmul per expert that has tokens).
``FLOTILLA_MOE_BACKEND=torch`` forces the reference on CUDA too."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.distributed import ParallelGroup, get_group


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in float32, top-k, optional renormalisation (as Qwen3-MoE / Mixtral do)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def grouped_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]); w13 [E, 2I, H] (gate then up), w2 [E, H, I]."""
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    xs = x[token_of]
    out = torch.empty(xs.shape[0], w2.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        gate_up = F.linear(xs[start:start + n], w13[e])
        gate, up = gate_up.chunk(2, dim=-1)
        out[start:start + n] = F.linear(F.silu(gate) * up, w2[e])
        start += n
    out = out * weights.reshape(-1)[order].unsqueeze(-1)
    result = torch.zeros_like(x)
    result.index_add_(0, token_of, out)
    return result


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, group: ParallelGroup | None = None):
        super().__init__()
        self.group = group or get_group("tp")
        tp = self.group.size
        if intermediate_size % tp:
            raise ValueError(f"moe_intermediate_size ({intermediate_size}) must be divisible by tp size ({tp})")
        self.num_experts = num_experts
        self.inter_local = intermediate_size // tp
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.inter_local, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter_local), requires_grad=False)
        self.w13_weight.weight_loader = self._load_w13  # type: ignore[attr-defined]
        self.w2_weight.weight_loader = self._load_w2  # type: ignore[attr-defined]

    def _load_w13(self, param: nn.Parameter, loaded: torch.Tensor, part: tuple[int, int]) -> None:
        expert, which = part
        n = self.inter_local
        self._check_part(expert, loaded, 0)
        if which not in (0, 1):
            raise ValueError(f"unknown gate/up part {which!r}")
        src = loaded.narrow(0, self.group.rank * n, n)
        dst = param.data[expert].narrow(0, which * n, n)
        if dst.shape != src.shape:
            raise ValueError(f"shape mismatch: expected {tuple(dst.shape)}, got {tuple(src.shape)}")
        dst.copy_(src)

    def _load_w2(self, param: nn.Parameter, loaded: torch.Tensor, expert: int) -> None:
        n = self.inter_local
        self._check_part(expert, loaded, 1)
        src = loaded.narrow(1, self.group.rank * n, n)
        dst = param.data[expert]
        if dst.shape != src.shape:
            raise ValueError(f"shape mismatch: expected {tuple(dst.shape)}, got {tuple(src.shape)}")
        dst.copy_(src)

    def _check_part(self, expert: int, loaded: torch.Tensor, split_dim: int) -> None:
        """A real expert id, and the full (unsharded) intermediate size along the dimension TP splits."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range [0, {self.num_experts})")
        full = self.inter_local * self.group.size
        if loaded.dim() != 2 or loaded.shape[split_dim] != full:
            raise ValueError(f"shape mismatch: expected {full} along dim {split_dim}, got {tuple(loaded.shape)}")

    def uses_triton(self, x: torch.Tensor) -> bool:
        from flotilla.model.layers import fused_moe

        return x.is_cuda and fused_moe.triton is not None and os.environ.get("FLOTILLA_MOE_BACKEND", "auto") != "torch"

    def experts_only(self, x: torch.Tensor, router_logits: torch.Tensor, top_k: int, normalize: bool) -> torch.Tensor:
        """This rank's partial sum of the routed experts (before the TP reduction)."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        if self.uses_triton(x):
            from flotilla.model.layers.fused_moe import fused_moe

            return fused_moe(x, router_logits, self.w13_weight, self.w2_weight, top_k, normalize)
        weights, ids = route(router_logits, top_k, normalize)
        return grouped_experts(x, self.w13_weight, self.w2_weight, weights, ids)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor, top_k: int, normalize: bool,
                reduce: bool = True) -> torch.Tensor:
        y = self.experts_only(x, router_logits, top_k, normalize)
        return self.group.all_reduce(y) if reduce else y
