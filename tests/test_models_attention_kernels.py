"""Local core attention runs torch's fused SDPA kernels, never the math fallback (CP = 1 and CP = 2).

The math path materialises an L x L score matrix per head (``bmm`` + ``softmax``), which made the actor's
memory grow with the square of the response length. Two independent guards: torch's own backend selection
with the math backend switched off (``sdpa_kernel``: a fallback is then an error), and the profiler's op
names for forward + backward (the private blockwise kernels of the CP path bypass ``sdpa_kernel``, so the
op names are what catches a regression there). Numerics: the CP blockwise merge against a float64
softmax reference, outputs and q/k/v gradients.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fipo_megatron.parallel import cp_layout
from fipo_megatron.testing.distributed import run_distributed

FUSED_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention",
             "aten::_scaled_dot_product_efficient_attention"}
# what the math path (and any hand-written softmax(q k^T) v) shows in the profile
MATH_OPS = {"aten::_scaled_dot_product_attention_math", "aten::bmm", "aten::baddbmm", "aten::_softmax",
            "aten::_softmax_backward_data", "aten::masked_fill"}


def _profiled_ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def _attention(cp: int, group=None):
    from fipo_megatron.models.cp_attention import LocalCoreAttention

    cfg = types.SimpleNamespace(kv_channels=16, attention_dropout=0.0, context_parallel_size=cp)
    pg = types.SimpleNamespace(cp=group) if group is not None else None
    return LocalCoreAttention(cfg, 1, pg_collection=pg)


def _packed_params(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=16, max_seqlen_kv=16)


def _forward_backward(attn, q, k, v, params=None):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attn(*leaves, None, packed_seq_params=params)
    out.square().sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _assert_fused(ops: set[str], what: str) -> None:
    assert ops & FUSED_OPS, f"{what}: no fused attention kernel ran; attention-related ops: " \
                            f"{sorted(o for o in ops if 'attention' in o or 'softmax' in o)}"
    assert not ops & MATH_OPS, f"{what}: math-path ops ran: {sorted(ops & MATH_OPS)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cp1_packed_and_padded_take_fused_kernel(dtype):
    attn = _attention(1)
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 6, 16], dtype=torch.int32)
    q = torch.randn(16, 4, 16, generator=g).to(dtype)
    k, v = (torch.randn(16, 2, 16, generator=g).to(dtype) for _ in range(2))  # GQA: 2 groups for 4 heads
    params = _packed_params(cu)
    # math backend off: a fallback raises "No viable backend" instead of running
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        ops = _profiled_ops(lambda: _forward_backward(attn, q, k, v, params))
    _assert_fused(ops, f"packed cp=1 {dtype}")
    qp, kp, vp = (x.reshape(8, 2, *x.shape[1:]) for x in (q, k, v))  # padded [s, b, h, d]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        ops = _profiled_ops(lambda: _forward_backward(attn, qp, kp, vp))
    _assert_fused(ops, f"padded cp=1 {dtype}")


def test_guard_sees_math_path():
    """The guard itself: 3-D input (what the packed path once passed) takes the math path and is caught."""
    q = torch.randn(4, 16, 16, requires_grad=True)
    ops = _profiled_ops(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward())
    with pytest.raises(AssertionError, match="math-path ops|no fused"):
        _assert_fused(ops, "3-D")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, q, is_causal=True)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("cp", [2, 3])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
def test_zigzag_blocks_match_float64_softmax(cp, dtype, atol, device):
    """Each rank's two zig-zag chunks (blockwise kernels, log-sum-exp merge, ring-style backward) vs one
    float64 causal softmax: outputs, query grads per rank, key/value grads summed over ranks. On CUDA:
    the flash kernel (bf16) and the memory-efficient one (fp32), whose log-sum-exp is padded."""
    from fipo_megatron.models.cp_attention import _zigzag_attention

    if device == "cuda" and dtype == torch.float32:
        atol = 1e-3  # TF32 may be on for the kernel's matmuls
    g = torch.Generator().manual_seed(cp)
    seq_len, scale = 8 * cp, 0.3
    q = torch.randn(2, 4, seq_len, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, seq_len, 16, generator=g, dtype=torch.float64) for _ in range(2))
    up = torch.randn(2, 4, seq_len, 16, generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    scores = torch.einsum("bhqd,bhkd->bhqk", ref[0], ref[1].repeat_interleave(2, 1)) * scale
    scores = scores.masked_fill(~torch.ones(seq_len, seq_len, dtype=torch.bool).tril(), float("-inf"))
    out_ref = scores.softmax(-1) @ ref[2].repeat_interleave(2, 1)
    (out_ref * up).sum().backward()
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for rank in range(cp):
        pos = cp_layout.local_positions(seq_len, cp_size=cp, cp_rank=rank)
        leaves = [q[:, :, pos].to(device, dtype).requires_grad_(True), k.to(device, dtype).requires_grad_(True),
                  v.to(device, dtype).requires_grad_(True)]
        out = _zigzag_attention(*leaves, cp=cp, rank=rank, scale=scale)
        (out * up[:, :, pos].to(device, dtype)).sum().backward()
        torch.testing.assert_close(out.double().cpu(), out_ref[:, :, pos].detach(), atol=atol, rtol=atol)
        torch.testing.assert_close(leaves[0].grad.double().cpu(), ref[0].grad[:, :, pos], atol=atol, rtol=atol)
        dk += leaves[1].grad.double().cpu()
        dv += leaves[2].grad.double().cpu()
    torch.testing.assert_close(dk, ref[1].grad, atol=atol, rtol=atol)
    torch.testing.assert_close(dv, ref[2].grad, atol=atol, rtol=atol)


def _cp2_worker(rank, world_size):
    import torch.distributed as dist

    attn = _attention(world_size, dist.group.WORLD)
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 8, 12, 24], dtype=torch.int32)  # each a multiple of 2 * cp
    q = torch.randn(24, 4, 16, generator=g)
    k, v = (torch.randn(24, 2, 16, generator=g) for _ in range(2))
    split = lambda x: cp_layout.split_packed(x, cu_seqlens=cu, cp_size=world_size, cp_rank=rank)  # noqa: E731
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        packed = _profiled_ops(lambda: _forward_backward(attn, split(q), split(k), split(v), _packed_params(cu)))
        pad = lambda x: cp_layout.split_padded(x.reshape(12, 2, *x.shape[1:]), cp_size=world_size,  # noqa: E731
                                               cp_rank=rank, dim=0)
        padded = _profiled_ops(lambda: _forward_backward(attn, pad(q), pad(k), pad(v)))
    return {"packed": packed, "padded": padded}


def test_cp2_packed_and_padded_take_fused_kernel():
    for rank, result in enumerate(run_distributed(_cp2_worker, world_size=2, timeout=300)):
        for layout, ops in result.items():
            _assert_fused(ops, f"{layout} cp=2 rank {rank}")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_packed_attention_takes_fused_kernel(dtype):
    """CUDA: packed cp=1 attention under the math-off backend context, profiled (flash for bf16,
    memory-efficient for fp32; grouped K/V expanded for fp32 where the efficient kernel needs it)."""
    attn = _attention(1)
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 40, 48, 128], dtype=torch.int32, device="cuda")
    q = torch.randn(128, 4, 16, generator=g).to("cuda", dtype)
    k, v = (torch.randn(128, 2, 16, generator=g).to("cuda", dtype) for _ in range(2))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        ops = _profiled_ops(lambda: _forward_backward(attn, q, k, v, _packed_params(cu)))
    _assert_fused(ops, f"CUDA packed cp=1 {dtype}")
