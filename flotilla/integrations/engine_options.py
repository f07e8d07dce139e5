"""What the Ray Data and Ray Serve configs share about the engine they start: its options checked in the driver,
its rank count, and ``device="auto"`` decided there (inside an actor that holds no GPU itself, CUDA is hidden)."""

from __future__ import annotations

from typing import Any

from flotilla.errors import InvalidParameter
from flotilla.config import EngineConfig
from flotilla.launch.topology import world_size


def check_engine_options(model_source: Any, engine_kwargs: Any) -> EngineConfig:
    """The engine's config, built in the driver so a bad option fails there, not in every actor."""
    if not isinstance(model_source, str) or not model_source:
        raise InvalidParameter("model_source", f"must be a non-empty path, got {model_source!r}")
    if not isinstance(engine_kwargs, dict):
        raise InvalidParameter("engine_kwargs", f"must be a dict of EngineConfig options, got {engine_kwargs!r}")
    try:
        return EngineConfig.from_kwargs(model_source, **engine_kwargs)
    except (ValueError, TypeError) as e:
        raise InvalidParameter("engine_kwargs", f"{e}") from None


def imply_lora(engine_kwargs: Any) -> Any:
    """``lora_modules`` without ``enable_lora`` turns LoRA on (as ``flotilla serve --lora-modules`` does); an
    explicit ``enable_lora=False`` with adapters is left for the engine's validation to refuse, naming them."""
    if isinstance(engine_kwargs, dict) and engine_kwargs.get("lora_modules") and "enable_lora" not in engine_kwargs:
        return {**engine_kwargs, "enable_lora": True}
    return engine_kwargs


def rank_count(cfg: EngineConfig) -> int:
    """Rank processes of one engine."""
    return world_size(cfg.tp_size, cfg.dp_size, cfg.enable_dp_attention, cfg.pp_size)


def with_device(engine_kwargs: dict[str, Any], cfg: EngineConfig, on_gpu: bool) -> dict[str, Any] | None:
    """``engine_kwargs`` with ``device="auto"`` decided for the cluster, or None when the device is set."""
    if cfg.device != "auto":
        return None
    return {**engine_kwargs, "device": "cuda" if on_gpu else "cpu"}


def positive_int(n: Any) -> bool:
    return not isinstance(n, bool) and isinstance(n, int) and n >= 1
