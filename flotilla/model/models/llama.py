"""Llama-family decoder (Llama 2/3, Qwen2, Qwen3) built from the parallel layers.

Embedding, attention and LM head use the attention-TP group; the MLP uses the whole TP group. Without DP
attention the two are the same group; with it, ``mlp_fn`` gathers every attention group's tokens around
the MLP.

The three Hugging Face architectures differ only in qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3),
so one module with two switches serves them all.
"""

from __future__ import annotations

import torch
from torch import nn

from flotilla.distributed import get_group
from flotilla.model.attention import AttentionMetadata
from flotilla.model.layers.activation import silu_and_mul
from flotilla.model.layers.attention import Attention
from flotilla.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from flotilla.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from flotilla.model.layers.norm import RMSNorm
from flotilla.model.layers.rotary import RotaryEmbedding


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class SelfAttention(nn.Module):
    def __init__(self, cfg, rotary: RotaryEmbedding, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        group = get_group("attn_tp")
        hd = head_dim_of(cfg)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, hd, cfg.num_attention_heads, cfg.num_key_value_heads,
                                          bias=qkv_bias, group=group)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False, group=group)
        self.heads, self.kv_heads, self.hd = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, hd
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.attn = Attention(self.heads, self.kv_heads, hd, hd ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.heads * self.hd, self.kv_heads * self.hd
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(-1, self.heads, self.hd)
        k = k.reshape(-1, self.kv_heads, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v.reshape(-1, self.kv_heads, self.hd), meta))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """``reduce=False``: this rank's partial sum (the caller reduces over the TP group)."""
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)), reduce=reduce)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, rotary: RotaryEmbedding, qkv_bias: bool, qk_norm: bool, mlp: nn.Module):
        super().__init__()
        self.self_attn = SelfAttention(cfg, rotary, qkv_bias, qk_norm)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, meta: AttentionMetadata, mlp_fn,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it is added). The add is left to
        the next norm, which fuses it (``RMSNorm.add``); the sums are the same, in the same order."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm.add(h, residual)
        x, residual = self.post_attention_layernorm.add(self.self_attn(positions, x, meta), residual)
        return mlp_fn(self.mlp, x), residual


def _plain_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp(x)


class MissingLayer(nn.Module):
    """Stands for a decoder layer that lives on another pipeline stage: no parameters, never called.
    Placeholders keep each real layer at its checkpoint index, so parameter names match the checkpoint's."""


class DecoderModel(nn.Module):
    """``stage``: with pipeline parallelism, the pipeline stage this rank runs (its layer range
    [start, end); the first stage owns the embedding, the last the final norm). None: the whole model."""

    def __init__(self, cfg, max_positions: int, qkv_bias: bool, qk_norm: bool, make_mlp, stage=None):
        super().__init__()
        n = cfg.num_hidden_layers
        start, end = (stage.start, stage.end) if stage is not None else (0, n)
        self.is_first = stage is None or stage.is_first
        self.is_last = stage is None or stage.is_last
        self.start, self.end = start, end
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group=get_group("attn_tp")) \
            if self.is_first else None
        self.rotary = RotaryEmbedding(cfg, head_dim_of(cfg), max_positions)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.rotary, qkv_bias, qk_norm, make_mlp(cfg, i)) if start <= i < end else MissingLayer()
            for i in range(n))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.is_last else None

    def stage_layers(self) -> list[nn.Module]:
        return list(self.layers) if self.start == 0 and self.end == len(self.layers) else \
            list(self.layers[self.start:self.end])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, mlp_fn=_plain_mlp,
                hidden_in: torch.Tensor | None = None):
        """The final normed hidden states; on a pipeline stage other than the last, the residual stream after
        its layers (``hidden_in``: that of the previous stage, on a stage other than the first)."""
        h = self.embed_tokens(input_ids) if self.embed_tokens is not None else hidden_in
        layers = self.layers if self.start == 0 and self.end == len(self.layers) else self.layers[self.start:self.end]
        residual = None
        for layer in layers:
            h, residual = layer(positions, h, meta, mlp_fn, residual)
        if not self.is_last:
            return h if residual is None else h + residual
        if residual is None:  # no layers
            return self.norm(h)
        return self.norm.add(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    # Hugging Face parameter name part -> (our fused parameter name part, part id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg, max_positions: int, pp_stage=None):
        super().__init__()
        self.config = cfg
        self.pp_stage = pp_stage  # flotilla.distributed.pipeline.StageInfo, or None for the whole model
        self.model = DecoderModel(cfg, max_positions, self.qkv_bias, self.qk_norm, self.make_mlp, stage=pp_stage)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, group=get_group("attn_tp")) \
            if self.model.is_last else None
        if getattr(cfg, "tie_word_embeddings", False) and self.model.is_last and self.model.is_first:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def make_mlp(cfg, layer_idx: int) -> nn.Module:
        return MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                mlp_fn=_plain_mlp, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        if hidden_in is None:
            return self.model(input_ids, positions, meta, mlp_fn)
        return self.model(input_ids, positions, meta, mlp_fn, hidden_in=hidden_in)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.stage_layers()]  # type: ignore[union-attr, misc]


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
