"""A LoRA adapter as PEFT writes it: ``adapter_config.json`` + ``adapter_model.safetensors``, read and checked.

The same reader serves the front end (which checks a folder before any rank is told, so a bad adapter fails in
the caller's process naming what is wrong) and every rank (which then reads the tensors it shards).

What PEFT writes for a decoder: ``base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_A.weight``
([r, in_features]) and ``....lora_B.weight`` ([out_features, r]); the update is ``x A^T B^T * scaling`` with
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). Only what a plain LoRA of the
attention and MLP projections needs is accepted; DoRA, biases, extra trained modules, per-module rank patterns
and Conv1D layouts are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flotilla.errors import InvalidParameter

# PEFT's target names for the projections a Llama-family decoder has, and where each lives
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class AdapterConfig:
    """What the adapter's config says, checked: rank, scaling and the projections it targets."""

    rank: int
    alpha: float
    scaling: float
    target_modules: list[str]
    base_model: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A PEFT ``adapter_config.json`` for these settings (an update written by the front end)."""
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "target_modules": self.target_modules,
                "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                "modules_to_save": None, "base_model_name_or_path": self.base_model,
                # the scaling is kept exact (rslora or not): alpha is written so that alpha / r == scaling
                "flotilla_scaling": self.scaling}


@dataclass
class Adapter:
    """An adapter's settings and full (unsharded) tensors: ``tensors[(layer, target)] = (A [r, in], B [out, r])``."""

    config: AdapterConfig
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def read_config(path: str | Path, max_rank: int, supported: Iterable[str] = TARGETS) -> AdapterConfig:
    """``path``'s adapter config, refused (``InvalidParameter("lora_path", ...)``) where this engine cannot
    serve it: a rank above ``max_rank``, a target the model lacks, a LoRA variant other than the plain one."""
    folder = Path(path)
    cfg_file = folder / CONFIG_FILE
    if not folder.is_dir():
        raise InvalidParameter("lora_path", f"{str(folder)!r} is not a directory holding a PEFT adapter")
    if not cfg_file.is_file():
        raise InvalidParameter("lora_path", f"{str(folder)!r} has no {CONFIG_FILE}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidParameter("lora_path", f"{cfg_file} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InvalidParameter("lora_path", f"{cfg_file} must hold a JSON object")
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidParameter("lora_path", f"peft_type {raw.get('peft_type')!r}: only LORA adapters are served")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(raw.get(key, False)) != ok:
            raise InvalidParameter("lora_path", f"{key}={raw.get(key)!r} is not supported")
    if raw.get("bias", "none") not in ("none", None):
        raise InvalidParameter("lora_path", f"bias={raw.get('bias')!r}: only adapters without biases are served")
    if raw.get("modules_to_save"):
        raise InvalidParameter("lora_path", f"modules_to_save={raw['modules_to_save']!r}: adapters that train whole "
                                            "modules are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise InvalidParameter("lora_path", f"{key} is not supported (one rank and alpha for every module)")
    rank = raw.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidParameter("lora_path", f"r must be an int >= 1, got {rank!r}")
    if rank > max_rank:
        raise InvalidParameter("lora_path", f"rank {rank} is above max_lora_rank={max_rank} (raise max_lora_rank)")
    alpha = raw.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidParameter("lora_path", f"lora_alpha must be a number, got {alpha!r}")
    scaling = raw.get("flotilla_scaling")
    if not isinstance(scaling, (int, float)):
        scaling = alpha / math.sqrt(rank) if raw.get("use_rslora") else alpha / rank
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # PEFT also takes a regex over full module names
        pattern = re.compile(targets)
        targets = [t for t in TARGETS if pattern.search(f"model.layers.0.self_attn.{t}")
                   or pattern.search(f"model.layers.0.mlp.{t}")]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise InvalidParameter("lora_path",
                               f"target_modules must name the projections, got {raw.get('target_modules')!r}")
    names = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    supported = tuple(supported)
    unknown = [t for t in names if t not in supported]
    if unknown:
        raise InvalidParameter("lora_path", f"target_modules {unknown} are not LoRA targets of this model; "
                                            f"supported: {list(supported)}", allowed=list(supported))
    return AdapterConfig(rank, float(alpha), float(scaling), names, raw.get("base_model_name_or_path"))


def read_adapter(path: str | Path, max_rank: int, num_layers: int, supported: Iterable[str] = TARGETS,
                 layers: range | None = None) -> Adapter:
    """Config and tensors of the adapter in ``path``, every tensor's name and shape checked (``layers``: only
    these decoder layers' tensors are kept, for a pipeline stage)."""
    cfg = read_config(path, max_rank, supported)
    adapter = Adapter(cfg)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for (layer, target, side), tensor in iter_weights(path, cfg, num_layers, layers):
        parts.setdefault((layer, target), {})[side] = tensor
    for key, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise InvalidParameter("lora_path", f"layer {key[0]} {key[1]}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
            raise InvalidParameter("lora_path", f"layer {key[0]} {key[1]}: expected A [r={cfg.rank}, in] and "
                                                f"B [out, r={cfg.rank}], got {tuple(a.shape)} and {tuple(b.shape)}")
        adapter.tensors[key] = (a, b)
    return adapter


def iter_weights(path: str | Path, cfg: AdapterConfig, num_layers: int, layers: range | None = None,
                 shapes_only: bool = False) -> Iterator[tuple[tuple[int, str, str], Any]]:
    """((layer, target, "A"|"B"), tensor, or its shape with ``shapes_only``) for every weight of the adapter in
    ``path``, each name checked (a LoRA weight of a target the config names, in a layer the model has)."""
    from safetensors import safe_open

    wfile = Path(path) / WEIGHTS_FILE
    if not wfile.is_file():
        bin_file = Path(path) / "adapter_model.bin"
        hint = " (adapter_model.bin is not read: save it with safe_serialization=True)" if bin_file.is_file() else ""
        raise InvalidParameter("lora_path", f"{str(path)!r} has no {WEIGHTS_FILE}{hint}")
    try:
        with safe_open(str(wfile), framework="pt", device="cpu") as st:
            for name in st.keys():
                m = _NAME.search(name)
                if m is None:
                    raise InvalidParameter("lora_path", f"tensor {name!r} is not a LoRA A/B weight of a decoder "
                                                        "projection")
                layer, target, ab = int(m.group(1)), m.group(2), m.group(3)
                if target not in cfg.target_modules:
                    raise InvalidParameter("lora_path", f"tensor {name!r}: {target} is not in target_modules "
                                                        f"{cfg.target_modules}")
                if not 0 <= layer < num_layers:
                    raise InvalidParameter("lora_path", f"tensor {name!r}: layer {layer} is outside the model's "
                                                        f"{num_layers} layers")
                if layers is not None and layer not in layers:
                    continue
                value = tuple(st.get_slice(name).get_shape()) if shapes_only else st.get_tensor(name)
                yield (layer, target, ab), value
    except InvalidParameter:
        raise
    except Exception as e:  # safetensors raises its own types for truncated or bad headers
        raise InvalidParameter("lora_path", f"cannot read {wfile}: {e}") from None


def peft_name(layer: int, target: str, ab: str) -> str:
    """The tensor name PEFT gives ``target``'s A or B in ``layer``."""
    where = "self_attn" if target in ATTENTION_TARGETS else "mlp"
    return f"base_model.model.model.layers.{layer}.{where}.{target}.lora_{ab}.weight"


def write_adapter(path: str | Path, config: AdapterConfig,
                  tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write a PEFT folder (an update from a trainer's tensors; benchmarks' random adapters)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_json()))
    flat = {}
    for (layer, target), (a, b) in tensors.items():
        flat[peft_name(layer, target, "A")] = a.detach().contiguous().cpu()
        flat[peft_name(layer, target, "B")] = b.detach().contiguous().cpu()
    save_file(flat, str(folder / WEIGHTS_FILE))


def parse_tensor_names(named: Iterable[tuple[str, torch.Tensor]]) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(PEFT name, tensor) pairs of an update by (layer, target) -> {"A"|"B": tensor}; a name that is not a
    LoRA weight raises naming it."""
    out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in named:
        m = _NAME.search(str(name))
        if m is None:
            raise InvalidParameter("named_tensors", f"{name!r} is not a LoRA weight name (PEFT's "
                                                    "'...layers.<i>.self_attn.q_proj.lora_A.weight')")
        if not isinstance(tensor, torch.Tensor):
            raise InvalidParameter("named_tensors", f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        out.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    return out
