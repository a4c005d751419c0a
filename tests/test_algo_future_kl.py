"""FutureKL (docs/algorithm.md §3) against a float64 per-token recurrence written here from docs/algorithm.md."""

import math

import pytest
import torch

from fipo_megatron.algo.future_kl import future_kl, gamma_from_tau, segment_scan

GAMMA = 2.0 ** (-1.0 / 32.0)


def reference_rows(x_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """F_t = x_t + gamma * F_{t+1}, F_T = 0, per row, in float64 (loop over tokens)."""
    x = x_BT.double()
    out = torch.zeros_like(x)
    acc = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in range(x.shape[1] - 1, -1, -1):
        acc = x[:, t] + gamma * acc
        out[:, t] = acc
    return out


def reference_packed(x: torch.Tensor, lengths: list[int], gamma: float) -> torch.Tensor:
    parts, start = [], 0
    for n in lengths:
        parts.append(reference_rows(x[None, start:start + n], gamma)[0])
        start += n
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def test_gamma_from_tau():
    assert gamma_from_tau(32.0) == pytest.approx(0.978572062, abs=1e-9)
    assert gamma_from_tau(1.0) == 0.5
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="tau"):
            gamma_from_tau(bad)


@pytest.mark.parametrize("seq_len", [1, 2, 127, 128, 129, 257, 1000])
def test_rows_match_reference_fp64_and_fp32(seq_len):
    gen = torch.Generator().manual_seed(seq_len)
    x = torch.randn(3, seq_len, generator=gen, dtype=torch.float64) * 0.3
    ref = reference_rows(x, GAMMA)
    got64 = future_kl(x, GAMMA)
    assert got64.dtype == torch.float64 and got64.shape == x.shape
    torch.testing.assert_close(got64, ref, rtol=0, atol=1e-12)
    got32 = future_kl(x.float(), GAMMA)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=0, atol=1e-6)
    # The scan in the input's own precision is also accurate (the fp32 path without fp64 accumulation).
    torch.testing.assert_close(future_kl(x.float(), GAMMA, compute_dtype=None).double(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("chunk_size", [2, 3, 4, 16])
def test_deep_recursion_small_chunks(chunk_size):
    # chunk_size 4 over 300 tokens nests the chunk-level scan four times.
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for gamma in (GAMMA, 0.5, 1.0, 1e-3):
        torch.testing.assert_close(future_kl(x, gamma, chunk_size=chunk_size), reference_rows(x, gamma),
                                   rtol=1e-12, atol=1e-10)


def test_long_sequence_no_overflow():
    # 20k tokens at tau = 32: gamma^(-t) would overflow (2^(20480/32) = 2^640); the scan must not.
    x = torch.randn(2, 20480, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.05
    got = future_kl(x, GAMMA)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference_rows(x, GAMMA), rtol=0, atol=1e-12)
    got32 = future_kl(x.float(), GAMMA)
    torch.testing.assert_close(got32.double(), reference_rows(x, GAMMA), rtol=0, atol=1e-6)


def test_packed_restarts_at_boundaries_and_matches_padded():
    lengths = [0, 1, 130, 7, 300, 0, 128, 1, 5]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(lengths), generator=gen, dtype=torch.float64)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    ref = reference_packed(x, lengths, GAMMA)
    torch.testing.assert_close(future_kl(x, GAMMA, cu), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(future_kl(x, GAMMA, cu, chunk_size=8), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(future_kl(x.float(), GAMMA, cu).double(), ref, rtol=0, atol=1e-6)
    # Same tokens as right-padded rows (zeros after each sequence) give the same values.
    rows = torch.zeros(len(lengths), max(lengths), dtype=torch.float64)
    for i, (a, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        rows[i, :n] = x[a:a + n]
    padded = future_kl(rows, GAMMA)
    packed = future_kl(x, GAMMA, cu)
    for i, (a, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        torch.testing.assert_close(packed[a:a + n], padded[i, :n], rtol=0, atol=1e-12)


def test_empty_inputs_and_half_precision():
    assert future_kl(torch.zeros(0, 5), GAMMA).shape == (0, 5)
    assert future_kl(torch.zeros(3, 0), GAMMA).shape == (3, 0)
    assert future_kl(torch.zeros(0), GAMMA, torch.tensor([0])).shape == (0,)
    assert future_kl(torch.zeros(0), GAMMA, torch.tensor([0, 0, 0])).shape == (0,)
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(4)) * 0.1
    got = future_kl(x.bfloat16(), GAMMA)
    assert got.dtype == torch.bfloat16
    ref = reference_rows(x.bfloat16().double(), GAMMA)
    torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-2)


def test_segment_scan_totals():
    lengths = [3, 0, 140, 1]
    x = torch.randn(sum(lengths), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cu = torch.tensor([0] + lengths).cumsum(0)
    f_loc, totals = segment_scan(x, GAMMA, cu)
    ref = reference_packed(x, lengths, GAMMA)
    torch.testing.assert_close(f_loc, ref, rtol=0, atol=1e-12)
    expected = [ref[a].item() if n else 0.0 for a, n in zip(cu[:-1].tolist(), lengths)]
    torch.testing.assert_close(totals, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    rows = torch.randn(4, 9, dtype=torch.float64)
    f_loc, totals = segment_scan(rows, GAMMA)
    torch.testing.assert_close(totals, reference_rows(rows, GAMMA)[:, 0], rtol=0, atol=1e-12)


def test_value_errors():
    x = torch.zeros(2, 4)
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="gamma"):
            future_kl(x, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        future_kl(x, GAMMA, chunk_size=1)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        future_kl(torch.zeros(3), GAMMA)
    with pytest.raises(ValueError, match="1-D"):
        future_kl(x, GAMMA, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        future_kl(torch.zeros(5), GAMMA, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer"):
        future_kl(torch.zeros(5), GAMMA, torch.tensor([0.0, 5.0]))


def test_benchmark_quick_smoke():
    """The benchmark script runs, and both methods agree with the float64 recurrence (no timing asserted)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "benchmarks" / "bench_future_kl.py"
    spec = importlib.util.spec_from_file_location("bench_future_kl", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--repeats", "1"])
    assert [r["L"] for r in rows] == [256, 512]
    for r in rows:
        assert r["ours_err"] < 1e-6 and r["released_err"] < 1e-5 and r["ours_fp32_err"] < 1e-5
    # The re-implemented released method is itself a correct FutureKL (so the speed comparison is fair).
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(bench.released_future_kl(x, GAMMA), reference_rows(x, GAMMA), rtol=0, atol=1e-12)


@pytest.mark.gpu
def test_cuda_matches_reference_even_with_tf32():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fipo_megatron.algo.policy_loss import PolicyLossConfig, get_policy_loss

    x = torch.randn(4, 5000, generator=torch.Generator().manual_seed(8)) * 0.1
    ref = reference_rows(x, GAMMA)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the float64 scan must not be affected by TF32
    try:
        got = future_kl(x.cuda(), GAMMA).cpu()
        lengths = [0, 1, 4999, 3000, 12000]
        flat = torch.randn(sum(lengths), generator=torch.Generator().manual_seed(9)) * 0.1
        cu = torch.tensor([0] + lengths).cumsum(0)
        packed = future_kl(flat.cuda(), GAMMA, cu.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(packed.double(), reference_packed(flat, lengths, GAMMA), rtol=0, atol=1e-6)
    # The loss on CUDA equals the loss on CPU.
    old = -torch.rand(4, 300, generator=torch.Generator().manual_seed(10))
    logp = old + torch.randn(4, 300, generator=torch.Generator().manual_seed(11)) * 0.3
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(4, 300).contiguous()
    mask = torch.ones(4, 300)
    fn, cfg = get_policy_loss("fipo"), PolicyLossConfig()
    cpu_loss, _ = fn(log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask, config=cfg)
    gpu_loss, _ = fn(log_prob=logp.cuda(), old_log_prob=old.cuda(), advantages=adv.cuda(), response_mask=mask.cuda(),
                     config=cfg)
    assert gpu_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-5)
