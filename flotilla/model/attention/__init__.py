"""Attention backends. ``torch`` is the reference everywhere; GPU backends register here when importable."""

from __future__ import annotations

import torch

from flotilla.model.attention.metadata import AttentionMetadata
from flotilla.model.attention.torch_backend import TorchAttention, write_kv


def make_backend(name: str, device: str | torch.device):
    """``auto`` is ``triton`` on CUDA (the faster of the two there: see docs/benchmarks.md) and ``torch``
    elsewhere or when Triton is not installed; ``triton`` insists on Triton and a CUDA device."""
    dev = torch.device(device)
    if name == "torch" or (name == "auto" and dev.type != "cuda"):
        return TorchAttention()
    if name in ("triton", "auto"):
        from flotilla.model.attention.triton_backend import HAS_TRITON, TritonAttention

        if not HAS_TRITON or dev.type != "cuda":
            if name == "triton":
                raise ValueError("attention_backend: 'triton' needs a CUDA device and the triton package")
            return TorchAttention()
        return TritonAttention(dev)
    raise ValueError(f"attention_backend: unknown backend {name!r}")


__all__ = ["AttentionMetadata", "TorchAttention", "make_backend", "write_kv"]
