"""The zig-zag CP layout against a direct reading of its definition, and the gloo test harness itself."""

import pytest
import torch

from fipo_megatron.parallel import cp_layout
from fipo_megatron.testing.distributed import run_distributed


def _reference_positions(seq_len, cp_size, rank):
    # Definition: 2*cp equal chunks; rank r holds chunk r then chunk 2cp-1-r.
    chunk = seq_len // (2 * cp_size)
    chunks = [list(range(i * chunk, (i + 1) * chunk)) for i in range(2 * cp_size)]
    return chunks[rank] + chunks[2 * cp_size - 1 - rank]


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_local_positions_partition_the_sequence(cp_size):
    seq_len = cp_layout.padded_length(37, cp_size=cp_size)
    assert seq_len >= 37 and (cp_size == 1 or seq_len % (2 * cp_size) == 0)
    seen = []
    for rank in range(cp_size):
        pos = cp_layout.local_positions(seq_len, cp_size=cp_size, cp_rank=rank).tolist()
        if cp_size > 1:
            assert pos == _reference_positions(seq_len, cp_size, rank)
        seen += pos
    assert sorted(seen) == list(range(seq_len))


def test_padded_length_with_tp_multiple():
    assert cp_layout.padded_length(5, cp_size=1) == 5
    assert cp_layout.padded_length(5, cp_size=2) == 8
    assert cp_layout.padded_length(9, cp_size=2, multiple=2) == 16
    with pytest.raises(ValueError, match="cp_size"):
        cp_layout.padded_length(5, cp_size=0)


def test_chunk_bounds_rejects_unpadded_and_bad_rank():
    with pytest.raises(ValueError, match="not a multiple"):
        cp_layout.chunk_bounds(10, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="out of range"):
        cp_layout.chunk_bounds(8, cp_size=2, cp_rank=2)


@pytest.mark.parametrize("cp_size", [2, 4])
def test_packed_split_roundtrip_and_padded_split(cp_size):
    lengths = [cp_layout.padded_length(n, cp_size=cp_size) for n in (3, 17, 1, 9)]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x = torch.randn(int(cu[-1]), 3)
    shards = [cp_layout.split_packed(x, cu_seqlens=cu, cp_size=cp_size, cp_rank=r) for r in range(cp_size)]
    for r, shard in enumerate(shards):
        assert shard.shape[0] == int(cu[-1]) // cp_size
        # Each sequence's local slice is exactly its reference positions.
        expect = torch.cat([x[s + torch.tensor(_reference_positions(e - s, cp_size, r))]
                            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
        assert torch.equal(shard, expect)
    assert torch.equal(cp_layout.unsplit_packed(shards, cu_seqlens=cu), x)

    padded = torch.randn(2, 16, 5)
    for r in range(cp_size):
        local = cp_layout.split_padded(padded, cp_size=cp_size, cp_rank=r, dim=1)
        assert torch.equal(local, padded[:, _reference_positions(16, cp_size, r)])


def _allreduce_rank(rank, world_size, offset):
    import torch.distributed as dist

    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t.item()}


def _fail_on_rank_one(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("deliberate failure")
    dist.barrier()


@pytest.mark.distributed
def test_run_distributed_collects_results_and_reports_failures():
    out = run_distributed(_allreduce_rank, 3, args=(1,))
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["sum"] == 1 + 2 + 3 for o in out)
    with pytest.raises(RuntimeError, match="(?s)rank 1 of 2 failed.*deliberate failure"):
        run_distributed(_fail_on_rank_one, 2, timeout=30)
