"""Peak extra memory of one rollout weight sync (bucketed Megatron -> HF export) on each rank, against
building the whole model's HF state dict at once.

    OMP_NUM_THREADS=1 python tools/benchmarks/bench_sync_memory.py            # Qwen2.5-0.5B shape, tp=2, bf16
    OMP_NUM_THREADS=1 python tools/benchmarks/bench_sync_memory.py --vocab-size 32000  # embedding < 64 MiB
    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 python tools/benchmarks/bench_sync_memory.py  # live bytes
    OMP_NUM_THREADS=1 python tools/benchmarks/bench_sync_memory.py --quick    # 4 layers, hidden 512 (seconds)
    python tools/benchmarks/bench_sync_memory.py --device cuda --tp 1         # one GPU: max_memory_allocated

Ranks and model as in ``bench_weight_export.py``: two gloo ranks on CPU hold the tp=2 shards of a randomly
initialised Qwen2 model. Each sync is ``weights.transport.sync_weights`` with ``destination="rank0"`` into an
``InProcessTransport``. Its engine, on rank 0, holds the HF parameters (allocated and filled before the
baseline) and copies every tensor of a bucket into them, as ``EmbeddedEngine.update_weights`` does; it keeps
no reference to a bucket once ``update_weights`` returns. One unmeasured sync at the smallest bucket size
comes first (gloo buffers, first-touch pages).

The whole-model baseline, in the same processes: every TP-sharded parameter all-gathered and rebuilt, the
whole HF state dict built from them at once (what ``models.sharding.gather_full_state_dict`` does, on the
parameters' device), loaded into the same engine on rank 0, then dropped.

Measure, per rank and per sync, the peak minus the value just before the sync (``fipo_megatron.testing.memory``):
- CPU: resident set size, peak from ``VmHWM`` after resetting it through ``/proc/self/clear_refs`` (exact;
  ``--sample`` reads ``/proc/self/statm`` every millisecond instead). Under glibc's default malloc, freed
  tensors below its mmap threshold (raised after large frees, up to 32 MiB) stay resident on the heap;
  ``MALLOC_MMAP_THRESHOLD_=131072`` pins the threshold so that RSS tracks the live tensor bytes.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated``.

Reported: peak extra bytes, and that divided by ``bucket_bytes``, by the largest bucket the export made
(a tensor larger than ``bucket_bytes`` travels alone, so the largest bucket can exceed the setting) and by
the whole-model approach's peak.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_weight_export import build_sharded_model, model_overrides  # noqa: E402

_MIB = 1 << 20


class _Engine:
    """Holds the HF parameters and copies each bucket's tensors into them (``EmbeddedEngine.update_weights``)."""

    def __init__(self, shapes, *, dtype, device):
        import torch

        self.params = {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in shapes}
        self.largest_bucket = 0

    def update_weights(self, named_tensors) -> None:
        nbytes = 0
        for name, tensor in named_tensors:
            param = self.params[name]
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
            nbytes += tensor.numel() * tensor.element_size()
        self.largest_bucket = max(self.largest_bucket, nbytes)

    def finish_weight_update(self) -> None:
        pass


