"""Throughput of the bucketed Megatron -> HF weight export vs a plain memcpy of the same bytes.

    python tools/benchmarks/bench_weight_export.py            # Qwen2.5-0.5B shape (494M params), tp=2, bf16
    python tools/benchmarks/bench_weight_export.py --quick    # 4 layers, hidden 512 (seconds)
    python tools/benchmarks/bench_weight_export.py --bucket-mb 64 --repeats 3
    python tools/benchmarks/bench_weight_export.py --device cuda --tp 1   # one GPU: the on-device pipeline
    python tools/benchmarks/bench_weight_export.py --device cuda --tp 1 --shape 7b   # Qwen2.5-7B's shape
    python tools/benchmarks/bench_weight_export.py --device cuda --tp 2   # two GPUs: NCCL all-gathers

Two gloo ranks on CPU hold the tp=2 shards of a randomly initialised model; ``export_hf_buckets`` streams
HF-named full tensors to rank 0 (one TP all-gather per bucket, then the mapping's split into q/k/v and
gate/up), where they are consumed without further copies (a no-op receiver: this measures the export,
not an engine's load). The baseline in the same run, on rank 0: ``dst.copy_(src)`` of a buffer of the
same total byte count (one memcpy; best of ``--repeats``). Reported: GB/s of each and their ratio.

On CPU the export moves every byte through gloo's TCP loopback and copies it about three times (pack,
all-gather, TP concatenation/split), so the ratio here is a floor for the GPU path (NCCL over NVLink).

``--device cuda``: the model lives on the GPUs, rank r on ``cuda:r``; with ``--tp > 1`` the ranks talk
NCCL, which needs one GPU per rank (NCCL refuses two ranks on one device). ``--tp 1`` runs on one GPU and
measures everything but the all-gather: the bucket planning, the mapping's q/k/v and gate/up split and
the copies that make each HF tensor contiguous. The memcpy baseline is then a device-to-device copy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # run from a checkout


def model_overrides(*, shape: str, quick: bool = False) -> dict:
    """``tiny_hf_config("qwen2", **overrides)`` arguments for a Qwen2.5 shape ("0.5b", "7b"), or a 4-layer
    hidden-512 model with ``quick``."""
    if quick:
        return dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=32000)
    if shape == "7b":  # Qwen2.5-7B's shape (7.6B params, 15.2 GB in bf16): for a GPU
        return dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                    tie_word_embeddings=False)
    if shape == "0.5b":  # Qwen2.5-0.5B's shape
        return dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)
    raise ValueError(f"shape must be '0.5b' or '7b', got {shape!r}")


def build_sharded_model(overrides: dict, *, world_size: int, device: str, params_dtype):
    """Inside a ``run_distributed`` rank: a randomly initialised Qwen2 GPTModel, TP-sharded over all
    ``world_size`` ranks. Returns (hf_config, groups, model)."""
    from fipo_megatron.models import build_gpt_model
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel
    from fipo_megatron.testing.tiny_models import tiny_hf_config

    hf = tiny_hf_config("qwen2", **overrides)
    groups = initialize_parallel(ParallelConfig(tp=world_size), hf_config=hf)
    model = build_gpt_model(hf, groups=groups, params_dtype=params_dtype).eval()
    model_device = next(model.parameters()).device
    if model_device.type != device:
        raise RuntimeError(f"the model was built on {model_device}, not on the requested {device}")
    return hf, groups, model


def _worker(rank, world_size, overrides, bucket_bytes, repeats, device):
    import torch

    from fipo_megatron.weights.export import export_hf_buckets

    hf, groups, model = build_sharded_model(overrides, world_size=world_size, device=device,
                                            params_dtype=torch.bfloat16)
    cuda = device == "cuda"

    def sync(barrier=True):
        if cuda:
            torch.cuda.synchronize()
        if barrier and world_size > 1:
            torch.distributed.barrier()

    local_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    export_times, num_bytes, num_buckets = [], 0, 0
    for _ in range(repeats + 1):  # the first pass warms up (allocator, NCCL channels); it is not timed
        sync()
        start = time.perf_counter()
        num_bytes = num_buckets = 0
        for bucket in export_hf_buckets([model], groups=groups, hf_config=hf, bucket_bytes=bucket_bytes):
            num_buckets += 1
            num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        sync()
        export_times.append(time.perf_counter() - start)
    export_times = export_times[1:]
    # The collective alone: one all-gather of every rank's share of the same bytes (the gloo floor on CPU).
    share = torch.empty(num_bytes // world_size if rank == 0 else local_bytes, dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, torch.tensor([share.numel()], device=device))
    share = torch.empty(int(max(s.item() for s in sizes)), dtype=torch.uint8, device=device)
    gathered = torch.empty(world_size * share.numel(), dtype=torch.uint8, device=device)
    gather_single = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    allgather_times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        gather_single(gathered, share)
        sync()
        allgather_times.append(time.perf_counter() - start)
    allgather_times = allgather_times[1:]
    memcpy_times = []
    if rank == 0:
        src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        for _ in range(repeats + 1):
            sync(barrier=False)  # rank 0 alone
            start = time.perf_counter()
            dst.copy_(src)
            sync(barrier=False)
            memcpy_times.append(time.perf_counter() - start)
        memcpy_times = memcpy_times[1:]
    return {"num_bytes": num_bytes, "num_buckets": num_buckets, "export_s": min(export_times),
            "memcpy_s": min(memcpy_times) if memcpy_times else None, "local_bytes": local_bytes,
            "allgather_s": min(allgather_times), "allgather_bytes": gathered.numel(),
            "num_params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, for a smoke test")
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="0.5b", choices=["0.5b", "7b"], help="model shape (Qwen2.5)")
    args = parser.parse_args()
    backend = "gloo"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda needs a GPU")
        if args.tp > 1:
            if torch.cuda.device_count() < args.tp:
                parser.error(f"--device cuda --tp {args.tp} needs {args.tp} GPUs (NCCL refuses two ranks on one "
                             f"device); {torch.cuda.device_count()} visible. On one GPU use --tp 1.")
            backend = "nccl"
    overrides = model_overrides(shape=args.shape, quick=args.quick)
    from fipo_megatron.testing.distributed import run_distributed

    results = run_distributed(_worker, args.tp, args=(overrides, int(args.bucket_mb * (1 << 20)), args.repeats,
                                                      args.device), timeout=1800, backend=backend)
    r0 = results[0]
    gb = r0["num_bytes"] / 1e9
    num_params = sum(r["num_params"] for r in results)
    export_gbs, memcpy_gbs = gb / r0["export_s"], gb / r0["memcpy_s"]
    print(f"device {args.device}: {num_params / 1e6:.0f}M params in {args.tp} TP shard(s) (bf16), exported {gb:.3f} GB "
          f"in {r0['num_buckets']} buckets of <= {args.bucket_mb:g} MiB")
    print(f"export: {r0['export_s'] * 1e3:.2f} ms = {export_gbs:.2f} GB/s   memcpy (same bytes, rank 0): "
          f"{r0['memcpy_s'] * 1e3:.2f} ms = {memcpy_gbs:.2f} GB/s   ratio export/memcpy = {export_gbs / memcpy_gbs:.2f}")
    if args.tp > 1:
        print(f"collective floor: one all-gather of the same bytes ({r0['allgather_bytes'] / 1e9:.3f} GB) "
              f"{r0['allgather_s'] * 1e3:.2f} ms; export time / all-gather time = "
              f"{r0['export_s'] / r0['allgather_s']:.2f}")


if __name__ == "__main__":
    main()
