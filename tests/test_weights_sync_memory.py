"""Peak extra memory of a weight sync on real gloo ranks: a few buckets, never the whole model."""

from __future__ import annotations

import pytest

from fipo_megatron.testing.distributed import run_distributed

BUCKET_BYTES = 8 << 20


def _sync_peak_worker(rank, world_size):
    import torch

    from fipo_megatron.models import build_gpt_model
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel
    from fipo_megatron.testing.memory import PeakRss, pin_mmap_threshold
    from fipo_megatron.testing.tiny_models import tiny_hf_config
    from fipo_megatron.weights.export import hf_names_and_shapes
    from fipo_megatron.weights.transport import InProcessTransport, sync_weights

    pinned = pin_mmap_threshold()  # RSS then follows live tensor bytes, not what glibc's heap keeps
    hf = tiny_hf_config("qwen2", hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=2048)
    groups = initialize_parallel(ParallelConfig(tp=world_size), hf_config=hf)
    model = build_gpt_model(hf, groups=groups).eval()

    class Engine:  # copies each tensor into its own parameter, as EmbeddedEngine.update_weights does
        def __init__(self):
            self.params = {n: torch.zeros(s) for n, s in hf_names_and_shapes([model], groups=groups, hf_config=hf)}
            self.largest_bucket = 0

        def update_weights(self, bucket):
            for name, tensor in bucket:
                self.params[name].copy_(tensor)
            self.largest_bucket = max(self.largest_bucket, sum(t.numel() * t.element_size() for _, t in bucket))

        def finish_weight_update(self):
            pass

    engine = Engine() if rank == 0 else None
    transport = InProcessTransport(engine) if rank == 0 else None
    sync_weights([model], groups=groups, hf_config=hf, transport=transport, bucket_bytes=BUCKET_BYTES)  # warm-up
    meter = PeakRss()
    torch.distributed.barrier()
    meter.start()
    stats = sync_weights([model], groups=groups, hf_config=hf, transport=transport, bucket_bytes=BUCKET_BYTES)
    peak = meter.stop()
    return {"peak": peak, "pinned": pinned, "method": meter.method, "num_buckets": stats["weights/num_buckets"],
            "largest_bucket": engine.largest_bucket if engine else None}


@pytest.mark.distributed
def test_sync_peak_memory_is_a_few_buckets():
    """Two tp=2 gloo ranks, 9 buckets of <= 8 MiB: each rank's peak extra RSS over one sync stays within
    3.5 of the largest bucket. That bound is the most the export allocates on gloo: the bucket the engine
    is still copying, then the next bucket's send buffer (half a bucket at tp=2), receive buffer and gloo's
    staging copy of it. Measured 2.5; an export that holds the previous bucket while it builds the next,
    and starts the next all-gather before the current rebuild, measured 4.4-4.9."""
    # Fresh interpreters: ranks forked from the full test session inherit its heap, and there rank 1's
    # anonymous memory stayed 33 MiB higher after the sync (6.4 buckets at the peak): a measure of the
    # session's heap (most likely its free chunks serving the buffers), not of the export.
    results = run_distributed(_sync_peak_worker, 2, timeout=180, start_method="spawn")
    if not results[0]["pinned"]:
        pytest.skip("glibc's mallopt is not available: RSS would include what its heap keeps")
    largest = results[0]["largest_bucket"]
    assert results[0]["num_buckets"] >= 6 and largest <= BUCKET_BYTES
    for rank, r in enumerate(results):
        assert r["peak"] <= 3.5 * largest, (rank, r["method"], r["peak"] / largest)
