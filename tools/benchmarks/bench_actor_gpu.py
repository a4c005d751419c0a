"""A bf16 FIPO actor step of a 1.5B-shaped model on one GPU: tokens/s, MFU, peak memory, attention kernel.

    python tools/benchmarks/bench_actor_gpu.py                          # responses of 8192 and 20480 tokens
    python tools/benchmarks/bench_actor_gpu.py --responses 8192 --repeats 1 --out figures.txt
    python tools/benchmarks/bench_actor_gpu.py --peak-tflops 989        # the GPU's dense bf16 peak

Model: the Qwen2.5-1.5B shape (28 layers, hidden 1536, 12 heads / 2 KV heads, FFN 8960, vocab 151936, tied
embeddings), random weights, bf16 parameters with fp32 main weights (``ActorConfig.params_dtype``), on one
rank (NCCL group of one). Batch: ``--samples`` sequences of a ``--prompt``-token prompt plus R response
tokens. One step is ``MegatronActor.update``: the old-log-prob pass, then one FIPO mini-batch (forward,
backward, Adam). After a warm-up step, ``--repeats`` timed steps (min reported).

MFU = model FLOPs per step / step time / peak. Model FLOPs: 4 forward passes' worth (old-log-prob forward,
training forward, backward = 2x forward); a forward pass is 2 x (matmul parameters incl. the LM head) per
token plus causal attention 2 x 2 x T_i^2 / 2 x hidden per layer and sequence (QK^T and PV). No
recomputation is counted. Peak: ``--peak-tflops`` (default: 989 for H100/H200, the dense bf16 figure).

The profiler (one extra step) lists the CUDA kernels and aten ops of attention, and the script fails if the
math path (``aten::_scaled_dot_product_attention_math``) ran: the local spec must use flash / memory-
efficient kernels, Transformer Engine its fused attention.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

SHAPE = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
             intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
             rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=32768)
ATTENTION_WORDS = ("flash", "fmha", "attention", "attn", "softmax")


def _hf_config():
    import transformers

    return transformers.Qwen2Config(**SHAPE)


def _model_flops(cfg, seq_lens: list[int]) -> float:
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size  # q, o, k, v, gate/up/down
    matmul_params = layers * per_layer + vocab * h
    tokens = sum(seq_lens)
    forward = 2 * matmul_params * tokens + sum(layers * 2 * 2 * (n * n / 2) * h for n in seq_lens)
    return 4 * forward


def _batch(num_samples: int, prompt: int, response: int, vocab: int):
    from fipo_megatron.batch import Sample, TrainBatch

    g = torch.Generator().manual_seed(0)
    samples = [Sample(prompt_ids=torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                      response_ids=torch.randint(0, vocab, (response,), generator=g).tolist(),
                      advantage=float(torch.randn(1, generator=g)), group_id=i)
               for i in range(num_samples)]
    return TrainBatch(samples=samples, num_responses_per_prompt=1, temperature=1.0)


def _peak_tflops(arg: float | None) -> float:
    if arg:
        return arg
    name = torch.cuda.get_device_name()
    return 989.0 if ("H100" in name or "H200" in name) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, nargs="+", default=[8192, 20480])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", default=None, help="also append the figures to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_actor_gpu.py needs CUDA")

    def emit(line: str) -> None:
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    import dataclasses

    import torch.distributed as dist

    from fipo_megatron.actor.actor import MegatronActor
    from fipo_megatron.actor.config import ActorConfig
    from fipo_megatron.algo.policy_loss import PolicyLossConfig
    from fipo_megatron.models.builder import resolve_backend
    from fipo_megatron.parallel.topology import ParallelConfig

    torch.cuda.set_device(0)
    store = tempfile.NamedTemporaryFile(prefix="bench_actor_gpu_", delete=False).name
    os.remove(store)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    hf_config = _hf_config()
    longest = args.prompt + max(args.responses)
    base = ActorConfig(ppo_mini_batch_size=args.samples, max_tokens_per_micro_batch=longest * args.samples + 64,
                       logprob_chunk_size=4096, lr=1e-6, lr_warmup_steps=0, params_dtype="bfloat16",
                       recompute=args.recompute, seed=0)
    actor = MegatronActor(hf_config=hf_config, parallel=ParallelConfig(), actor_config=base,
                          loss_config=PolicyLossConfig())
    num_params = sum(p.numel() for c in actor.model_chunks for p in c.parameters())
    peak = _peak_tflops(args.peak_tflops)
    emit(f"# bench_actor_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, backend "
         f"{resolve_backend('auto')}, Qwen2.5-1.5B shape ({num_params / 1e9:.2f}B params), bf16, "
         f"recompute {args.recompute}, {args.samples} x (prompt {args.prompt} + response R), peak {peak} TFLOP/s")
    emit("| response R | tokens/step | step s (min) | tokens/s | model TFLOP/s | MFU | peak GiB |")
    emit("|---|---|---|---|---|---|---|")
    for response in args.responses:
        batch = _batch(args.samples, args.prompt, response, hf_config.vocab_size)
        actor.config = dataclasses.replace(base, ppo_mini_batch_size=args.samples)
        times = []
        torch.cuda.reset_peak_memory_stats()
        for i in range(args.repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            actor.update(batch)
            torch.cuda.synchronize()
            if i > 0:
                times.append(time.perf_counter() - t0)
        seq_lens = [args.prompt + response] * args.samples
        best = min(times)
        tflops = _model_flops(hf_config, seq_lens) / best / 1e12
        emit(f"| {response} | {sum(seq_lens)} | {best:.3f} | {sum(seq_lens) / best:,.0f} | {tflops:.1f} | "
             f"{tflops / peak:.1%} | {torch.cuda.max_memory_allocated() / 2**30:.1f} |")

    # which attention ran: one more step under the profiler, at the shortest length
    batch = _batch(args.samples, args.prompt, min(args.responses), hf_config.vocab_size)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        actor.update(batch)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events()})
    ops = [n for n in names if n.startswith("aten::") and any(w in n.lower() for w in ATTENTION_WORDS)]
    kernels = [n for n in names if not n.startswith(("aten::", "cuda", "Optimizer", "ProfilerStep"))
               and any(w in n.lower() for w in ("flash", "fmha", "attention"))]
    emit(f"# attention aten ops: {ops}")
    emit(f"# attention CUDA kernels: {[k[:120] for k in kernels[:8]]}")
    math_path = "aten::_scaled_dot_product_attention_math" in names
    emit(f"# math path ran: {math_path}")
    dist.destroy_process_group()
    if math_path or not kernels:
        raise SystemExit("attention did not run on a fused kernel (see the op list above)")


if __name__ == "__main__":
    main()
