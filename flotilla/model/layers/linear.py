"""Tensor-parallel linear layers. Each parameter carries a ``weight_loader`` that takes the full Hugging
Face tensor and copies in this rank's shard, so loading from disk and in-place weight updates share one path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.distributed import ParallelGroup, get_group


def _set_loader(param: nn.Parameter, loader) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs loaded {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _expect_rows(loaded: torch.Tensor, rows: int, dim: int = 0) -> None:
    """The full (unsharded) tensor must have exactly ``rows`` along ``dim``: narrowing alone would accept a
    larger tensor and silently load a slice of it."""
    if loaded.dim() <= dim or loaded.shape[dim] != rows:
        raise ValueError(f"shape mismatch: expected {rows} along dim {dim}, got {tuple(loaded.shape)}")


class ColumnParallelLinear(nn.Module):
    """y = x W^T, with W's output rows split across the group; the output stays sharded. ``lora``: the layer's
    LoRA slots when adapters are enabled (``flotilla.lora.layers``), added to the output."""

    lora = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group: ParallelGroup | None = None):
        super().__init__()
        self.group = group or get_group("tp")
        if out_features % self.group.size:
            raise ValueError(f"output size {out_features} is not divisible by tp size {self.group.size}")
        self.in_features, self.out_features = in_features, out_features
        self.out_local = out_features // self.group.size
        self.weight = _set_loader(nn.Parameter(torch.empty(self.out_local, in_features), requires_grad=False),
                                  self.weight_loader)
        self.bias = (_set_loader(nn.Parameter(torch.empty(self.out_local), requires_grad=False), self.weight_loader)
                     if bias else None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _expect_rows(loaded, self.out_features)
        shard = loaded.shape[0] // self.group.size
        default_weight_loader(param, loaded.narrow(0, self.group.rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.lora is None else self.lora(x, y)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (gate and up); each is sharded on its own."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 group: ParallelGroup | None = None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, group)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is None:
            raise ValueError("a merged projection needs the index of the part being loaded")
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"unknown part {shard_id!r} of a projection fused from {len(self.output_sizes)}")
        _expect_rows(loaded, self.output_sizes[shard_id])
        tp = self.group.size
        offset = sum(self.output_sizes[:shard_id]) // tp
        size = self.output_sizes[shard_id] // tp
        dst = param.data.narrow(0, offset, size)
        src = loaded.narrow(0, self.group.rank * size, size)
        if dst.shape != src.shape:
            raise ValueError(f"shape mismatch: expected {tuple(dst.shape)}, got {tuple(src.shape)}")
        dst.copy_(src)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one matmul. Query heads split across ranks; KV heads split too, or replicated when
    there are fewer KV heads than ranks (each rank keeps the KV head its query heads use)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 group: ParallelGroup | None = None):
        group = group or get_group("tp")
        tp = group.size
        if num_heads % tp:
            raise ValueError(f"num_attention_heads ({num_heads}) must be divisible by the attention TP size ({tp})")
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) and attention TP size ({tp}) "
                             "must divide one another")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.total_kv_heads = num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias, group)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        hd, rank, tp = self.head_dim, self.group.rank, self.group.size
        q_size, kv_size = self.num_heads * hd, self.num_kv_heads * hd
        if shard_id == "q":
            _expect_rows(loaded, q_size * tp)
            dst, start = param.data.narrow(0, 0, q_size), rank * q_size
        elif shard_id in ("k", "v"):
            _expect_rows(loaded, self.total_kv_heads * hd)
            base = q_size if shard_id == "k" else q_size + kv_size
            dst = param.data.narrow(0, base, kv_size)
            kv_rank = rank // (tp // self.total_kv_heads) if tp > self.total_kv_heads else rank
            start = kv_rank * kv_size
        else:
            raise ValueError(f"unknown qkv part {shard_id!r}")
        src = loaded.narrow(0, start, dst.shape[0])
        if dst.shape != src.shape:
            raise ValueError(f"shape mismatch: expected {tuple(dst.shape)}, got {tuple(src.shape)}")
        dst.copy_(src)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split: each rank holds a partial sum, all-reduced across the group.
    ``lora``: the layer's LoRA slots (``flotilla.lora.layers``); each rank adds its partial update before the
    reduce, which sums both."""

    lora = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group: ParallelGroup | None = None):
        super().__init__()
        self.group = group or get_group("tp")
        if in_features % self.group.size:
            raise ValueError(f"input size {in_features} is not divisible by tp size {self.group.size}")
        self.in_local = in_features // self.group.size
        self.weight = _set_loader(nn.Parameter(torch.empty(out_features, self.in_local), requires_grad=False),
                                  self.weight_loader)
        self.bias = (_set_loader(nn.Parameter(torch.empty(out_features), requires_grad=False), default_weight_loader)
                     if bias else None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _expect_rows(loaded, self.in_local * self.group.size, dim=1)
        default_weight_loader(param, loaded.narrow(1, self.group.rank * self.in_local, self.in_local))

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """``reduce=False``: this rank's partial sum, for a caller that reduces it itself (DP attention's
        reduce-scatter); the bias is then added on group rank 0 only, so the sum holds it once."""
        y = F.linear(x, self.weight)
        if self.lora is not None:
            y = self.lora(x, y)
        if reduce:
            y = self.group.all_reduce(y)
        if self.bias is not None and (reduce or self.group.rank == 0):
            y = y + self.bias
        return y
