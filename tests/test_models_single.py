"""Single-process model tests: HF config translation, sharding rules, and logits parity with transformers.

The reference is transformers' own forward pass of the same random weights (converted here with a
small test-local HF -> Megatron mapping written from the two libraries' layouts), for padded batches
and for packed (THD) batches of odd-length sequences.
"""

from __future__ import annotations

import pytest
import torch

from fipo_megatron.models import hf_config as hfc
from fipo_megatron.models import sharding
from fipo_megatron.parallel import ParallelConfig
from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.testing.tiny_models import tiny_hf_config, tiny_hf_model
from conftest import hf_reference_logits, hf_to_megatron_full

FAMILIES = ("qwen2", "llama", "qwen3")


# ---------------------------------------------------------------- HF config translation (no processes)

def test_transformer_config_per_family():
    for family in FAMILIES:
        hf = tiny_hf_config(family)
        cfg = hfc.transformer_config_from_hf(hf, parallel=ParallelConfig(tp=2), params_dtype=torch.bfloat16)
        assert cfg.num_query_groups == 2 and cfg.kv_channels == 16 and cfg.gated_linear_unit
        assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-6 and not cfg.add_bias_linear
        assert cfg.add_qkv_bias == (family == "qwen2") and cfg.qk_layernorm == (family == "qwen3")
        assert cfg.bf16 and not cfg.fp16 and cfg.pipeline_dtype == torch.bfloat16
        assert cfg.tensor_model_parallel_size == 2 and cfg.attention_dropout == 0 and cfg.hidden_dropout == 0
    qwen3 = tiny_hf_config("qwen3", head_dim=32)  # head_dim independent of hidden / heads
    assert hfc.transformer_config_from_hf(qwen3, parallel=ParallelConfig()).kv_channels == 32
    cfg = hfc.transformer_config_from_hf(tiny_hf_config("llama"), parallel=ParallelConfig(),
                                         recompute_granularity="full", recompute_method="uniform",
                                         recompute_num_layers=1)
    assert cfg.recompute_granularity == "full"


