"""Throughput of the bucketed Megatron -> HF weight export vs a plain memcpy of the same bytes.

    python tools/benchmarks/bench_weight_export.py            # Qwen2.5-0.5B shape (494M params), tp=2, bf16
    python tools/benchmarks/bench_weight_export.py --quick    # 4 layers, hidden 512 (seconds)
    python tools/benchmarks/bench_weight_export.py --bucket-mb 64 --repeats 3

Two gloo ranks on CPU hold the tp=2 shards of a randomly initialised model; ``export_hf_buckets`` streams
HF-named full tensors to rank 0 (one TP all-gather per bucket, then the mapping's split into q/k/v and
gate/up), where they are consumed without further copies (a no-op receiver: this measures the export,
not an engine's load). The baseline in the same run, on rank 0: ``dst.copy_(src)`` of a buffer of the
same total byte count (one memcpy; best of ``--repeats``). Reported: GB/s of each and their ratio.

On CPU the export moves every byte through gloo's TCP loopback and copies it about three times (pack,
all-gather, TP concatenation/split), so the ratio here is a floor for the GPU path (NCCL over NVLink).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # run from a checkout


def _worker(rank, world_size, overrides, bucket_bytes, repeats):
    import torch

    from fipo_megatron.models import build_gpt_model
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel
    from fipo_megatron.testing.tiny_models import tiny_hf_config
    from fipo_megatron.weights.export import export_hf_buckets

    hf = tiny_hf_config("qwen2", **overrides)
    parallel = ParallelConfig(tp=world_size)
    groups = initialize_parallel(parallel, hf_config=hf)
    model = build_gpt_model(hf, parallel=parallel, params_dtype=torch.bfloat16).eval()
    local_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    export_times, num_bytes, num_buckets = [], 0, 0
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        num_bytes = num_buckets = 0
        for bucket in export_hf_buckets([model], groups=groups, hf_config=hf, bucket_bytes=bucket_bytes):
            num_buckets += 1
            num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        torch.distributed.barrier()
        export_times.append(time.perf_counter() - start)
    # The collective alone: one all-gather of every rank's share of the same bytes (the gloo floor on CPU).
    share = torch.empty(num_bytes // world_size if rank == 0 else local_bytes, dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, torch.tensor([share.numel()]))
    share = torch.empty(int(max(s.item() for s in sizes)), dtype=torch.uint8)
    gathered = torch.empty(world_size * share.numel(), dtype=torch.uint8)
    gather_single = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    allgather_times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        gather_single(gathered, share)
        allgather_times.append(time.perf_counter() - start)
    memcpy_times = []
    if rank == 0:
        src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            memcpy_times.append(time.perf_counter() - start)
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
    args = parser.parse_args()
    if args.quick:
        overrides = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000)
    else:  # Qwen2.5-0.5B's shape
        overrides = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)
    from fipo_megatron.testing.distributed import run_distributed

    results = run_distributed(_worker, args.tp, args=(overrides, int(args.bucket_mb * (1 << 20)), args.repeats),
                              timeout=1800)
    r0 = results[0]
    gb = r0["num_bytes"] / 1e9
    num_params = sum(r["num_params"] for r in results)
    export_gbs, memcpy_gbs = gb / r0["export_s"], gb / r0["memcpy_s"]
    print(f"model: {num_params / 1e6:.0f}M params in {args.tp} TP shards (bf16), exported {gb:.3f} GB "
          f"in {r0['num_buckets']} buckets of <= {args.bucket_mb:g} MiB")
    print(f"export: {r0['export_s']:.3f} s = {export_gbs:.2f} GB/s   memcpy (same bytes, rank 0): "
          f"{r0['memcpy_s']:.3f} s = {memcpy_gbs:.2f} GB/s   ratio export/memcpy = {export_gbs / memcpy_gbs:.2f}")
    print(f"collective floor: one all-gather of the same bytes ({r0['allgather_bytes'] / 1e9:.3f} GB) "
          f"{r0['allgather_s']:.3f} s; export time / all-gather time = {r0['export_s'] / r0['allgather_s']:.2f}")


if __name__ == "__main__":
    main()
