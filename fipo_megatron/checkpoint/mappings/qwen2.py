"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): biases on q/k/v only, tied (<= 3B) or untied embeddings."""

from __future__ import annotations

from typing import Any

from fipo_megatron.checkpoint.mappings.base import ModelMapping, common_fields, require

ARCHITECTURE = "Qwen2ForCausalLM"
MODEL_TYPE = "qwen2"


def mapping_from_config(hf_config: Any, *, padded_vocab_size: int | None = None) -> ModelMapping:
    """The Qwen2 mapping for ``hf_config`` (ValueError for features Megatron's dense GPT cannot express)."""
    require(hf_config, ARCHITECTURE, "hidden_act", ("silu",))
    # Sliding-window attention changes the math; Qwen2.5 checkpoints ship with it disabled.
    require(hf_config, ARCHITECTURE, "use_sliding_window", (False, None), default=False)
    return ModelMapping(**common_fields(hf_config), qkv_bias=True, qk_norm=False, padded_vocab_size=padded_vocab_size)
