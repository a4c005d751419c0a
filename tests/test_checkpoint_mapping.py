"""HF <-> full-Megatron mappings: round trips, the fused layouts, names, shapes and dispatch errors.

No Megatron process here. The fused layouts are checked against an independent construction from the
layout's definition (per GQA group: q heads, k, v; fc1 = [gate; up]) with head-identifying values; the
end-to-end proof (logits equal transformers') is in test_checkpoint_convert.py.
"""

from __future__ import annotations

import pytest
import torch

from fipo_megatron.checkpoint.registry import get_mapping, supported_architectures
from fipo_megatron.testing.tiny_models import tiny_hf_config, tiny_hf_model

FAMILIES = ("qwen2", "llama", "qwen3")


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bit_exact_both_specs(family):
    model = tiny_hf_model(family, seed=3)
    sd = model.state_dict()
    mapping = get_mapping(model.config)
    expected_hf = set(sd) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert set(mapping.hf_names()) == expected_hf
    for backend in ("local", "te"):
        names = mapping.megatron_names(backend=backend)
        assert len(names) == len(set(names))
        rebuilt = {}
        for name in names:
            full = mapping.hf_to_megatron(name, {h: sd[h] for h in mapping.hf_sources(name)})
            assert tuple(full.shape) == mapping.expected_shape(name)
            for hf_name, tensor in mapping.megatron_to_hf(name, full):
                rebuilt[hf_name] = tensor
        assert set(rebuilt) == expected_hf
        for hf_name, tensor in rebuilt.items():
            assert tensor.dtype == sd[hf_name].dtype and torch.equal(tensor, sd[hf_name]), hf_name


