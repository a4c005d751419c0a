"""Helpers shared by several test files (imported as ``from conftest import ...``; pytest puts this
directory on ``sys.path`` when it loads this file, so no test edits ``sys.path`` itself).

- ``hf_to_megatron_full`` / ``hf_reference_logits``: transformers as the reference for the model tests.
  The HF -> Megatron mapping here is written from the two libraries' layouts, independently of
  ``fipo_megatron.checkpoint``, so the model tests do not check the package against itself.
- ``train_batch`` / ``full_megatron_state`` / ``actor_config``: the actor tests' batch, weights and settings.
"""

from __future__ import annotations

import torch

from fipo_megatron.batch import Sample, TrainBatch


def hf_to_megatron_full(model) -> dict[str, torch.Tensor]:
    """Full TP=1 Megatron tensors (canonical names) from a transformers Qwen2/Llama/Qwen3 model."""
    cfg = model.config
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            if p + f"self_attn.q_proj.{kind}" not in sd:
                continue
            q = sd[p + f"self_attn.q_proj.{kind}"].reshape(groups, heads // groups * head_dim, -1)
            k = sd[p + f"self_attn.k_proj.{kind}"].reshape(groups, head_dim, -1)
            v = sd[p + f"self_attn.v_proj.{kind}"].reshape(groups, head_dim, -1)
            qkv = torch.cat([q, k, v], dim=1).reshape((heads + 2 * groups) * head_dim, -1)
            out[m + f"self_attention.linear_qkv.{kind}"] = qkv.squeeze(-1) if kind == "bias" else qkv
        out[m + "self_attention.linear_qkv.layer_norm_weight"] = sd[p + "input_layernorm.weight"]
        out[m + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        if p + "self_attn.q_norm.weight" in sd:
            out[m + "self_attention.q_layernorm.weight"] = sd[p + "self_attn.q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[m + "mlp.linear_fc1.layer_norm_weight"] = sd[p + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


def hf_reference_logits(model, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    """transformers logits of each sequence run on its own (no padding, no packing)."""
    with torch.no_grad():
        return [model(input_ids=s[None]).logits[0] for s in seqs]


def train_batch(seed: int = 0) -> TrainBatch:
    """4 prompts x 2 responses of mixed lengths; with ppo_mini_batch_size=2: two mini-batches of 4."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(5, 7), (3, 11), (8, 4), (4, 9), (6, 6), (2, 13), (7, 5), (3, 8)]
    samples = [Sample(prompt_ids=torch.randint(0, 256, (p,), generator=g).tolist(),
                      response_ids=torch.randint(0, 256, (r,), generator=g).tolist(),
                      advantage=float(torch.randn(1, generator=g)), group_id=i // 2)
               for i, (p, r) in enumerate(lengths)]
    return TrainBatch(samples=samples, num_responses_per_prompt=2, temperature=0.9)


def full_megatron_state(hf_model) -> dict[str, torch.Tensor]:
    """Full TP=1 Megatron tensors of ``hf_model`` through the package's checkpoint mapping."""
    from fipo_megatron.checkpoint.registry import get_mapping

    mapping = get_mapping(hf_model.config)
    sd = hf_model.state_dict()
    return {n: mapping.hf_to_megatron(n, {h: sd[h] for h in mapping.hf_sources(n)}) for n in mapping.megatron_names()}


def actor_config(**kw):
    """A small ``ActorConfig`` for tests; ``kw`` overrides its fields."""
    from fipo_megatron.actor.config import ActorConfig

    # lr large enough that the second mini-batch sees a moved policy; a small token budget so every
    # DP rank packs several micro-batches; chunk 5 so the chunked log-prob really chunks.
    base = dict(ppo_mini_batch_size=2, max_tokens_per_micro_batch=40, logprob_chunk_size=5, lr=2e-4,
                lr_warmup_steps=0, params_dtype="float32", seed=7)
    base.update(kw)
    return ActorConfig(**base)
