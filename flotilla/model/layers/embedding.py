"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.distributed import ParallelGroup, get_group


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, group: ParallelGroup | None = None):
        super().__init__()
        self.group = group or get_group("tp")
        tp = self.group.size
        self.vocab_size = vocab_size
        self.vocab_local = (vocab_size + tp - 1) // tp  # the last shard is padded
        self.start = self.group.rank * self.vocab_local
        self.weight = nn.Parameter(torch.empty(self.vocab_local, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"shape mismatch: expected ({self.vocab_size}, {param.shape[1]}), "
                             f"got {tuple(loaded.shape)}")
        rows = max(0, min(self.vocab_local, self.vocab_size - self.start))
        param.data.zero_()
        param.data[:rows].copy_(loaded.narrow(0, self.start, rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.vocab_local)
        out = F.embedding(local.clamp(0, self.vocab_local - 1), self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return self.group.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary slice, gathered so every rank holds the full [N, vocab] row."""

    def __init__(self, vocab_size: int, hidden_size: int, group: ParallelGroup | None = None):
        super().__init__(vocab_size, hidden_size, group)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = F.linear(hidden, self.weight)
        logits = self.group.all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]
