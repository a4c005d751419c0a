"""Bucket planning and byte packing (pure), the FP8 sync path on one gloo rank, transport guards."""

from __future__ import annotations

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.weights import export
from fipo_megatron.weights.export import _Entry, pack_bytes, packed_size, plan_buckets, unpack_bytes


def test_plan_buckets_budget_order_and_oversized():
    sizes = [10, 10, 100, 5, 5, 5, 30]  # fp32 elements: 40, 40, 400, 20, ... bytes per shard
    entries = [_Entry(name=f"p{i}", param=torch.zeros(n), tp_sharded=(i % 2 == 0)) for i, n in enumerate(sizes)]
    buckets = plan_buckets(entries, bucket_bytes=100, tp_size=2)
    assert [e.name for b in buckets for e in b] == [e.name for e in entries]  # order kept, nothing lost
    full = {e.name: e.shard_bytes() * (2 if e.tp_sharded else 1) for e in entries}
    for b in buckets:
        total = sum(full[e.name] for e in b)
        assert total <= 100 or len(b) == 1  # only a lone oversized tensor may exceed the budget
    assert ["p2"] in [[e.name for e in b] for b in buckets]  # 800 full bytes: alone
    assert len(plan_buckets(entries, bucket_bytes=10 ** 9, tp_size=2)) == 1
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(export.export_hf_buckets([], groups=None, mapping=object(), bucket_bytes=0))


def test_pack_unpack_mixed_dtypes_roundtrip():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, generator=g).to(torch.bfloat16), torch.randn(2, 5, generator=g),
               torch.randint(0, 9, (7,), generator=g), torch.randn(1, generator=g).double(),
               torch.randn(4, 4, generator=g)[:, 1]]  # non-contiguous input
    flat = pack_bytes(tensors)
    specs = [(tuple(t.shape), t.dtype) for t in tensors]
    assert flat.dtype == torch.uint8 and flat.numel() == packed_size(specs)
    for a, b in zip(tensors, unpack_bytes(flat, specs)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _fp8_sync_worker(rank, world_size):
    from fipo_megatron.models import build_gpt_model
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel
    from fipo_megatron.testing.tiny_models import tiny_hf_config
    from fipo_megatron.weights.transport import sync_weights

    class Capture:
        def __init__(self):
            self.tensors, self.finished = {}, 0

        def send(self, bucket):
            self.tensors.update(bucket)

        def finish(self):
            self.finished += 1

    hf = tiny_hf_config("qwen3")
    parallel = ParallelConfig()
    groups = initialize_parallel(parallel, hf_config=hf)
    model = build_gpt_model(hf, groups=groups).eval()
    plain, quant = Capture(), Capture()
    sync_weights([model], groups=groups, hf_config=hf, transport=plain, bucket_bytes=1 << 14)
    stats = sync_weights([model], groups=groups, hf_config=hf, transport=quant, bucket_bytes=1 << 14, fp8=True)
    return plain.tensors, quant.tensors, plain.finished, quant.finished, stats


@pytest.mark.distributed
def test_fp8_sync_path():
    from fipo_megatron.weights.fp8 import dequantize_fp8_block

    import fipo_megatron.models.builder  # noqa: F401  (imported once here, inherited by the forked rank)

    [(plain, quant, n_plain, n_quant, stats)] = run_distributed(_fp8_sync_worker, 1, timeout=120)
    assert n_plain == n_quant == 1 and stats["weights/num_buckets"] > 1
    projections = [n for n in plain if n.endswith("_proj.weight")]
    assert len(projections) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    assert set(quant) == set(plain) | {n.replace(".weight", ".weight_scale_inv") for n in projections}
    for name in projections:
        q, s = quant[name], quant[name.replace(".weight", ".weight_scale_inv")]
        assert q.dtype == torch.float8_e4m3fn
        err = (dequantize_fp8_block(q, s) - plain[name]).abs()
        assert bool((err <= plain[name].abs().max() * 2.0 ** -4).all())
    for name in set(plain) - set(projections):
        assert torch.equal(quant[name], plain[name])  # norms, embeddings, lm_head untouched


def test_cuda_ipc_transport_needs_cuda():
    from fipo_megatron.weights.transport import CudaIpcTransport

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        CudaIpcTransport(lambda handles: None)


def test_several_exporting_replicas_need_one_stage_and_fan_out_needs_transports():
    from types import SimpleNamespace

    from fipo_megatron.weights.transport import FanOutTransport

    groups = SimpleNamespace(pp_size=2, dp_rank=0, cp_rank=0, tp_size=1)
    with pytest.raises(ValueError, match="exporting_replica .* needs pp == 1"):
        next(export.export_hf_buckets([], groups=groups, mapping=object(), exporting_replica=True))
    with pytest.raises(ValueError, match="at least one transport"):
        FanOutTransport([])
