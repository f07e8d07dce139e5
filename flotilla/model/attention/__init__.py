"""Attention backends. ``torch`` is the reference everywhere; GPU backends register here when importable."""

from __future__ import annotations

from flotilla.model.attention.metadata import AttentionMetadata
from flotilla.model.attention.torch_backend import TorchAttention, write_kv


def make_backend(name: str, device: str):
    """``auto`` picks the fastest backend measured on this device kind (see docs/benchmarks.md)."""
    if name == "torch" or (name == "auto" and device == "cpu"):
        return TorchAttention()
    if name in ("triton", "auto"):
        try:
            from flotilla.model.attention.triton_backend import TritonAttention
        except ImportError:
            if name == "triton":
                raise
            return TorchAttention()
        return TritonAttention()
    raise ValueError(f"attention_backend: unknown backend {name!r}")


__all__ = ["AttentionMetadata", "TorchAttention", "make_backend", "write_kv"]
