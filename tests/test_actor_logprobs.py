"""Chunked vocab-parallel log-prob/entropy against a float64 full-logits reference, single process and TP on gloo."""

from __future__ import annotations

import pytest
import torch

from fipo_megatron.actor.logprobs import naive_log_probs, vocab_parallel_log_probs
from fipo_megatron.testing.distributed import run_distributed


def _reference64(hidden_TH, weight_VH, labels_T, temperature, num_valid_vocab):
    """float64 log-prob, entropy and gradients of sum(g * logp) written straight from the definition."""
    h = hidden_TH.double().detach().requires_grad_(True)
    w = weight_VH.double().detach().requires_grad_(True)
    z = (h @ w.t())[:, :num_valid_vocab] / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, labels_T.unsqueeze(1)).squeeze(1) - lse
    p = torch.softmax(z, dim=-1)
    entropy = lse - (p * z).sum(-1)
    return h, w, logp, entropy.detach()


def _inputs(seed=0, T=37, H=16, V=40, num_valid=35):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, num_valid, (T,), generator=g)
    upstream = torch.randn(T, generator=g)
    upstream[:5] = 0.0  # a chunk with no gradient (prompt) exercises the skip path
    return hidden, weight, labels, upstream, num_valid


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 1000])
def test_chunked_matches_float64_reference(chunk_size):
    hidden, weight, labels, upstream, num_valid = _inputs()
    temperature = 0.7
    h64, w64, logp64, ent64 = _reference64(hidden, weight, labels, temperature, num_valid)
    (logp64 * upstream.double()).sum().backward()

    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp, ent = vocab_parallel_log_probs(hidden_TH=h, weight_VH=w, labels_T=labels, temperature=temperature,
                                         chunk_size=chunk_size, num_valid_vocab=num_valid)
    (logp * upstream).sum().backward()
    torch.testing.assert_close(logp.double(), logp64, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ent64, atol=1e-5, rtol=0)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)
    assert torch.all(w.grad[num_valid:] == 0), "padded vocab rows must get no gradient"
    assert not ent.requires_grad


def test_gradient_matches_autograd_through_naive():
    hidden, weight, labels, upstream, num_valid = _inputs(seed=1, T=50, V=64, num_valid=64)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref, ref_ent = naive_log_probs(hidden_TH=h1, weight_VH=w1, labels_T=labels, temperature=1.3)
    (ref * upstream).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out, ent = vocab_parallel_log_probs(hidden_TH=h2, weight_VH=w2, labels_T=labels, temperature=1.3, chunk_size=7)
    (out * upstream).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-5, rtol=1e-5)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels_T"):
        vocab_parallel_log_probs(hidden_TH=torch.zeros(3, 4), weight_VH=torch.zeros(5, 4), labels_T=torch.zeros(2))
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_log_probs(hidden_TH=torch.zeros(3, 4), weight_VH=torch.zeros(5, 4),
                                 labels_T=torch.zeros(3), chunk_size=0)


def _tp_worker(rank, world_size, hidden, weight, labels, upstream, num_valid):
    import torch.distributed as dist

    group = dist.new_group(list(range(world_size)))
    vocab_local = weight.shape[0] // world_size
    start = rank * vocab_local
    h = hidden.clone().requires_grad_(True)
    w = weight[start:start + vocab_local].clone().requires_grad_(True)
    logp, ent = vocab_parallel_log_probs(hidden_TH=h, weight_VH=w, labels_T=labels, tp_group=group,
                                         temperature=0.9, chunk_size=6, vocab_start=start, num_valid_vocab=num_valid)
    (logp * upstream).sum().backward()
    return {"logp": logp.detach(), "ent": ent, "h_grad": h.grad, "w_grad": w.grad}


@pytest.mark.distributed
def test_tensor_parallel_matches_reference():
    # V=40 over 2 ranks with 33 valid: rank 1 holds 7 padded columns; one label on each shard boundary.
    hidden, weight, labels, upstream, _ = _inputs(seed=2, T=23, V=40, num_valid=33)
    num_valid = 33
    labels[0], labels[1] = 19, 20
    h64, w64, logp64, ent64 = _reference64(hidden, weight, labels, 0.9, num_valid)
    (logp64 * upstream.double()).sum().backward()
    results = run_distributed(_tp_worker, 2, args=(hidden, weight, labels, upstream, num_valid), timeout=120)
    for r in results:
        torch.testing.assert_close(r["logp"].double(), logp64, atol=1e-5, rtol=0)
        torch.testing.assert_close(r["ent"].double(), ent64, atol=1e-5, rtol=0)
        torch.testing.assert_close(r["h_grad"].double(), h64.grad, atol=1e-5, rtol=1e-5)
    w_grad = torch.cat([r["w_grad"] for r in results])
    torch.testing.assert_close(w_grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_close_to_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hidden, weight, labels, upstream, num_valid = _inputs(seed=3, T=300, H=64, V=512, num_valid=500)
    h64, w64, logp64, ent64 = _reference64(hidden, weight, labels, 1.0, num_valid)
    h = hidden.cuda().bfloat16().requires_grad_(True)
    w = weight.cuda().bfloat16().requires_grad_(True)
    logp, ent = vocab_parallel_log_probs(hidden_TH=h, weight_VH=w, labels_T=labels.cuda(), chunk_size=64,
                                         num_valid_vocab=num_valid)
    (logp * upstream.cuda()).sum().backward()
    # bf16 inputs: compare against the reference at bf16-level tolerance.
    torch.testing.assert_close(logp.double().cpu(), logp64.detach(), atol=0.1, rtol=0.02)
    torch.testing.assert_close(ent.double().cpu(), ent64, atol=0.1, rtol=0.02)
    assert h.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()
