"""Qwen3-MoE: the Qwen3 decoder with a sparse MoE block in place of the dense MLP on its sparse layers."""

from __future__ import annotations

import re

import torch
from torch import nn

from flotilla.model.layers.moe import FusedMoE
from flotilla.model.models.llama import MLP, Qwen3ForCausalLM

_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.normalize = bool(getattr(cfg, "norm_topk_prob", True))
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.experts = FusedMoE(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """``reduce=False``: this rank's partial sum of the experts (the caller reduces over the TP group)."""
        return self.experts(x, self.gate(x), self.top_k, self.normalize, reduce=reduce)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    @staticmethod
    def make_mlp(cfg, layer_idx: int) -> nn.Module:
        sparse_step = getattr(cfg, "decoder_sparse_step", 1) or 1
        mlp_only = set(getattr(cfg, "mlp_only_layers", None) or [])
        if layer_idx not in mlp_only and cfg.num_experts > 0 and (layer_idx + 1) % sparse_step == 0:
            return SparseMoeBlock(cfg)
        return MLP(cfg.hidden_size, cfg.intermediate_size)

    def resolve_weight_name(self, name: str) -> tuple[str, object] | None:
        m = _EXPERT.match(name)
        if m is None:
            return None
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        if proj == "down_proj":
            return f"{prefix}.experts.w2_weight", expert
        return f"{prefix}.experts.w13_weight", (expert, 0 if proj == "gate_proj" else 1)

    def expected_weight_names(self, names: set[str]) -> set[str]:
        out: set[str] = set()
        for n in names:
            if n.endswith("experts.w13_weight"):
                out.update(f"{n}:{(e, w)}" for e in range(self.config.num_experts) for w in (0, 1))
            elif n.endswith("experts.w2_weight"):
                out.update(f"{n}:{e}" for e in range(self.config.num_experts))
            else:
                out.add(n)
        return out
