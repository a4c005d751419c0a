"""Tiny random Hugging Face configs and models for tests and the CPU demo (no download, no hub)."""

from __future__ import annotations

import torch

# Exact HF architecture name per family this project supports (see fipo_megatron.checkpoint registry).
FAMILIES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def tiny_hf_config(family: str = "qwen2", **overrides):
    """A small config of ``family`` (qwen2 | llama | qwen3): 2 layers, hidden 64, 4 heads, 2 KV heads (GQA)."""
    import transformers

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_act="silu", attention_dropout=0.0)
    if family == "qwen2":
        cls, extra = transformers.Qwen2Config, dict(tie_word_embeddings=True)
    elif family == "llama":
        cls, extra = transformers.LlamaConfig, dict(tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    elif family == "qwen3":
        cls, extra = transformers.Qwen3Config, dict(tie_word_embeddings=False, head_dim=16, attention_bias=False)
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {sorted(FAMILIES)}")
    kwargs = {**common, **extra, **overrides}
    config = cls(**kwargs)
    config.architectures = [FAMILIES[family]]
    return config


def tiny_hf_model(family: str = "qwen2", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised transformers causal LM of ``family`` (eval mode, ``dtype``)."""
    import transformers

    config = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # HF initialises norms to 1 and biases to 0; randomise them too so a mapping bug cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model.eval()
