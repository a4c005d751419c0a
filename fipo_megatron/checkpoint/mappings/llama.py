"""Llama 3 / 3.1 / 3.2 (``LlamaForCausalLM``): no biases, untied (or tied, as Llama 3.2 1B/3B) embeddings."""

from __future__ import annotations

from typing import Any

from fipo_megatron.checkpoint.mappings.base import ModelMapping, common_fields, require

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"


def mapping_from_config(hf_config: Any, *, padded_vocab_size: int | None = None) -> ModelMapping:
    """The Llama mapping for ``hf_config``."""
    require(hf_config, ARCHITECTURE, "hidden_act", ("silu",))
    # Megatron has one bias switch for q/k/v and another for every other linear; Llama's
    # attention_bias (q/k/v *and* o_proj) and mlp_bias do not fit it, and no Llama 3 release uses them.
    require(hf_config, ARCHITECTURE, "attention_bias", (False, None), default=False)
    require(hf_config, ARCHITECTURE, "mlp_bias", (False, None), default=False)
    return ModelMapping(**common_fields(hf_config), qkv_bias=False, qk_norm=False, padded_vocab_size=padded_vocab_size)
