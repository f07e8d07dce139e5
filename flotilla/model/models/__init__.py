"""Model registry keyed by the Hugging Face ``architectures`` entry of config.json."""

from __future__ import annotations

from typing import Any

from flotilla.model.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def _register_optional() -> None:
    try:
        from flotilla.model.models.qwen3_moe import Qwen3MoeForCausalLM
    except ImportError:
        return
    MODEL_REGISTRY["Qwen3MoeForCausalLM"] = Qwen3MoeForCausalLM


_register_optional()


def check_architecture(hf_config: dict[str, Any]) -> str:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return arch
    raise ValueError(f"architectures: {archs!r} is not supported; supported: {sorted(MODEL_REGISTRY)}")


def model_class(hf_config: dict[str, Any]) -> type:
    return MODEL_REGISTRY[check_architecture(hf_config)]
