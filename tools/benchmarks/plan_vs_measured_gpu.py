"""The memory plan against a real bf16 actor on one GPU: a FIPO step at 8k and 20k response tokens.

    python tools/benchmarks/plan_vs_measured_gpu.py --out plan_gpu.json            # one CUDA GPU, ~3 min
    python tools/benchmarks/plan_vs_measured_gpu.py --responses 8192 --out x.json   # one length only

A Qwen2.5-1.5B-shaped actor (28 layers, hidden 1536, 12 / 2 heads, FFN 8960, vocabulary 151936, tied
embeddings; random weights: memory does not depend on them) is built on one GPU (tp = pp = cp = 1, bf16
parameters, selective recompute, the recipes' 4096-token log-prob chunks) at the planned token budget (one
512 + R token sequence per micro-batch). For each response length R it runs one FIPO update of two such
samples (two micro-batches: old log-probs, then one optimizer step) and compares

- the static bytes (``plan.measure.static_bytes``: parameters, DDP fp32 gradient buffer, Adam state with
  fp32 main weights) with the plan's, which must be equal;
- ``torch.cuda.max_memory_allocated()`` over the step with the plan's training total (without the
  engine line: no engine runs here), and the activation part (peak - static) with the plan's
  activation, backward, log-prob and loss lines.

Layer spec: Transformer Engine when it imports (plan backend "te"), else the local spec (backend
"local", SDPA's flash kernels). Writes one JSON object (device, versions, rows) to ``--out``; exits 1 when
the static bytes differ or a peak is off by more than 15%. Needs CUDA; GPU-only by design.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PROMPT = 512


def _init_dist() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))


def _hf_config():
    import transformers

    config = transformers.Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                      num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                      max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                      tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False)
    config.architectures = ["Qwen2ForCausalLM"]
    return config


def _cfg(response: int):
    from fipo_megatron.config import config_from_dict

    return config_from_dict({
        "data": {"synthetic": {"enable": True}, "train_batch_size": 1, "max_prompt_length": PROMPT,
                 "max_response_length": response},
        "model": {"path": "tiny:qwen2"}, "rollout": {"engine": "embedded", "n": 2},
        "reward": {"overlong_buffer": {"enable": False}},
        "actor": {"ppo_mini_batch_size": 1, "max_tokens_per_micro_batch": PROMPT + response,
                  "logprob_chunk_size": 4096, "params_dtype": "bfloat16", "recompute": "selective",
                  "lr_warmup_steps": 0},
        "parallel": {"tp": 1, "pp": 1, "cp": 1}})


def run_one(response: int) -> dict:
    import torch

    from fipo_megatron.actor.actor import MegatronActor
    from fipo_megatron.batch import Sample, TrainBatch
    from fipo_megatron.models.builder import te_available
    from fipo_megatron.parallel.topology import destroy_parallel
    from fipo_megatron.plan.measure import static_bytes
    from fipo_megatron.plan.memory import GiB, ModelDims, estimate
    from fipo_megatron.plan.recipe import Cluster

    hf, cfg = _hf_config(), _cfg(response)
    backend = "te" if te_available() else "local"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    actor = MegatronActor(hf_config=hf, parallel=cfg.parallel, actor_config=cfg.actor, loss_config=cfg.policy_loss)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(prompt_ids=torch.randint(0, hf.vocab_size, (PROMPT,), generator=g).tolist(),
                      response_ids=torch.randint(0, hf.vocab_size, (response,), generator=g).tolist(),
                      advantage=float(i) - 0.5, group_id=0) for i in range(2)]
    batch = TrainBatch(samples=samples, num_responses_per_prompt=2)
    actor.update(batch)            # creates the optimizer state
    torch.cuda.synchronize()
    static = static_bytes(actor)
    torch.cuda.reset_peak_memory_stats()
    actor.update(batch)            # the measured step, with every buffer already allocated
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    gpu = torch.cuda.get_device_properties(0)
    plan = estimate(cfg, Cluster(nnodes=1, gpus_per_node=1, gpu_memory_gib=gpu.total_memory / GiB, reserve_gib=0.0),
                    ModelDims.from_hf(hf, tp=1), backend=backend)
    lines = {x.label: x.nbytes for x in plan.train}
    plan_static = {"weights": plan.train[0].nbytes, "grads": plan.train[1].nbytes, "optimizer": plan.train[2].nbytes}
    plan_total = sum(v for k, v in lines.items() if k != "engine after release_memory")
    plan_act = plan_total - sum(plan_static.values())
    row = dict(response_tokens=response, tokens_per_micro_batch=PROMPT + response, backend=backend,
               static_plan=plan_static, static_measured=static, static_equal=plan_static == static,
               peak_plan=plan_total, peak_measured=peak, peak_ratio=plan_total / peak,
               activation_plan=plan_act, activation_measured=peak - sum(static.values()),
               activation_ratio=plan_act / max(1, peak - sum(static.values())), plan_lines=lines)
    del actor
    destroy_parallel()
    torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, nargs="+", default=[8192, 20480], help="response lengths")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("plan_vs_measured_gpu: needs CUDA", file=sys.stderr)
        return 2
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _init_dist()
    import megatron.core

    rows = [run_one(r) for r in args.responses]
    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                  megatron_core=megatron.core.__version__, rows=rows)
    for r in rows:
        print(f"R={r['response_tokens']:6d} backend={r['backend']:5s} static equal={r['static_equal']} "
              f"peak plan {r['peak_plan'] / 2**30:.2f} GiB measured {r['peak_measured'] / 2**30:.2f} GiB "
              f"(ratio {r['peak_ratio']:.3f}); activations plan {r['activation_plan'] / 2**30:.2f} GiB measured "
              f"{r['activation_measured'] / 2**30:.2f} GiB (ratio {r['activation_ratio']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    import torch.distributed as dist

    dist.destroy_process_group()
    ok = all(r["static_equal"] and abs(r["peak_ratio"] - 1) <= 0.15 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
