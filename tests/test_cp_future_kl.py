"""FutureKL and the FIPO loss split over context-parallel ranks == the single-process result (gloo ranks)."""

import math

import pytest
import torch

from fipo_megatron.algo.future_kl import future_kl
from fipo_megatron.algo.policy_loss import PolicyLossConfig, get_policy_loss
from fipo_megatron.parallel.cp_future_kl import CPShard, future_kl_cp, sum_over_cp
from fipo_megatron.parallel.cp_layout import padded_length, split_packed, split_padded, unsplit_packed
from fipo_megatron.testing.distributed import run_distributed

GAMMA = 2.0 ** (-1.0 / 8.0)  # a short half-life so the carries between chunks matter at these lengths
CONFIG = PolicyLossConfig(decay_rate=8.0)
LENGTHS = [61, 13, 1, 0, 37, 8, 29]  # (prompt + response) tokens before padding to 2*CP multiples


def make_batch(cp_size: int, seed: int = 0):
    """Packed batch (global, padded to 2*cp multiples) and the same sequences as (B, T) rows."""
    gen = torch.Generator().manual_seed(seed)
    padded = [padded_length(n, cp_size=cp_size) for n in LENGTHS]
    total = sum(padded)
    cu = torch.tensor([0] + padded).cumsum(0)
    old = -torch.rand(total, generator=gen, dtype=torch.float64) * 3
    d = torch.randn(total, generator=gen, dtype=torch.float64) * 0.4
    mask = torch.zeros(total, dtype=torch.float64)
    adv = torch.zeros(total, dtype=torch.float64)
    for s, (n, start) in enumerate(zip(LENGTHS, cu[:-1].tolist())):
        mask[start + min(2, n):start + n] = 1.0  # two prompt tokens, then the response, then CP padding
        adv[start:start + padded[s]] = (-1.0) ** (s + 1) * (0.5 + s / 7)
    # Sequence 0 (A < 0): two ratios above c in different CP chunks -> dropped only if counts are summed.
    d[2], d[20] = math.log(12.0), math.log(20.0)
    d[35] = math.log(4.0)
    logp = old + d
    rows = [torch.zeros(len(LENGTHS), max(padded), dtype=torch.float64) for _ in range(4)]
    for s, start in enumerate(cu[:-1].tolist()):
        for k, t in enumerate((logp, old, adv, mask)):
            rows[k][s, :padded[s]] = t[start:start + padded[s]]
    return dict(cu=cu, packed=(logp, old, adv, mask), rows=rows)


def cp_worker(rank, world_size, batch):
    cp = world_size
    cu = batch["cu"]
    out = {}
    # FutureKL, packed layout, fp64 and fp32.
    shard = CPShard(cp_group=None, cp_size=cp, cp_rank=rank, cu_seqlens=cu)
    logp, old, adv, mask = batch["packed"]
    x = torch.where(mask > 0, logp - old, 0)
    local = split_packed(x, cu_seqlens=cu, cp_size=cp, cp_rank=rank)
    out["fkl_packed64"] = future_kl_cp(local, gamma=GAMMA, shard=shard)
    out["fkl_packed32"] = future_kl_cp(local.float(), gamma=GAMMA, shard=shard)
    # FutureKL, (B, T) layout.
    rows = batch["rows"]
    row_shard = CPShard(cp_size=cp, cp_rank=rank, padded_seq_len=rows[0].shape[1])
    x_rows = torch.where(rows[3] > 0, rows[0] - rows[1], 0)
    local_rows = split_padded(x_rows, cp_size=cp, cp_rank=rank)
    out["fkl_rows64"] = future_kl_cp(local_rows, gamma=GAMMA, shard=row_shard)
    out["fkl_rows32"] = future_kl_cp(local_rows.float(), gamma=GAMMA, shard=row_shard)
    out["counts"] = sum_over_cp(torch.arange(len(LENGTHS)) * (rank + 1), shard)
    # The FIPO loss on this rank's share: global token count, and the CP-group mean without it.
    num_global = int(mask.sum())
    loss_fn = get_policy_loss("fipo")
    for key, tensors, sh, kw in [("packed", batch["packed"], shard, {"cu_seqlens": shard.local_cu_seqlens}),
                                 ("rows", rows, row_shard, {})]:
        split = (lambda t: split_packed(t, cu_seqlens=cu, cp_size=cp, cp_rank=rank)) if key == "packed" else \
            (lambda t: split_padded(t, cp_size=cp, cp_rank=rank))
        lp, o, a, m = (split(t) for t in tensors)
        for agg, ng in [("global", num_global), ("mean", None)]:
            lp_req = lp.clone().requires_grad_()
            loss, metrics = loss_fn(log_prob=lp_req, old_log_prob=o, advantages=a, response_mask=m, config=CONFIG,
                                    num_global_tokens=ng, cp=sh, **kw)
            loss.backward()
            out[f"{key}_{agg}"] = (loss.detach(), lp_req.grad, metrics)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("cp_size", [2, 4])