def test_backend_spellings_and_optional_tensors():
    qwen2, llama, qwen3 = (get_mapping(tiny_hf_config(f)) for f in FAMILIES)
    local, te = qwen2.megatron_names(backend="local"), qwen2.megatron_names(backend="te")
    assert "decoder.layers.1.input_layernorm.weight" in local and "decoder.layers.1.pre_mlp_layernorm.weight" in local
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
    # both spellings map to the same HF tensor
    assert (qwen2.hf_sources("decoder.layers.1.input_layernorm.weight")
            == qwen2.hf_sources("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight")
            == ["model.layers.1.input_layernorm.weight"])
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in local  # Qwen2: QKV bias
    assert "output_layer.weight" not in local  # tied
    assert qwen2.hf_sources("output_layer.weight") == ["model.embed_tokens.weight"]  # PP>1 copy of the tied weight
    assert "output_layer.weight" in llama.megatron_names()
    assert not any(n.endswith("linear_qkv.bias") for n in llama.megatron_names())
    with pytest.raises(ValueError, match="linear_qkv.bias"):
        llama.hf_sources("decoder.layers.0.self_attention.linear_qkv.bias")
    assert qwen3.hf_sources("decoder.layers.0.self_attention.q_layernorm.weight") == ["model.layers.0.self_attn.q_norm.weight"]
    assert qwen3.hf_sources("decoder.layers.1.self_attention.k_layernorm.weight") == ["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ValueError, match="global layer index"):
        qwen3.hf_sources("decoder.layers.2.mlp.linear_fc2.weight")  # only 2 layers


def test_qkv_interleave_and_gate_up_layout():
    # 8 heads, 2 KV groups, head_dim 4: every row of q/k/v carries (kind, head, row-in-head) in its values.
    cfg = tiny_hf_config("qwen2", hidden_size=32, num_attention_heads=8, num_key_value_heads=2, head_dim=4)
    mapping = get_mapping(cfg)
    heads, groups, d, h = 8, 2, 4, 32

    def tagged(kind, num_heads):
        rows = torch.tensor([[1000 * kind + 10 * head + r for r in range(d)] for head in range(num_heads)],
                            dtype=torch.float64).reshape(-1, 1)
        return rows + torch.linspace(0, 0.5, h, dtype=torch.float64)[None]

    q, k, v = tagged(1, heads), tagged(2, groups), tagged(3, groups)
    names = {"model.layers.0.self_attn.q_proj.weight": q, "model.layers.0.self_attn.k_proj.weight": k,
             "model.layers.0.self_attn.v_proj.weight": v}
    fused = mapping.hf_to_megatron("decoder.layers.0.self_attention.linear_qkv.weight", names)
    expected_rows = []
    for g in range(groups):  # Megatron: per group [its q heads; its k head; its v head]
        for head in range(g * heads // groups, (g + 1) * heads // groups):
            expected_rows.append(q[head * d:(head + 1) * d])
        expected_rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    assert torch.equal(fused, torch.cat(expected_rows))
    bias = mapping.hf_to_megatron("decoder.layers.0.self_attention.linear_qkv.bias",
                                  {n.replace("weight", "bias"): t[:, 0] for n, t in names.items()})
    assert torch.equal(bias, torch.cat(expected_rows)[:, 0])
    gate, up = torch.randn(128, 32), torch.randn(128, 32)
    fc1 = mapping.hf_to_megatron("decoder.layers.0.mlp.linear_fc1.weight",
                                 {"model.layers.0.mlp.gate_proj.weight": gate, "model.layers.0.mlp.up_proj.weight": up})
    assert torch.equal(fc1[:128], gate) and torch.equal(fc1[128:], up)


def test_shape_errors_name_tensor_and_both_shapes():
    mapping = get_mapping(tiny_hf_config("llama"))
    bad = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64),
           "model.layers.0.self_attn.k_proj.weight": torch.zeros(31, 64),
           "model.layers.0.self_attn.v_proj.weight": torch.zeros(32, 64)}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(31, 64\).*\(32, 64\)"):
        mapping.hf_to_megatron("decoder.layers.0.self_attention.linear_qkv.weight", bad)
    with pytest.raises(ValueError, match=r"embedding\.word_embeddings\.weight.*\(255, 64\).*\(256, 64\)"):
        mapping.megatron_to_hf("embedding.word_embeddings.weight", torch.zeros(255, 64))
    with pytest.raises(ValueError, match="needs HF tensors"):
        mapping.hf_to_megatron("decoder.final_layernorm.weight", {})


def test_vocab_padding_is_dropped_and_zero_filled():
    cfg = tiny_hf_config("llama")
    mapping = get_mapping(cfg, padded_vocab_size=260)
    emb = torch.randn(256, 64)
    full = mapping.hf_to_megatron("embedding.word_embeddings.weight", {"model.embed_tokens.weight": emb})
    assert full.shape == (260, 64) and torch.equal(full[:256], emb) and not full[256:].any()
    assert torch.equal(mapping.megatron_to_hf("output_layer.weight", full)[0][1], emb)


def test_registry_exact_keys_and_errors():
    assert supported_architectures() == ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
    # a plain config.json dict works; model_type is only a fallback when architectures is missing
    cfg = tiny_hf_config("qwen3").to_dict()
    assert get_mapping(cfg).qk_norm
    cfg.pop("architectures")
    assert get_mapping(cfg).qk_norm and get_mapping(cfg).architecture == "qwen3"
    for arch in ("Qwen2MoeForCausalLM", "Qwen2ForSequenceClassification", "qwen2forcausallm"):  # no substring match
        cfg = tiny_hf_config("qwen2")
        cfg.architectures = [arch]
        with pytest.raises(ValueError, match=r"supported architectures: \['LlamaForCausalLM', 'Qwen2ForCausalLM'"):
            get_mapping(cfg)
    with pytest.raises(ValueError, match="attention_bias"):
        get_mapping(tiny_hf_config("llama", attention_bias=True))
    with pytest.raises(ValueError, match="hidden_act"):
        get_mapping(tiny_hf_config("qwen2", hidden_act="gelu"))