def test_unknown_architecture_and_rope():
    hf = tiny_hf_config("llama")
    hf.architectures = ["MistralForCausalLM"]
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        hfc.transformer_config_from_hf(hf, parallel=ParallelConfig())
    assert hfc.rope_settings(tiny_hf_config("qwen2", rope_theta=1e6)).rotary_base == 1e6
    llama3 = tiny_hf_config("llama", max_position_embeddings=16384, rope_theta=5e5,
                            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    rope = hfc.rope_settings(llama3)
    assert (rope.rotary_base, rope.rope_scaling, rope.rope_scaling_factor) == (5e5, True, 32.0)
    odd = tiny_hf_config("llama", max_position_embeddings=16384,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    with pytest.raises(ValueError, match="low_freq_factor"):
        hfc.rope_settings(odd)
    # transformers 4.x layout: rope_theta attribute + rope_scaling dict with the old "type" key
    import types

    old_style = types.SimpleNamespace(rope_theta=5e5, rope_scaling={"type": "llama3", "factor": 16.0})
    assert hfc.rope_settings(old_style) == hfc.RopeSettings(rotary_base=5e5, rope_scaling=True, rope_scaling_factor=16.0)
    assert hfc.rope_settings(types.SimpleNamespace(rope_theta=1e6, rope_scaling=None)).rotary_base == 1e6
    with pytest.raises(ValueError, match="RoPE type 'yarn' is not supported"):
        hfc.rope_settings(types.SimpleNamespace(rope_theta=1e6, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    assert hfc.padded_vocab_size(tiny_hf_config("qwen2"), tp=4) == 256
    assert hfc.padded_vocab_size(tiny_hf_config("qwen2", vocab_size=250), tp=4) == 252


def test_llama3_rope_matches_transformers_inv_freq():
    """Megatron's llama3 frequency scaling (fixed low/high factors) equals transformers' for Llama 3.1 values."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tiny_hf_config("llama", max_position_embeddings=16384, rope_theta=5e5,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    inv_hf, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    rope = hfc.rope_settings(hf)
    meg = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=rope.rotary_base,
                          rope_scaling=rope.rope_scaling, rope_scaling_factor=rope.rope_scaling_factor,
                          use_cpu_initialization=True)
    torch.testing.assert_close(meg.inv_freq.double(), inv_hf.double(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- sharding rules (pure)

def test_shard_gather_roundtrip_and_swiglu_layout():
    full = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # [gate (4 rows); up (4 rows)]
    name = "decoder.layers.3.mlp.linear_fc1.weight"
    shards = [sharding.shard_for_tp(name, full, tp_rank=r, tp_size=2) for r in range(2)]
    torch.testing.assert_close(shards[0], torch.cat([full[0:2], full[4:6]]))  # [gate_0; up_0]
    torch.testing.assert_close(shards[1], torch.cat([full[2:4], full[6:8]]))
    torch.testing.assert_close(sharding.gather_tp_shards(name, shards), full)
    for name, dim in [("decoder.layers.0.self_attention.linear_proj.weight", 1),
                      ("decoder.layers.0.self_attention.linear_qkv.weight", 0),
                      ("output_layer.weight", 0), ("decoder.layers.0.input_layernorm.weight", None),
                      ("decoder.layers.0.self_attention.q_layernorm.weight", None)]:
        assert sharding.partition_dim(name) == dim
        x = torch.randn(8, 6)
        parts = [sharding.shard_for_tp(name, x, tp_rank=r, tp_size=2) for r in range(2)]
        torch.testing.assert_close(sharding.gather_tp_shards(name, parts), x)
    with pytest.raises(ValueError, match="no TP layout rule"):
        sharding.partition_dim("decoder.layers.0.unknown.weight")


def test_names_and_layer_offsets():
    assert sharding.canonical_name("decoder.layers.2.input_layernorm.weight") == \
        "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"
    assert sharding.to_global_name("decoder.layers.1.mlp.linear_fc2.weight", layer_offset=4) == \
        "decoder.layers.5.mlp.linear_fc2.weight"
    assert sharding.to_local_name("decoder.layers.5.x", layer_offset=4) == "decoder.layers.1.x"
    assert sharding.to_global_name("output_layer.weight", layer_offset=4) == "output_layer.weight"
    # 8 layers, pp=2, vpp=2: chunk order v*pp + p, 2 layers each
    got = {(p, v): sharding.layer_offset(num_layers=8, pp_size=2, pp_rank=p, vpp_size=2, vp_stage=v)
           for p in range(2) for v in range(2)}
    assert got == {(0, 0): 0, (1, 0): 2, (0, 1): 4, (1, 1): 6}


# ---------------------------------------------------------------- logits parity with transformers

def _padded_and_packed_inputs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 7]
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    return seqs


def _single_process_worker(rank, world_size, jobs):
    results = [_forward_one(family, full_sd, seqs) for family, full_sd, seqs in jobs]
    family, full_sd, seqs = jobs[-1]
    results.append(_forward_one(family, full_sd, seqs, params_dtype=torch.bfloat16))
    return results


def _forward_one(family, full_sd, seqs, params_dtype=torch.float32):
    from megatron.core.packed_seq_params import PackedSeqParams

    from fipo_megatron.models import build_gpt_model, load_full_state_dict
    from fipo_megatron.parallel import initialize_parallel

    hf = tiny_hf_config(family)
    parallel = ParallelConfig()
    groups = initialize_parallel(parallel, hf_config=hf)  # idempotent across families: same layout
    model = build_gpt_model(hf, groups=groups, params_dtype=params_dtype).eval()
    load_full_state_dict([model], full_sd, groups=groups)
    out = {"dtypes": {p.dtype for p in model.parameters()}}
    with torch.no_grad():
        # padded batch, right padding with token 0
        max_len = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), max_len, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
        pos = torch.arange(max_len)[None].expand_as(ids)
        out["padded"] = model(ids, pos, None)
        # packed THD
        cu = torch.tensor([0] + torch.cumsum(torch.tensor([len(s) for s in seqs]), 0).tolist(), dtype=torch.int32)
        packed = torch.cat(seqs)[None]
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                                 max_seqlen_kv=max_len)
        out["packed"] = model(packed, torch.arange(packed.shape[1])[None], None, packed_seq_params=params)
        out["cu"] = cu
    return out


@pytest.mark.distributed
def test_logits_match_transformers_all_families():
    """Megatron GPTModel (local spec, our core attention) == transformers, padded and packed, fp32."""
    jobs = []
    for family in FAMILIES:
        hf_model = tiny_hf_model(family, seed=3)
        seqs = _padded_and_packed_inputs(hf_model.config.vocab_size)
        jobs.append((family, hf_to_megatron_full(hf_model), seqs, hf_reference_logits(hf_model, seqs)))
    [results] = run_distributed(_single_process_worker, 1, args=([j[:3] for j in jobs],), timeout=180)
    bf16 = results.pop()
    assert bf16["dtypes"] == {torch.bfloat16}, "every parameter (norms included) must be bf16"
    for i, s in enumerate(jobs[-1][2]):  # bf16 weights and activations: a bf16-sized tolerance
        ref = jobs[-1][3][i]
        torch.testing.assert_close(bf16["packed"][0, int(bf16["cu"][i]):int(bf16["cu"][i + 1])].float(), ref,
                                   atol=0.05 * ref.abs().max().item(), rtol=0)
    for (family, _, seqs, ref), got in zip(jobs, results):
        cu = got["cu"].tolist()
        for i, s in enumerate(seqs):
            torch.testing.assert_close(got["padded"][i, :len(s)], ref[i], atol=1e-5, rtol=1e-5,
                                       msg=f"{family} padded seq {i}")
            torch.testing.assert_close(got["packed"][0, cu[i]:cu[i + 1]], ref[i], atol=1e-5, rtol=1e-5,
                                       msg=f"{family} packed seq {i}")


def test_backend_choice_on_cpu():
    from fipo_megatron.models.builder import make_transformer_config, resolve_backend

    assert resolve_backend("auto") == "local"
    with pytest.raises(ValueError, match=r"pip install fipo_megatron\[te\]"):
        resolve_backend("te")
    with pytest.raises(ValueError, match=r"fp8='e4m3' needs Transformer Engine.*fipo_megatron\[te\]"):
        make_transformer_config(tiny_hf_config("llama"), parallel=ParallelConfig(), fp8="e4m3")  # build_gpt_model's
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("apex")
    bad = tiny_hf_config("llama", attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        hfc.transformer_config_from_hf(bad, parallel=ParallelConfig())


def test_core_attention_against_float64_definition():
    """LocalCoreAttention (cp=1) vs softmax(q k^T * scale + mask) v in float64: GQA, padded + key mask, THD."""
    import types

    from megatron.core.packed_seq_params import PackedSeqParams

    from fipo_megatron.models.cp_attention import LocalCoreAttention

    cfg = types.SimpleNamespace(kv_channels=8, attention_dropout=0.0, context_parallel_size=1)
    attn = LocalCoreAttention(cfg, 1)
    g = torch.Generator().manual_seed(0)

    def reference(q_shd, k_sgd, v_sgd, allowed_qk):
        rep = q_shd.shape[1] // k_sgd.shape[1]
        k, v = (x.double().repeat_interleave(rep, dim=1) for x in (k_sgd, v_sgd))
        scores = torch.einsum("qhd,khd->hqk", q_shd.double(), k) / 8 ** 0.5
        scores = scores.masked_fill(~allowed_qk, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q_shd.shape[0], -1)

    # padded [s, b, h, d] with a Megatron-style mask (True = masked): batch 1 has 2 left-pad keys
    s, b = 6, 2
    q = torch.randn(s, b, 4, 8, generator=g)
    k, v = torch.randn(s, b, 2, 8, generator=g), torch.randn(s, b, 2, 8, generator=g)
    key_pad = torch.zeros(b, 1, s, s, dtype=torch.bool)
    key_pad[1, :, :, :2] = True
    out = attn(q, k, v, key_pad)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(b):
        allowed = causal & ~key_pad[i, 0]
        rows = allowed.any(-1)  # fully masked query rows have no defined output
        ref = reference(q[:, i], k[:, i], v[:, i], allowed)
        torch.testing.assert_close(out[rows, i].double(), ref[rows], atol=1e-6, rtol=1e-6)
    # THD: three sequences, attention never crosses a boundary
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    q, k, v = torch.randn(9, 4, 8, generator=g), torch.randn(9, 2, 8, generator=g), torch.randn(9, 2, 8, generator=g)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5)
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor([3, 1, 5]))
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(q, k, v, None, packed_seq_params=params).double(), reference(q, k, v, allowed),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cp_size", [2, 3])
def test_megatron_rope_cp_slicing_is_cp_layout_zigzag(cp_size):
    """The RoPE positions Megatron gives each CP rank (padded and THD paths) are cp_layout's zig-zag ones."""
    import types

    from megatron.core.models.common.embeddings import rope_utils

    from fipo_megatron.parallel import cp_layout
    from fipo_megatron.parallel.cpu_compat import _get_pos_emb_on_this_cp_rank

    seq_len = 4 * cp_size
    freqs = torch.arange(seq_len, dtype=torch.float32)[:, None, None, None]  # "frequency" = position
    for rank in range(cp_size):
        want = cp_layout.local_positions(seq_len, cp_size=cp_size, cp_rank=rank).float()
        group = types.SimpleNamespace(size=lambda: cp_size, rank=lambda r=rank: r)
        padded = _get_pos_emb_on_this_cp_rank(freqs, 0, group)
        thd = rope_utils._get_thd_freqs_on_this_cp_rank(rank, cp_size, torch.empty(seq_len // cp_size), freqs)
        torch.testing.assert_close(padded.flatten(), want)
        torch.testing.assert_close(thd.flatten(), want)