def test_cp_split_equals_single_process(cp_size):
    batch = make_batch(cp_size)
    cu = batch["cu"]
    results = run_distributed(cp_worker, world_size=cp_size, args=(batch,), timeout=120)

    logp, old, adv, mask = batch["packed"]
    x = torch.where(mask > 0, logp - old, 0)
    ref64 = future_kl(x, GAMMA, cu)
    got64 = unsplit_packed([r["fkl_packed64"] for r in results], cu_seqlens=cu)
    torch.testing.assert_close(got64, ref64, rtol=0, atol=1e-12)
    got32 = unsplit_packed([r["fkl_packed32"] for r in results], cu_seqlens=cu)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref64, rtol=0, atol=1e-6)

    rows = batch["rows"]
    ref_rows = future_kl(torch.where(rows[3] > 0, rows[0] - rows[1], 0), GAMMA)
    got_rows = torch.cat([r["fkl_rows64"] for r in results], dim=1)
    order = torch.cat([torch.arange(ref_rows.shape[1]).view(2 * cp_size, -1)[[r, 2 * cp_size - 1 - r]].flatten()
                       for r in range(cp_size)])
    torch.testing.assert_close(got_rows, ref_rows[:, order], rtol=0, atol=1e-12)
    got_rows32 = torch.cat([r["fkl_rows32"] for r in results], dim=1)
    torch.testing.assert_close(got_rows32.double(), ref_rows[:, order], rtol=0, atol=1e-6)

    expected_counts = torch.arange(len(LENGTHS)) * sum(range(1, cp_size + 1))
    assert all(torch.equal(r["counts"], expected_counts) for r in results)

    loss_fn = get_policy_loss("fipo")
    num_global = int(mask.sum())
    for key, tensors, kw in [("packed", batch["packed"], {"cu_seqlens": cu}), ("rows", rows, {})]:
        for agg, ng in [("global", num_global), ("mean", None)]:
            lp = tensors[0].clone().requires_grad_()
            ref_loss, ref_metrics = loss_fn(log_prob=lp, old_log_prob=tensors[1], advantages=tensors[2],
                                            response_mask=tensors[3], config=CONFIG, num_global_tokens=ng, **kw)
            ref_loss.backward()
            assert ref_metrics["num_dropped_seqs"] == 1  # sequence 0, visible only with CP-summed counts
            total = sum(r[f"{key}_{agg}"][0] for r in results)
            assert total.item() == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-14), (key, agg)
            grads = [r[f"{key}_{agg}"][1] for r in results]
            if key == "packed":
                grad = unsplit_packed(grads, cu_seqlens=cu)
            else:
                grad = torch.cat(grads, dim=1)[:, order.argsort()]
            torch.testing.assert_close(grad, lp.grad, rtol=1e-12, atol=1e-15)
            for r in results:
                assert r[f"{key}_{agg}"][2]["num_dropped_seqs"] == ref_metrics["num_dropped_seqs"]
            assert sum(r[f"{key}_{agg}"][2]["num_kept_tokens"] for r in results) == ref_metrics["num_kept_tokens"]


def test_cp_shard_validation():
    with pytest.raises(ValueError, match="cp_rank"):
        CPShard(cp_size=2, cp_rank=2, padded_seq_len=8)
    with pytest.raises(ValueError, match="exactly one"):
        CPShard(cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="padded_seq_len"):
        CPShard(cp_size=2, cp_rank=0, padded_seq_len=6)
    with pytest.raises(ValueError, match="multiples"):
        CPShard(cp_size=2, cp_rank=0, cu_seqlens=torch.tensor([0, 4, 10]))
    shard = CPShard(cp_size=2, cp_rank=1, cu_seqlens=torch.tensor([0, 4, 12]))
    assert shard.local_cu_seqlens.tolist() == [0, 2, 6]
    # cp_size 1: no communication, plain future_kl.
    x = torch.randn(12, dtype=torch.float64)
    single = CPShard(cp_size=1, cp_rank=0, cu_seqlens=torch.tensor([0, 5, 12]))
    torch.testing.assert_close(future_kl_cp(x, gamma=GAMMA, shard=single),
                               future_kl(x, GAMMA, torch.tensor([0, 5, 12])))