def _whole_model_hf(model, *, groups, mapping):
    """Every HF tensor of the model at once: TP shards all-gathered and rebuilt, split by the mapping.

    The gather loop of ``models.sharding.gather_full_state_dict`` without its ``.cpu().clone()`` of each
    tensor, which would add a transient copy of the largest tensor (the embedding) to the baseline's peak
    and flatter the bucketed export's ratio."""
    import torch
    import torch.distributed as dist

    from fipo_megatron.models.sharding import gather_tp_shards, local_params, partition_dim

    out = []
    for name, (_, param, _) in local_params([model]).items():
        if name == "output_layer.weight" and mapping.tie_word_embeddings:
            continue
        tensor = param.detach()
        if groups.tp_size > 1 and partition_dim(name) is not None:
            parts = [torch.empty_like(tensor) for _ in range(groups.tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=groups.tp_group)
            tensor = gather_tp_shards(name, parts)
        out.extend((hf, t.contiguous()) for hf, t in mapping.megatron_to_hf(name, tensor))
    return out


def _worker(rank, world_size, overrides, bucket_sizes, device, dtype_name, sample):
    import torch
    import torch.distributed as dist

    from fipo_megatron.checkpoint.registry import get_mapping
    from fipo_megatron.models.hf_config import padded_vocab_size
    from fipo_megatron.testing.memory import PeakCudaAllocated, PeakRss
    from fipo_megatron.weights.export import hf_names_and_shapes
    from fipo_megatron.weights.transport import InProcessTransport, sync_weights

    dtype = getattr(torch, dtype_name)
    hf, groups, model = build_sharded_model(overrides, world_size=world_size, device=device, params_dtype=dtype)
    mapping = get_mapping(hf, padded_vocab_size=padded_vocab_size(hf, tp=groups.tp_size))
    shapes = hf_names_and_shapes([model], groups=groups, mapping=mapping)
    engine = _Engine(shapes, dtype=dtype, device=device) if rank == 0 else None
    transport = InProcessTransport(engine) if engine is not None else None
    meter = PeakCudaAllocated() if device == "cuda" else PeakRss(sample=sample)

    def sync(bucket_bytes):
        return sync_weights([model], groups=groups, transport=transport, mapping=mapping, bucket_bytes=bucket_bytes)

    sync(min(bucket_sizes))  # warm-up, not measured
    rows = []
    for bucket_bytes in bucket_sizes:
        if engine is not None:
            engine.largest_bucket = 0
        dist.barrier()
        meter.start()
        stats = sync(bucket_bytes)
        peak = meter.stop()
        rows.append({"bucket_bytes": bucket_bytes, "peak": peak, "num_buckets": int(stats["weights/num_buckets"]),
                     "largest_bucket": engine.largest_bucket if engine is not None else None})
    dist.barrier()
    meter.start()
    whole = _whole_model_hf(model, groups=groups, mapping=mapping)
    if engine is not None:
        engine.update_weights(whole)
    del whole
    whole_peak = meter.stop()
    model_bytes = sum(torch.Size(shape).numel() for _, shape in shapes) * torch.empty(0, dtype=dtype).element_size()
    return {"rows": rows, "whole_peak": whole_peak, "model_bytes": model_bytes, "method": meter.method,
            "num_params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, for a smoke test")
    parser.add_argument("--shape", default="0.5b", choices=["0.5b", "7b"], help="model shape (Qwen2.5)")
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[16.0, 64.0, 256.0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--vocab-size", type=int, help="override the shape's vocabulary (a smaller embedding)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sample", action="store_true", help="CPU: sample RSS every 1 ms instead of VmHWM")
    args = parser.parse_args()
    backend = "gloo"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < args.tp:
            print(f"skipped: --device cuda --tp {args.tp} needs {args.tp} GPU(s) (one per rank), "
                  f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} visible")
            return
        backend = "nccl" if args.tp > 1 else "gloo"
    from fipo_megatron.testing.distributed import run_distributed

    bucket_sizes = [int(mb * _MIB) for mb in args.bucket_mb]
    overrides = model_overrides(shape=args.shape, quick=args.quick)
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    results = run_distributed(_worker, args.tp, args=(overrides, bucket_sizes, args.device, args.dtype, args.sample),
                              timeout=1800, backend=backend)
    r0 = results[0]
    num_params = sum(r["num_params"] for r in results)
    print(f"device {args.device}, {args.tp} rank(s) ({backend}): {num_params / 1e6:.0f}M params ({args.dtype}), "
          f"HF model {r0['model_bytes'] / _MIB:.1f} MiB; peak measured by {r0['method']}")
    print("| rank | bucket MiB | buckets | largest bucket MiB | peak extra MiB | / bucket | / largest bucket "
          "| / whole-model peak |")
    print("|---|---|---|---|---|---|---|---|")
    for rank, r in enumerate(results):
        for row, row0 in zip(r["rows"], r0["rows"]):
            largest = row0["largest_bucket"]
            print(f"| {rank} | {row['bucket_bytes'] / _MIB:g} | {row0['num_buckets']} | {largest / _MIB:.1f} | "
                  f"{row['peak'] / _MIB:.1f} | {row['peak'] / row['bucket_bytes']:.2f} | "
                  f"{row['peak'] / largest:.2f} | {row['peak'] / r['whole_peak']:.3f} |")
    for rank, r in enumerate(results):
        print(f"rank {rank}: whole model at once: peak extra {r['whole_peak'] / _MIB:.1f} MiB = "
              f"{r['whole_peak'] / r['model_bytes']:.2f}x the HF model")


if __name__ == "__main__":
    main()
