"""Weights into a built model: from safetensors files (one tensor at a time, each rank narrowing to its
shard), from (name, tensor) pairs (weight updates), or random ("dummy") for benchmarks of real shapes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flotilla.model.layers.linear import default_weight_loader


def safetensors_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"model: {index} is malformed ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"model: shard(s) named in {index.name} are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {path}")
    return files


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in safetensors_files(path):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for truncated or bad headers
            if isinstance(e, ValueError) and str(e).startswith("model:"):
                raise
            raise ValueError(f"model: cannot read {f.name}: {e}") from None


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class WeightRouter:
    """Maps Hugging Face parameter names onto the model's (possibly fused) parameters."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
        self.tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        self.stage = getattr(model, "pp_stage", None)  # a pipeline stage holds only its own layers' weights

    def _off_stage(self, name: str) -> str | None:
        """For a pipeline stage: ``name`` as this stage holds it, or None when it lives on another stage."""
        st = self.stage
        m = _LAYER.match(name)
        if m is not None:
            return name if st.start <= int(m.group(1)) < st.end else None
        if name.startswith("model.embed_tokens."):
            if st.is_first:
                return name
            # tied embeddings: the last stage's LM head is the embedding matrix
            return name.replace("model.embed_tokens.", "lm_head.", 1) if self.tied and st.is_last else None
        if name.startswith(("model.norm.", "lm_head.")):
            return name if st.is_last else None
        return name

    def resolve(self, name: str) -> tuple[str, nn.Parameter, object] | None:
        """(our name, parameter, part id) for an HF name; None for names we deliberately skip."""
        if "rotary_emb.inv_freq" in name or (self.tied and name == "lm_head.weight"):
            return None
        if self.stage is not None:
            name = self._off_stage(name)
            if name is None:
                return None
        for hf_part, (ours, part) in self.packed.items():
            token = f".{hf_part}."
            if token in name:
                target = name.replace(token, f".{ours}.")
                if target in self.params:
                    return target, self.params[target], part
        if name in self.params:
            return name, self.params[name], None
        extra = getattr(self.model, "resolve_weight_name", None)
        if extra is not None:
            hit = extra(name)
            if hit is not None:
                target, part = hit
                return target, self.params[target], part
        raise ValueError(f"weights: unknown parameter name {name!r}")

    def check(self, name: str, tensor: torch.Tensor) -> None:
        """Refuse a bad tensor before anything is written (used by weight updates)."""
        hit = self.resolve(name)
        if hit is None:
            return
        target, param, part = hit
        scratch = torch.empty(param.shape, dtype=param.dtype, device="meta")
        try:
            load_into(nn.Parameter(scratch, requires_grad=False), param, tensor.to("meta"), part)
        except (ValueError, RuntimeError, IndexError, TypeError) as e:
            raise ValueError(f"weights: {name!r}: {e}") from None

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        for name, tensor in weights:
            hit = self.resolve(name)
            if hit is None:
                continue
            target, param, part = hit
            with torch.no_grad():
                try:
                    load_into(param, param, tensor.to(param.dtype), part)
                except (ValueError, RuntimeError, IndexError, TypeError) as e:
                    raise ValueError(f"weights: {name!r}: {e}") from None
            loaded.add(target if part is None else f"{target}:{part}")
        return loaded


def load_into(dst: nn.Parameter, owner: nn.Parameter, tensor: torch.Tensor, part: object) -> None:
    """Narrow ``tensor`` into ``dst`` with ``owner``'s weight loader (``dst`` is ``owner`` or a scratch copy)."""
    loader: Any = getattr(owner, "weight_loader", default_weight_loader)
    if part is None:
        loader(dst, tensor)
    else:
        loader(dst, tensor, part)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    loaded = WeightRouter(model).load(iter_safetensors(path))
    expected = expected_names(model)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"model: checkpoint lacks weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def expected_names(model: nn.Module) -> set[str]:
    """Every (parameter, part) a checkpoint must provide; tied weights count once."""
    fused: dict[str, list[object]] = {}
    for ours, part in getattr(model, "packed_modules", {}).values():
        fused.setdefault(ours, []).append(part)
    names: set[str] = set()
    for name, _ in model.named_parameters():
        ours = next((o for o in fused if f".{o}." in name), None)
        names.update([f"{name}:{part}" for part in fused[ours]] if ours else [name])
    extra = getattr(model, "expected_weight_names", None)
    return extra(names) if extra else names


def init_dummy(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes: small normal values so activations stay finite in bf16."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            gen = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
            p.normal_(0.0, 0.02, generator=gen)
