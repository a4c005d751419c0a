"""Megatron ``TransformerConfig`` from a Hugging Face config, for the exact architectures supported.

    config = transformer_config_from_hf(hf_config, parallel=ParallelConfig(tp=2), params_dtype=torch.bfloat16)

Supported (exact ``architectures[0]`` keys, no substring dispatch): Qwen2ForCausalLM (Qwen2/Qwen2.5: QKV
bias, tied embeddings in small sizes), LlamaForCausalLM (Llama 2/3, with ``llama3`` RoPE scaling),
Qwen3ForCausalLM (QK RMSNorm, ``head_dim`` independent of ``hidden / heads``). All are pre-norm RMSNorm,
SwiGLU, RoPE, GQA decoders without biases except where noted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from fipo_megatron.parallel.topology import ParallelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """What differs between the supported families."""

    qkv_bias: bool
    qk_layernorm: bool


ARCHITECTURES: dict[str, ArchSpec] = {
    "Qwen2ForCausalLM": ArchSpec(qkv_bias=True, qk_layernorm=False),
    "LlamaForCausalLM": ArchSpec(qkv_bias=False, qk_layernorm=False),
    "Qwen3ForCausalLM": ArchSpec(qkv_bias=False, qk_layernorm=True),
}


def arch_spec(hf_config) -> ArchSpec:
    """The :class:`ArchSpec` of ``hf_config.architectures[0]``; ValueError listing the supported ones."""
    archs = getattr(hf_config, "architectures", None) or []
    name = archs[0] if archs else None
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name!r}; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _rope_parameters(hf_config) -> dict[str, Any]:
    # transformers >= 5 keeps RoPE settings in `rope_parameters` (theta included); 4.x has `rope_theta`
    # plus an optional `rope_scaling` dict.
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and not params.get("rope_type"):
        params.update(scaling)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default") or "default")
    return params


# Megatron's RotaryEmbedding implements llama3 scaling with only `factor` configurable; the other three
# are fixed at Llama 3.1's values, so any other values are an error rather than a silent mismatch.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeSettings:
    """RoPE arguments for ``GPTModel``: base, and llama3 scaling (``rope_scaling``/``rope_scaling_factor``)."""

    rotary_base: float
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0


def rope_settings(hf_config) -> RopeSettings:
    """RoPE base and scaling of ``hf_config``; ValueError for a scaling Megatron cannot reproduce exactly."""
    params = _rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return RopeSettings(rotary_base=float(params["rope_theta"]))
    if rope_type == "llama3":
        for key, want in _LLAMA3_FIXED.items():
            if key in params and float(params[key]) != want:
                raise ValueError(f"llama3 RoPE scaling with {key}={params[key]} is not supported "
                                 f"(megatron-core fixes it at {want})")
        return RopeSettings(rotary_base=float(params["rope_theta"]), rope_scaling=True,
                            rope_scaling_factor=float(params.get("factor", 8.0)))
    raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: 'default', 'llama3'")


def padded_vocab_size(hf_config, *, tp: int) -> int:
    """Vocabulary rows of the Megatron embedding/output layer.

    The HF vocabulary is kept exactly when ``tp`` divides it (true for Qwen2.5/Qwen3/Llama 3 at any power
    of two up to 64+); otherwise it is padded up to a multiple of ``tp``. Pad rows are zero-initialised on
    load and their logit columns must be ignored by the log-prob code (token ids never reach them).
    """
    vocab = int(hf_config.vocab_size)
    return -(-vocab // tp) * tp


def _head_dim(hf_config) -> int:
    head_dim = getattr(hf_config, "head_dim", None)
    return int(head_dim) if head_dim else hf_config.hidden_size // hf_config.num_attention_heads


def transformer_config_from_hf(hf_config, *, parallel: ParallelConfig, params_dtype: torch.dtype = torch.float32,
                               **overrides):
    """Build the ``TransformerConfig`` for ``hf_config`` under ``parallel``.

    ``params_dtype`` float32 | bfloat16 | float16 sets ``bf16``/``fp16`` and ``pipeline_dtype`` to match.
    ``overrides`` are any further ``TransformerConfig`` fields (recompute_granularity, recompute_method,
    recompute_num_layers, fp8, calculate_per_token_loss, ...); they win over the derived values.
    Fusions are on only on CUDA (their kernels need it); dropout is 0, as in the RL recipes.
    """
    from megatron.core.transformer import TransformerConfig

    spec = arch_spec(hf_config)
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be float32, bfloat16 or float16, got {params_dtype}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported: the supported families have bias-free MLPs")
    num_query_groups = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    if getattr(hf_config, "attention_bias", False) and not spec.qkv_bias:
        # Llama/Qwen3 attention_bias also adds an o_proj bias, which this layout does not carry.
        raise ValueError("attention_bias=True is not supported for this architecture")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported (full causal attention only)")
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=num_query_groups,
        kv_channels=_head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.vpp and parallel.vpp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not cuda,
        # Fused kernels (apex / TE / torch.jit-on-CUDA) only exist on GPU.
        bias_activation_fusion=cuda,
        masked_softmax_fusion=False,
        # The unfused RoPE handles THD and CP positions on every device; the TE spec turns the fused kernel
        # on (models.builder.make_transformer_config).
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=cuda,
        # Grads of pipeline outputs are released as soon as they are sent: less memory at 20k tokens.
        deallocate_pipeline_outputs=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
