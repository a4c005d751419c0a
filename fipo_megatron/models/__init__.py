"""Megatron GPTModel from Hugging Face configs (Qwen2/Qwen2.5, Llama, Qwen3), its layer specs, a portable
CP-capable core attention for the local spec, and the TP/PP sharding rules of its parameters.

Submodules: ``hf_config`` (TransformerConfig from an HF config), ``builder`` (``build_gpt_model``,
``build_model_chunks``), ``cp_attention`` (``LocalCoreAttention``), ``sharding`` (full <-> shard layout).
"""

from fipo_megatron.models.builder import build_gpt_model, build_model_chunks
from fipo_megatron.models.hf_config import padded_vocab_size, transformer_config_from_hf
from fipo_megatron.models.sharding import gather_full_state_dict, load_full_state_dict

__all__ = [
    "build_gpt_model",
    "build_model_chunks",
    "gather_full_state_dict",
    "load_full_state_dict",
    "padded_vocab_size",
    "transformer_config_from_hf",
]
