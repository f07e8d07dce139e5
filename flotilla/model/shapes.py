"""Built-in model shapes for benchmarks: config.json of well-known checkpoints, without their weights.

``flotilla bench --model-shape NAME`` writes one of these, plus a tokenizer, into a temporary folder and runs
it with ``load_format="dummy"`` (random weights), so the GPU path can be measured on real shapes where no
checkpoint can be downloaded. The tokenizer is the tiny locally trained one (512 tokens), smaller than the
model's vocabulary; that is harmless because benchmarks pass token ids, never text.

The configs are the published ``config.json`` files of Qwen/Qwen3-0.6B, meta-llama/Llama-3.1-8B and
Qwen/Qwen3-30B-A3B (fields that only matter for training left out), with rope settings spelled in
transformers 5's ``rope_parameters``.
"""

from __future__ import annotations

import copy
import json
import pathlib
import tempfile
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16",
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 48,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "output_router_logits": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16",
    },
}

_TOKENIZER_ARCH = {"qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "llama": "llama"}


def shape_config(name: str) -> dict[str, Any]:
    if name not in SHAPES:
        raise ValueError(f"model_shape: {name!r} is not a built-in shape; choose one of {sorted(SHAPES)}")
    return copy.deepcopy(SHAPES[name])


def write_shape(name: str, out_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Write ``config.json`` and a tokenizer for shape ``name`` into ``out_dir`` (a new temporary folder when
    None) and return the folder; it holds no weights, so load it with ``load_format="dummy"``."""
    from flotilla.tools.tiny import build_tokenizer, save_tokenizer

    cfg = shape_config(name)
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(tempfile.mkdtemp(prefix=f"flotilla-{name}-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    arch = _TOKENIZER_ARCH[cfg["model_type"]]
    save_tokenizer(build_tokenizer(arch), out, arch)
    return out


def weight_bytes(cfg: dict[str, Any], bytes_per_param: int = 2, include_embedding: bool = False) -> int:
    """Bytes of a dense Llama/Qwen decoder's weights as read by one decode step: every layer, the final norm
    and the LM head; the embedding table only when asked (a step reads one of its rows, not all of it).
    With tied embeddings the LM head is the table and is counted as the LM head."""
    if cfg.get("num_experts"):
        raise ValueError("weight_bytes: MoE models read only their routed experts; no single figure applies")
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kvh = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    per_layer = h * (heads + 2 * kvh) * hd + heads * hd * h + 3 * h * inter + 2 * h
    if cfg.get("attention_bias") or cfg["architectures"][0] == "Qwen2ForCausalLM":
        per_layer += (heads + 2 * kvh) * hd
    if cfg["model_type"] in ("qwen3",):
        per_layer += 2 * hd  # q_norm, k_norm
    params = layers * per_layer + h + vocab * h
    if include_embedding and not cfg.get("tie_word_embeddings"):
        params += vocab * h
    return params * bytes_per_param


def step_weight_bytes(cfg: dict[str, Any], bytes_per_param: int = 2) -> int:
    """Weight bytes one decode step of batch 1 reads. Dense: ``weight_bytes``. MoE (Qwen3-MoE): attention,
    norms, the router and the ``num_experts_per_tok`` routed experts of every sparse layer (a dense MLP on
    the others), the final norm and the LM head; the experts a token does not pick are not read."""
    if not cfg.get("num_experts"):
        return weight_bytes(cfg, bytes_per_param)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kvh = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    e, k, moe_i = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense_only = set(cfg.get("mlp_only_layers") or [])
    attn = h * (heads + 2 * kvh) * hd + heads * hd * h + 2 * hd + 2 * h
    params = h + cfg["vocab_size"] * h
    for i in range(layers):
        sparse = i not in dense_only and (i + 1) % step == 0
        params += attn + (h * e + k * 3 * h * moe_i if sparse else 3 * h * cfg["intermediate_size"])
    return params * bytes_per_param


def kv_bytes(cfg: dict[str, Any], tokens: int, bytes_per_elem: int = 2) -> int:
    """Bytes of K and V for ``tokens`` positions over all layers."""
    heads = cfg["num_attention_heads"]
    kvh = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kvh * hd * tokens * bytes_per_elem
