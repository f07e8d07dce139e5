"""LoRA on the model's parallel linear layers: per-layer slot buffers, and the per-forward batch they read.

Every targeted base layer gets a ``LoraLinear`` (as its ``lora`` attribute) holding ``max_loras`` device slots:
``A [slots, R, in]`` and ``B [slots, out, R]``, sharded the way the base layer is:

- column-parallel (``qkv_proj``, ``gate_up_proj``): A whole, B's output rows split like the base weight's (the
  base layer's own ``weight_loader`` narrows them, q/k/v and KV-head replication included); the update needs
  no communication.
- row-parallel (``o_proj``, ``down_proj``): A's input columns split like the base weight's, B whole; each rank
  adds its partial update to its partial sum *before* the all-reduce, so the reduce sums both at once.

A fused base layer (q, k, v in one matmul; gate and up) has one slot per part side by side along the rank
axis: part ``j`` uses A rows and B columns ``[j*max_rank, j*max_rank + r)`` and only its own output rows of B,
so one shrink and one expand serve all parts. Ranks below ``max_lora_rank`` are zero-padded.

``LoraBatch`` says which rows of this forward use which slot; every ``LoraLinear`` of the model shares it. It
is set once per forward (``set_rows``); CUDA graphs read it from static buffers filled before each replay.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from flotilla.lora.kernels import BLOCK_M, Segments, apply_reference, apply_triton, max_blocks, segments

# (our fused module, its parts as the base weight_loader names them, the PEFT target of each part)
FUSED = {
    "qkv_proj": (("q", "k", "v"), ("q_proj", "k_proj", "v_proj")),
    "gate_up_proj": ((0, 1), ("gate_proj", "up_proj")),
    "o_proj": ((None,), ("o_proj",)),
    "down_proj": ((None,), ("down_proj",)),
}


class LoraBatch:
    """The rows of one forward that run an adapter, by slot. ``active`` is False for a batch of base-model
    requests only (then no LoRA kernel runs at all)."""

    def __init__(self, num_slots: int, device: torch.device, use_triton: bool):
        self.num_slots, self.device, self.use_triton = num_slots, device, use_triton
        self.active = False
        self.groups: list[tuple[int, torch.Tensor]] = []  # reference path
        self.meta: tuple[torch.Tensor, ...] = ()           # triton path: perm, slot, start, length
        self._graph: tuple[torch.Tensor, ...] | None = None

    def set_rows(self, slot_ids: np.ndarray) -> None:
        """This forward's slot per row (-1: the base model)."""
        seg = segments(slot_ids)
        self.active = seg.num_rows > 0
        if not self.active:
            return
        dev = self.device
        if self.use_triton:  # one host-to-device copy, four views
            t, nb = seg.num_rows, seg.length.shape[0]
            flat = torch.from_numpy(np.concatenate([seg.perm, seg.slot, seg.start, seg.length])).to(dev)
            self.meta = (flat[:t], flat[t:t + nb], flat[t + nb:t + 2 * nb], flat[t + 2 * nb:])
        else:
            self.groups = [(s, torch.from_numpy(rows.astype(np.int64)).to(dev, non_blocking=True))
                           for s, rows in seg.groups]

    def clear(self) -> None:
        self.active = False

    # ---------------------------------------------------------------------------------------- CUDA graphs
    def graph_buffers(self, max_tokens: int) -> None:
        """Static metadata for graphs of up to ``max_tokens`` rows (the grid is fixed at its largest): one int32
        buffer holding perm, then the blocks' slot, start and length."""
        nb = max_blocks(max_tokens, self.num_slots)
        self._graph_shape = (max_tokens, nb)
        buf = torch.zeros(max_tokens + 3 * nb, dtype=torch.int32, device=self.device)
        self._graph_buf = buf
        self._graph = (buf[:max_tokens], buf[max_tokens:max_tokens + nb], buf[max_tokens + nb:max_tokens + 2 * nb],
                       buf[max_tokens + 2 * nb:])

    def use_graph(self) -> None:
        """Capture: the kernels read the static buffers (every block empty until ``fill_graph``)."""
        assert self._graph is not None
        self._graph_buf.zero_()
        self.active, self.meta = True, self._graph

    def fill_graph(self, slot_ids: np.ndarray) -> None:
        """Put this replay's segments into the static buffers (unused blocks get length 0): one copy."""
        assert self._graph is not None
        t_max, nb_max = self._graph_shape
        seg = segments(slot_ids)
        nb, t = seg.length.shape[0], seg.num_rows
        host = np.zeros(t_max + 3 * nb_max, dtype=np.int32)
        host[:t] = seg.perm
        host[t_max:t_max + nb] = seg.slot
        host[t_max + nb_max:t_max + nb_max + nb] = seg.start
        host[t_max + 2 * nb_max:t_max + 2 * nb_max + nb] = seg.length
        self._graph_buf.copy_(torch.from_numpy(host))
        self.active, self.meta = True, self._graph


