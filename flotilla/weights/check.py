"""The one check of a weight update against the model, made before any rank is told anything.

Every transport describes its update as (name, tensor) pairs - real tensors, or shape-only stand-ins on the
``meta`` device built from metadata (a safetensors header, object-ref contents, a trainer's names/dtypes/
shapes, CUDA IPC handles) - and ``WeightChecker.check`` refuses unknown names, wrong shapes, duplicates and
non-float dtypes with a ``ValueError`` that names the tensor. The model is built once on the meta device with
tp=1 (the full Hugging Face shapes, no memory), so the same rules as the checkpoint loader's apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from flotilla.config import EngineConfig

# safetensors header dtype codes of float types (anything else is refused as not floating point)
SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def meta_tensor(name: str, shape: Any, dtype: str) -> torch.Tensor:
    """A shape-only stand-in for a tensor described by metadata (object refs, a safetensors header)."""
    if shape is None:
        raise ValueError(f"weights: {name!r}: expected a tensor, got {dtype}")
    torch_dtype = getattr(torch, SAFETENSORS_FLOATS.get(dtype, dtype.removeprefix("torch.")), None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"weights: {name!r}: dtype {dtype} is not a floating-point type")
    return torch.empty(tuple(shape), dtype=torch_dtype, device="meta")


def build_on_meta(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``make()`` with every parameter on the meta device. Under ``torch.device("meta")`` when that works; a
    model that computes a buffer on the CPU while it is built (llama 3's rope scaling) is built on the CPU
    instead, each parameter moved to meta as it is registered (its attributes, e.g. weight_loader, kept), so
    no more than one parameter's memory is ever taken."""
    try:
        with torch.device("meta"):
            return make()
    except NotImplementedError:
        pass
    register = torch.nn.Module.register_parameter

    def to_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            moved = torch.nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(param.__dict__)
            param = moved
        register(module, name, param)

    torch.nn.Module.register_parameter = to_meta  # type: ignore[method-assign,assignment]
    try:
        return make()
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def collect_named_tensors(named_tensors: Any) -> list[tuple[str, Any]]:
    """A dict, or an iterable of (name, tensor) pairs, as a list."""
    if isinstance(named_tensors, dict):
        return list(named_tensors.items())
    items = []
    for item in named_tensors:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"weights: expected (name, tensor) pairs, got {type(item).__name__}")
        items.append((item[0], item[1]))
    return items


def check_items(router: Any, expected: set[str], items: Iterable[tuple[Any, Any]]) -> bool:
    """Refuse a bad update (``ValueError`` naming the tensor); True when it covers every weight of the model.
    ``router``: a ``WeightRouter`` of the model, ``expected``: every (parameter, part) a checkpoint provides."""
    covered: set[str] = set()
    seen: set[str] = set()
    for name, tensor in items:
        if not isinstance(name, str):
            raise ValueError(f"weights: parameter names must be strings, got {name!r}")
        if name in seen:
            raise ValueError(f"weights: {name!r} appears more than once")
        seen.add(name)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"weights: {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"weights: {name!r}: dtype {tensor.dtype} is not a floating-point type")
        router.check(name, tensor)
        hit = router.resolve(name)
        if hit is not None:
            target, _, part = hit
            covered.add(target if part is None else f"{target}:{part}")
    if not seen:
        raise ValueError("weights: the update holds no tensors")
    return covered >= expected


class WeightChecker:
    """The model of ``config`` on the meta device (built on first use) and the check against it."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self._meta: tuple[Any, set[str]] | None = None

    def meta_model(self) -> tuple[Any, set[str]]:
        """(router, expected part names) of the model built on the meta device with tp=1 (no memory)."""
        if self._meta is None:
            from transformers import AutoConfig

            from flotilla.model.loader import WeightRouter, expected_names
            from flotilla.model.models import model_class

            hf = AutoConfig.from_pretrained(self.config.model)
            cls = model_class(self.config.hf_config)
            model = build_on_meta(lambda: cls(hf, max_positions=self.config.max_model_len))
            self._meta = (WeightRouter(model), expected_names(model))
        return self._meta

    def check(self, items: Iterable[tuple[Any, Any]]) -> bool:
        """Refuse a bad update before any rank sees it; True when it covers every weight of the model."""
        router, expected = self.meta_model()
        return check_items(router, expected, items)

    def check_meta(self, described: Iterable[tuple[str, Any, str]]) -> bool:
        """``check`` of (name, shape, dtype) triples (metadata instead of tensors)."""
        return self.check([(n, meta_tensor(n, shape, dtype)) for n, shape, dtype in described])
