"""Qwen3 dense (``Qwen3ForCausalLM``): RMSNorm on each q/k head (QK-norm), no biases, explicit head_dim."""

from __future__ import annotations

from typing import Any

from fipo_megatron.checkpoint.mappings.base import ModelMapping, common_fields, require

ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPE = "qwen3"


def mapping_from_config(hf_config: Any, *, padded_vocab_size: int | None = None) -> ModelMapping:
    """The Qwen3 mapping: ``self_attn.q_norm``/``k_norm`` -> ``self_attention.q_layernorm``/``k_layernorm``."""
    require(hf_config, ARCHITECTURE, "hidden_act", ("silu",))
    require(hf_config, ARCHITECTURE, "attention_bias", (False, None), default=False)
    require(hf_config, ARCHITECTURE, "use_sliding_window", (False, None), default=False)
    return ModelMapping(**common_fields(hf_config), qkv_bias=False, qk_norm=True, padded_vocab_size=padded_vocab_size)
