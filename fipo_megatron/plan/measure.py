"""Measure what the plan estimates, on a real actor: static bytes exactly, activations by saved tensors.

    static = static_bytes(actor)                       # weights, DDP grad buffers, optimizer state (bytes)
    saved = saved_activation_bytes(actor, batch)       # bytes autograd keeps for backward, one micro-batch

``saved_activation_bytes`` runs the actor's own forward step (model, chunked log-prob, policy loss) on one
packed micro-batch under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct storages
autograd keeps, leaving out the parameters: tensor bytes, not process RSS, so it works on CPU as on GPU.
``measure_case`` / ``plan_case``: one small actor built, measured and stepped on CPU, and the plan of the
same config (``tools/benchmarks/plan_vs_measured_cpu.py``, ``tests/test_plan.py``).
"""

from __future__ import annotations

import torch


def static_bytes(actor) -> dict[str, int]:
    """Bytes of the actor's parameters, DDP gradient buffers and optimizer state (after a step)."""
    params = [p for c in actor.model_chunks for p in c.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for c in actor.model_chunks for b in c.buffers)
    opt = actor.optimizer
    inner = getattr(opt, "optimizer", opt)
    state = 0
    for value in inner.state.values():
        for t in value.values():
            if torch.is_tensor(t):
                state += t.numel() * t.element_size()
    main = 0
    for group in getattr(opt, "fp32_from_float16_groups", []) or []:
        main += sum(p.numel() * p.element_size() for p in group)
    return {"weights": weights, "grads": grads, "optimizer": state + main}


def saved_activation_bytes(actor, samples, *, temperature: float = 1.0) -> int:
    """Bytes autograd saves for backward over one forward step of ``samples`` packed as one micro-batch."""
    from fipo_megatron.actor.packing import pack_micro_batch
    from fipo_megatron.actor.step import make_loss_fn

    g = actor.groups
    mb = pack_micro_batch(samples, indices=list(range(len(samples))), cp_size=g.cp_size, cp_rank=g.cp_rank,
                          multiple=actor._multiple, device=actor.device)
    mb.old_log_probs_T = torch.zeros_like(mb.labels_T, dtype=torch.float32)
    loss_fn = make_loss_fn(loss_fn=actor.loss_fn, loss_config=actor.loss_config, groups=g, num_local_seqs=len(samples))
    forward_step = actor._forward_step(loss_fn, temperature)
    param_storages = {p.untyped_storage().data_ptr() for c in actor.model_chunks for p in c.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_storages and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    model = actor.model_chunks[0]
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, loss_func = forward_step(iter([mb]), model)
        loss, _, _ = loss_func(out)
    del out, loss
    return sum(seen.values())


def _config(family, dtype, tokens):
    from fipo_megatron.config import config_from_dict

    raw = {"data": {"synthetic": {"enable": True}, "train_batch_size": 2, "max_prompt_length": 16,
                    "max_response_length": tokens - 16},
           "model": {"path": f"tiny:{family}"}, "rollout": {"engine": "embedded", "n": 2},
           "reward": {"overlong_buffer": {"enable": False}},
           "actor": {"ppo_mini_batch_size": 1, "max_tokens_per_micro_batch": tokens, "logprob_chunk_size": 256,
                     "params_dtype": dtype, "lr_warmup_steps": 0},
           "parallel": {"tp": 1, "pp": 1, "cp": 1}}
    return config_from_dict(raw)


def measure_case(rank, world_size, case, layers):
    """In a one-rank gloo job: build ``case``'s actor with ``layers`` layers, measure one micro-batch's saved
    activations, step once, measure the static bytes. ``case`` = (family, dtype, tokens, hidden, heads,
    kv heads, ffn, vocab). Returns (measurements, config, hf config)."""
    import torch

    from fipo_megatron.actor.actor import MegatronActor
    from fipo_megatron.batch import Sample, TrainBatch
    from fipo_megatron.plan.measure import saved_activation_bytes, static_bytes
    from fipo_megatron.testing.tiny_models import tiny_hf_config

    family, dtype, tokens, hidden, heads, kv, ffn, vocab = case
    extra = {"head_dim": hidden // heads} if family == "qwen3" else {}
    hf = tiny_hf_config(family, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                        intermediate_size=ffn, vocab_size=vocab, num_hidden_layers=layers,
                        max_position_embeddings=4 * tokens, **extra)
    cfg = _config(family, dtype, tokens)
    actor = MegatronActor(hf_config=hf, parallel=cfg.parallel, actor_config=cfg.actor, loss_config=cfg.policy_loss)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(prompt_ids=torch.randint(0, vocab, (16,), generator=g).tolist(),
                      response_ids=torch.randint(0, vocab, (tokens - 16,), generator=g).tolist(),
                      advantage=float(i) - 0.5, group_id=0) for i in range(2)]
    saved = saved_activation_bytes(actor, samples[:1])
    actor.update(TrainBatch(samples=samples, num_responses_per_prompt=2))
    from fipo_megatron.parallel.topology import destroy_parallel

    out = dict(static=static_bytes(actor), saved=saved)
    destroy_parallel()
    return out, cfg, hf


def plan_case(cfg, hf, tokens):
    """The plan's static bytes, per-layer activation and the rest of one step, for ``measure_case``'s config."""
    from fipo_megatron.plan.memory import ModelDims, estimate, layer_activation_bytes
    from fipo_megatron.plan.recipe import Cluster

    dims = ModelDims.from_hf(hf, tp=1)
    plan = estimate(cfg, Cluster(nnodes=1, gpus_per_node=1), dims, backend="local-cpu")
    static = {"weights": plan.train[0].nbytes, "grads": plan.train[1].nbytes, "optimizer": plan.train[2].nbytes}
    layer = layer_activation_bytes(dims, tokens=tokens, tp=1, cp=1, sequence_parallel=False, recompute="none",
                                   backend="local-cpu", dtype_bytes=2 if cfg.actor.params_dtype == "bfloat16" else 4)
    rest = sum(x.nbytes for x in plan.train if x.label in ("final norm + hidden states", "FutureKL + loss buffers"))
    return static, layer, rest