class LoraLinear:
    """The slots of one base layer. ``kind``: "column" or "row" (how the base layer is split). A plain object, not
    a module: its buffers are not parameters (weight updates, offloading and the checkpoint loader skip them)."""

    def __init__(self, base: Any, module: str, kind: str, max_loras: int, max_rank: int, batch: LoraBatch,
                 dtype: torch.dtype, device: torch.device):
        self.module, self.kind, self.batch = module, kind, batch
        self.parts, self.targets = FUSED[module]
        self.max_rank = max_rank
        self.rank_width = max_rank * len(self.parts)
        self.base_loader = base.weight_loader
        if kind == "column":
            self.in_dim, self.out_dim = base.in_features, base.out_local
        else:
            self.in_dim, self.out_dim = base.in_local, base.weight.shape[0]
        self.a = torch.zeros((max_loras, self.rank_width, self.in_dim), dtype=dtype, device=device)
        self.b = torch.zeros((max_loras, self.out_dim, self.rank_width), dtype=dtype, device=device)

    def shard(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (A, B) for one adapter, in the slot layout: ``parts`` maps a PEFT target of this layer to
        its full (A [r, in], B [out, r]); scaling folded into B; missing parts stay zero."""
        a = torch.zeros((self.rank_width, self.in_dim), dtype=dtype)
        b = torch.zeros((self.out_dim, self.rank_width), dtype=dtype)
        for j, (part, target) in enumerate(zip(self.parts, self.targets)):
            if target not in parts:
                continue
            a_full, b_full = parts[target]
            r = a_full.shape[0]
            lo = j * self.max_rank
            b_full = b_full.to(torch.float32) * scaling
            if self.kind == "column":
                a[lo:lo + r].copy_(a_full)
                local = torch.zeros((self.out_dim, r), dtype=torch.float32)
                if part is None:
                    self.base_loader(local, b_full)
                else:
                    self.base_loader(local, b_full, part)
                b[:, lo:lo + r].copy_(local)
            else:
                local_a = torch.zeros((r, self.in_dim), dtype=torch.float32)
                self.base_loader(local_a, a_full.to(torch.float32))
                a[lo:lo + r].copy_(local_a)
                b[:, lo:lo + r].copy_(b_full)
        return a, b

    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Put one adapter's shards into ``slot`` (None: this adapter does not target this layer)."""
        if a is None:
            self.a[slot].zero_()
            self.b[slot].zero_()
            return
        self.a[slot].copy_(a, non_blocking=True)
        self.b[slot].copy_(b, non_blocking=True)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base layer's output, or a row-parallel rank's partial sum) plus this batch's updates."""
        batch = self.batch
        if not batch.active:
            return y
        if batch.use_triton:
            perm, bslot, bstart, blen = batch.meta
            return apply_triton(x, y, self.a, self.b, perm, bslot, bstart, blen, rank=self.rank_width)
        return apply_reference(x, y, self.a, self.b, batch.groups)


def kernel_choice(device: torch.device) -> bool:
    """Whether the Triton kernels run (CUDA and triton importable, unless FLOTILLA_LORA_KERNEL=torch)."""
    if device.type != "cuda" or os.environ.get("FLOTILLA_LORA_KERNEL", "") == "torch":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def attach(model: Any, max_loras: int, max_rank: int, batch: LoraBatch, dtype: torch.dtype,
           device: torch.device) -> dict[tuple[int, str], LoraLinear]:
    """A ``LoraLinear`` on every attention and dense-MLP projection of the model's own layers (a pipeline stage:
    its layers only), set as the base layer's ``lora``; by (layer index, our module name)."""
    out: dict[tuple[int, str], LoraLinear] = {}
    for idx, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:  # a placeholder for another pipeline stage's layer
            continue
        mods = {"qkv_proj": (attn.qkv_proj, "column"), "o_proj": (attn.o_proj, "row")}
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):  # dense MLP (a MoE block's experts take no adapter)
            mods["gate_up_proj"] = (mlp.gate_up_proj, "column")
            mods["down_proj"] = (mlp.down_proj, "row")
        for name, (base, kind) in mods.items():
            lin = LoraLinear(base, name, kind, max_loras, max_rank, batch, dtype, device)
            base.lora = lin
            out[(idx, name)] = lin
    return out


def supported_targets(model: Any) -> tuple[str, ...]:
    """The PEFT targets this model serves: the attention projections, and the MLP's where every layer is dense."""
    from flotilla.lora.adapter import ATTENTION_TARGETS, TARGETS

    dense = all(hasattr(layer.mlp, "gate_up_proj") for layer in model.model.layers if hasattr(layer, "mlp"))
    return TARGETS if dense else ATTENTION_TARGETS


__all__ = ["BLOCK_M", "FUSED", "LoraBatch", "LoraLinear", "Segments", "attach", "kernel_choice", "supported_targets"]
