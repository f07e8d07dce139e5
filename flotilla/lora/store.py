"""One rank's adapters: every loaded adapter's shards in host memory, the device slots, and staged loads.

Loading is two-phase like a weight update (``LoadLora`` stages, ``CommitLora`` serves, ``DiscardLora`` drops),
so every rank of every replica either serves a new adapter or none does. An adapter's shards stay in host
memory (pinned on CUDA); a slot is filled from them when a step's ``lora_map`` asks for an adapter the slot
does not hold. Slots are assigned by the leader's scheduler (``flotilla.lora.slots``), which never moves an
adapter out of a slot while a running request uses it; the copy runs on the compute stream, after any step
still reading the slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flotilla.ipc.messages import CommitLora, DiscardLora, LoadLora, SeqPlan, UnloadLora
from flotilla.lora.adapter import read_adapter
from flotilla.lora.layers import FUSED, LoraBatch, LoraLinear, attach, kernel_choice, supported_targets

log = logging.getLogger(__name__)

# PEFT target -> our module that holds it
TARGET_MODULE = {t: mod for mod, (_, targets) in FUSED.items() for t in targets}


@dataclass(eq=False)
class RankAdapter:
    """One adapter as this rank holds it: (A, B) host shards per (layer, our module), in the slot layout."""

    name: str
    lora_id: int
    version: int
    rank: int
    shards: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class LoraStore:
    """Owned by the ModelRunner; ``bind`` and ``set_rows`` are called by its forward, ``run`` by the model-op
    step (every rank of the group in the same step)."""

    def __init__(self, model: Any, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device):
        self.max_loras, self.max_rank, self.dtype, self.device = max_loras, max_rank, dtype, device
        self.batch = LoraBatch(max_loras, device, kernel_choice(device))
        self.layers: dict[tuple[int, str], LoraLinear] = attach(model, max_loras, max_rank, self.batch, dtype, device)
        self.num_layers = len(model.model.layers)
        self.own_layers = sorted({idx for idx, _ in self.layers})
        self.targets = supported_targets(model)
        self.adapters: dict[str, RankAdapter] = {}
        self.slots: list[RankAdapter | None] = [None] * max_loras
        self.staged: dict[int, RankAdapter] = {}
        self.slot_loads = 0  # slots filled so far (an adapter moved in)

    # ------------------------------------------------------------------------------------------ loading
    def read(self, name: str, path: str, lora_id: int, version: int) -> RankAdapter:
        """Read and shard the adapter in ``path`` (raises naming what is wrong; nothing changes)."""
        layers = range(self.own_layers[0], self.own_layers[-1] + 1) if self.own_layers else range(0)
        adapter = read_adapter(path, self.max_rank, self.num_layers, self.targets, layers=layers)
        by_module: dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (layer, target), ab in adapter.tensors.items():
            by_module.setdefault((layer, TARGET_MODULE[target]), {})[target] = ab
        out = RankAdapter(name, lora_id, version, adapter.config.rank)
        pin = self.device.type == "cuda"
        for key, parts in by_module.items():
            lin = self.layers.get(key)
            if lin is None:
                continue
            try:
                a, b = lin.shard(parts, adapter.config.scaling, self.dtype)
            except (ValueError, RuntimeError) as e:
                raise ValueError(f"lora_path: layer {key[0]} {sorted(parts)}: {e}") from None
            out.shards[key] = (a.pin_memory(), b.pin_memory()) if pin else (a, b)
        return out

    def load_now(self, name: str, path: str, lora_id: int, version: int) -> None:
        """A rank starting up replays an adapter loaded before it (nothing serves yet: no staging)."""
        self.adapters[name] = self.read(name, path, lora_id, version)

    def run(self, op: Any) -> None:
        """This rank's part of a LoRA op; raises on failure (the group agrees, and ``undo`` drops a stage)."""
        if isinstance(op, LoadLora):
            self.staged[op.op_id] = self.read(op.name, op.path, op.lora_id, op.version)
        elif isinstance(op, CommitLora):
            staged = self.staged.pop(op.stage_id, None)
            if staged is None:
                raise RuntimeError(f"commit: adapter load {op.stage_id} is not staged on this rank")
            self.adapters[op.name] = staged  # a slot holding the old one is refilled when next asked for it
            for s, held in enumerate(self.slots):
                if held is not None and held.name == op.name:
                    self._fill(s, staged)
        elif isinstance(op, DiscardLora):
            self.staged.pop(op.stage_id, None)
        elif isinstance(op, UnloadLora):  # idempotent: every rank of the group ends up without it
            self.adapters.pop(op.name, None)
            self.slots = [None if (a is not None and a.name == op.name) else a for a in self.slots]
        else:
            raise TypeError(f"not a LoRA op: {type(op).__name__}")

    def undo(self, op: Any) -> None:
        if isinstance(op, LoadLora):
            self.staged.pop(op.op_id, None)

    # ------------------------------------------------------------------------------------------ forward
    def bind(self, lora_map: list[str]) -> None:
        """Make every slot named in ``lora_map`` hold its adapter (copying only where it holds another)."""
        for s, name in enumerate(lora_map):
            if not name:
                continue
            adapter = self.adapters.get(name)
            if adapter is None:
                raise RuntimeError(f"lora: slot {s} asks for adapter {name!r}, which this rank does not hold")
            if self.slots[s] is not adapter:
                self._fill(s, adapter)

    def _fill(self, slot: int, adapter: RankAdapter) -> None:
        for key, lin in self.layers.items():
            a, b = adapter.shards.get(key, (None, None))
            lin.load_slot(slot, a, b)
        self.slots[slot] = adapter
        self.slot_loads += 1

    def set_rows(self, plans: list[SeqPlan], q_lens: list[int]) -> None:
        """This forward's slot per token row, from each plan's ``lora_slot``."""
        slots = np.fromiter((p.lora_slot for p in plans), dtype=np.int64, count=len(plans))
        if not len(slots) or slots.max(initial=-1) < 0:
            self.batch.clear()
            return
        self.batch.set_rows(np.repeat(slots, q_lens))

    def graph_rows(self, plans: list[SeqPlan], bs: int) -> None:
        """A decode replay of ``bs`` rows: the plans' slots, padding rows on the base model."""
        slots = np.full(bs, -1, dtype=np.int64)
        slots[: len(plans)] = [p.lora_slot for p in plans]
        self.batch.fill_graph(slots)

    def stats(self) -> dict[str, Any]:
        return {"adapters": sorted(self.adapters), "slots": [a.name if a else "" for a in self.slots],
                "slot_loads": self.slot_loads}
