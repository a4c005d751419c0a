"""Core attention for Megatron's local layer spec: padded or packed (THD) input, with or without CP.

megatron-core's local ``DotProductAttention`` takes neither packed sequences nor context parallelism (its
constructor asserts ``context_parallel_size == 1``; that assert is the only CP-needs-TE check on the local
path in 0.16-0.19, so replacing the module in the spec is the whole workaround). This module is the
drop-in replacement the builder puts into the local spec; on GPU the Transformer Engine spec is used instead.

Layouts (what ``megatron.core.transformer.attention.Attention`` hands to core attention):
- padded: q ``[s, b, np, hn]``, k/v ``[s, b, ng, hn]`` -> out ``[s, b, np*hn]``; causal.
- packed: q ``[t, np, hn]``, k/v ``[t, ng, hn]`` with ``packed_seq_params.cu_seqlens_q(_padded)`` the offsets
  of the *full* (pre-CP) packed batch -> out ``[t, np*hn]``; causal within each sequence only.
With ``cp > 1`` every rank holds the zig-zag share of ``parallel.cp_layout``; K and V are all-gathered in the
CP group (a differentiable gather whose backward reduce-scatters the gradient) and put back in global order.

Every path runs torch's fused attention kernels (CPU flash; CUDA flash for fp16/bf16, memory-efficient for
fp32), never the math fallback that materialises an L x L score matrix per head: input is 4-D
``[b, h, n, d]``, causal masking uses the kernels' own causal flag, and grouped K/V go to the kernel
unexpanded where it reads them. Packed input runs one causal kernel call per sequence (memory O(L_i)).
Under CP each of a rank's two zig-zag chunks attends to the keys before it in full and to itself causally,
two kernel calls merged by log-sum-exp (``_PrefixCausalAttention``), so no dense mask is built either.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from fipo_megatron.parallel import cp_layout


class _GatherFromCP(torch.autograd.Function):
    """``[n, ...]`` per rank -> ``[cp, n, ...]`` on every rank; backward sums the grads and keeps this rank's."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        rank = dist.get_rank(group)
        if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: all-reduce a copy, keep our slice
            grad = grad.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(grad, group=group)
            return grad[rank].clone(), None
        grad = grad.contiguous()
        out = torch.empty_like(grad[rank])
        dist.reduce_scatter_tensor(out, grad.flatten(0, 1), group=group)
        return out, None


def gather_from_cp(x: torch.Tensor, *, group) -> torch.Tensor:
    """Differentiable all-gather along a new leading dim (``[cp, *x.shape]``); reduce-scatter in backward."""
    return _GatherFromCP.apply(x, group)


def _expand_kv(kv: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    # Megatron's query-group order: query heads g*r .. g*r+r-1 share KV group g (r = np / ng).
    reps = num_heads // kv.shape[head_dim]
    return kv if reps == 1 else kv.repeat_interleave(reps, dim=head_dim)


def _use_gqa_kernel(q: torch.Tensor) -> bool:
    # CPU's fused kernel and CUDA's flash kernel (fp16/bf16) read grouped K/V directly (enable_gqa); CUDA's
    # memory-efficient kernel, the only fused one for fp32, does not, and enable_gqa would send it to math.
    return q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16)


def _sdpa(q_bhqd, k_bgkd, v_bgkd, *, mask_qk=None, causal=False, scale, dropout_p):
    """SDPA on 4-D ``[b, h, q, d]`` input, the layout torch's fused kernels (CPU flash, CUDA flash /
    memory-efficient) take; 3-D input always falls back to the math path (an L x L score matrix per head).
    K/V may hold fewer (grouped) heads."""
    num_heads = q_bhqd.shape[1]
    gqa = k_bgkd.shape[1] != num_heads
    if gqa and not _use_gqa_kernel(q_bhqd):
        k_bgkd, v_bgkd = (_expand_kv(x, num_heads, 1) for x in (k_bgkd, v_bgkd))
        gqa = False
    return F.scaled_dot_product_attention(q_bhqd, k_bgkd, v_bgkd, attn_mask=mask_qk, is_causal=causal,
                                          dropout_p=dropout_p, scale=scale, enable_gqa=gqa)


# ---------------------------------------------------------------- blockwise attention for context parallelism
# A zig-zag chunk i of a sequence attends to every key before it and causally to itself: keys [0, i*c) in
# full and [i*c, (i+1)*c) under a square causal mask. Each part runs in a fused kernel that also returns the
# row log-sum-exp; the parts merge exactly (softmax over the union of keys); the backward pass hands every
# part the *merged* output and log-sum-exp, which makes each kernel's backward produce that part's exact
# share of the gradient (the ring-attention identity: P = exp(s - lse) and D = rowsum(dO * O) are the
# global ones). torch's own ring attention does the same with these kernels
# (torch/distributed/tensor/experimental/_context_parallel/_attention.py, torch 2.13).


def _kernel_forward(q, k, v, *, causal: bool, scale: float):
    """``(out, lse [b, h, q] fp32, state for the backward)`` from the fused kernel for this device/dtype."""
    aten = torch.ops.aten
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, ("cpu",)
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 \
            and q.shape[-1] <= 256:
        out, lse, cu_q, cu_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out, lse, ("flash", cu_q, cu_k, max_q, max_k, seed, offset)
    if q.device.type == "cuda":
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                              scale=scale)
        # the kernel pads the lse's query dim (to a multiple of 32); the backward wants that shape back
        return out, lse[..., :q.shape[2]], ("efficient", lse.shape[-1], seed, offset)
    raise ValueError(f"context-parallel local attention runs on CPU or CUDA, got device {q.device}")


def _kernel_backward(dout, q, k, v, out, lse, state, *, causal: bool, scale: float):
    aten = torch.ops.aten
    kind = state[0]
    if kind == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                         scale=scale)
    if kind == "flash":
        _, cu_q, cu_k, max_q, max_k, seed, offset = state
        return aten._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                                                 0.0, causal, seed, offset, scale=scale)
    _, lse_len, seed, offset = state
    lse = F.pad(lse, (0, lse_len - lse.shape[-1])).contiguous()
    grads = aten._scaled_dot_product_efficient_attention_backward(dout, q, k, v, None, out, lse, seed, offset, 0.0,
                                                                  [True, True, True, False], causal, scale=scale)
    return grads[:3]


class _PrefixCausalAttention(torch.autograd.Function):
    """Queries ``[b, h, c, d]`` at positions ``[p, p + c)`` over keys/values ``[b, h, p + c, d]`` (heads
    already matched): keys ``[0, p)`` in full, the last ``c`` causally. Two fused-kernel calls merged by
    log-sum-exp; no mask tensor and no score matrix."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        c = q.shape[2]
        p = k.shape[2] - c
        parts = [(p, p + c, True)] + ([(0, p, False)] if p > 0 else [])
        results = [_kernel_forward(q, k[:, :, a:b], v[:, :, a:b], causal=causal, scale=scale)
                   for a, b, causal in parts]
        if len(results) == 1:
            out, lse = results[0][0], results[0][1]
        else:
            (o1, l1, _), (o2, l2, _) = results
            lse = torch.logaddexp(l1.float(), l2.float())
            out = ((l1 - lse).exp()[..., None] * o1.float() + (l2 - lse).exp()[..., None] * o2.float()).to(q.dtype)
        ctx.parts = [(a, b, causal, state) for (a, b, causal), (_, _, state) in zip(parts, results)]
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for a, b, causal, state in ctx.parts:
            gq, gk, gv = _kernel_backward(dout, q, k[:, :, a:b], v[:, :, a:b], out, lse, state, causal=causal,
                                          scale=ctx.scale)
            dq += gq
            dk[:, :, a:b] += gk
            dv[:, :, a:b] += gv
        return dq.to(q.dtype), dk, dv, None


def _zigzag_attention(q_bhnd, k_bgLd, v_bgLd, *, cp: int, rank: int, scale: float):
    """This rank's two zig-zag chunks of queries (``[b, h, 2c, d]``, local order) against the sequence's
    keys/values in global order (``[b, g, L, d]``, ``L = 2 * cp * c``)."""
    num_heads = q_bhnd.shape[1]
    k, v = (_expand_kv(x, num_heads, 1) for x in (k_bgLd, v_bgLd))
    c = q_bhnd.shape[2] // 2
    outs = []
    for half, chunk in enumerate((rank, 2 * cp - 1 - rank)):
        end = (chunk + 1) * c
        q = q_bhnd[:, :, half * c:(half + 1) * c].contiguous()
        outs.append(_PrefixCausalAttention.apply(q, k[:, :, :end].contiguous(), v[:, :, :end].contiguous(), scale))
    return torch.cat(outs, dim=2)


class LocalCoreAttention(MegatronModule):
    """Causal core attention for the local spec: padded and THD input, context parallelism by K/V gather.

    Accepts the constructor arguments Megatron's ``Attention`` passes to any core attention. Dropout is
    applied inside SDPA (``attention_dropout``, training only; the RL recipes use 0). Softmax runs in the
    input dtype's SDPA kernel (fp32 accumulation on CPU and in the GPU flash/efficient kernels).
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # Megatron's Attention hands every core attention its process groups (megatron-core >= 0.16, the
        # oldest supported); the CP group comes from there, never from parallel_state's globals.
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            raise ValueError(f"LocalCoreAttention with context_parallel_size={config.context_parallel_size} "
                             "needs pg_collection.cp (the caller's process groups)")
        self.cp_group = cp_group
        self.cp_size = config.context_parallel_size

    def _gather_kv(self, k, v):
        """K, V of the whole CP group, concatenated in rank order along dim 0 (each rank's local order)."""
        k_all = gather_from_cp(k, group=self.cp_group)
        v_all = gather_from_cp(v, group=self.cp_group)
        return k_all.flatten(0, 1), v_all.flatten(0, 1)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        """Causal attention in Megatron's core-attention contract.

        Padded input: ``query`` ``[s, b, heads, d]``, ``key``/``value`` ``[s, b, kv_heads, d]`` (this CP
        rank's zig-zag share under CP), ``attention_mask`` (True = masked out, combined with the causal
        mask; None under CP) -> ``[s, b, heads * d]``. Packed THD input (``packed_seq_params`` with
        ``qkv_format="thd"``): ``[t, heads, d]`` / ``[t, kv_heads, d]``, each sequence attending only to
        itself by ``cu_seqlens`` (the padded ones when given) -> ``[t, heads * d]``. ``attn_mask_type`` and
        the other keywords Megatron passes are accepted and ignored: the attention is always causal.
        """
        if attention_bias is not None:
            raise ValueError("LocalCoreAttention does not support attention_bias")
        dropout_p = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", "thd") == "thd":
            return self._forward_packed(query, key, value, packed_seq_params, dropout_p)
        return self._forward_padded(query, key, value, attention_mask, dropout_p)

    def _forward_padded(self, q_sbhd, k_sbgd, v_sbgd, attention_mask, dropout_p):
        s_local, b, num_heads, head_dim = q_sbhd.shape
        q = q_sbhd.permute(1, 2, 0, 3)  # [b, h, s, d]
        cp = self.cp_size
        if cp > 1:
            if attention_mask is not None:
                raise ValueError("with context parallelism pass attention_mask=None (causal masking only)")
            self._check_cp_dropout(dropout_p)
            rank = dist.get_rank(self.cp_group)
            seq_len = s_local * cp
            k_sbgd, v_sbgd = self._gather_kv(k_sbgd, v_sbgd)
            # rank-order concatenation -> global positions
            index = torch.cat([cp_layout.local_positions(seq_len, cp_size=cp, cp_rank=r) for r in range(cp)])
            order = torch.argsort(index).to(k_sbgd.device)
            k = k_sbgd.index_select(0, order).permute(1, 2, 0, 3)
            v = v_sbgd.index_select(0, order).permute(1, 2, 0, 3)
            out = _zigzag_attention(q, k, v, cp=cp, rank=rank, scale=self.softmax_scale)
        else:
            k, v = k_sbgd.permute(1, 2, 0, 3), v_sbgd.permute(1, 2, 0, 3)
            mask = None
            if attention_mask is not None:  # Megatron convention: True = masked out
                s_k = k_sbgd.shape[0]
                causal = torch.ones(s_local, s_k, dtype=torch.bool, device=q_sbhd.device).tril()
                mask = causal & ~attention_mask.to(torch.bool)  # broadcasts to [b, 1, s, s]
            out = _sdpa(q, k, v, mask_qk=mask, causal=mask is None, scale=self.softmax_scale, dropout_p=dropout_p)
        return out.permute(2, 0, 1, 3).reshape(s_local, b, num_heads * head_dim)

    def _check_cp_dropout(self, dropout_p):
        if dropout_p > 0:
            raise ValueError(f"attention dropout ({dropout_p}) with context parallelism is not supported by the "
                             "local attention (the blockwise kernels run without dropout); set "
                             "attention_dropout=0 or use the Transformer Engine backend")

    def _forward_packed(self, q_thd, k_tgd, v_tgd, params, dropout_p):
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_list = [int(x) for x in cu.tolist()]
        t_local, num_heads, head_dim = q_thd.shape
        cp = self.cp_size
        if cp > 1:
            rank = dist.get_rank(self.cp_group)
            k_cat, v_cat = self._gather_kv(k_tgd, v_tgd)
            # rank-order concatenation -> global packed order
            index = torch.cat([cp_layout.packed_local_index(cu, cp_size=cp, cp_rank=r) for r in range(cp)])
            order = torch.argsort(index).to(k_cat.device)
            k_tgd, v_tgd = k_cat.index_select(0, order), v_cat.index_select(0, order)
        if t_local * cp != cu_list[-1]:
            raise ValueError(f"packed input has {t_local} tokens per CP rank, but cu_seqlens end at "
                             f"{cu_list[-1]} (expected {t_local} * cp {cp})")
        if cp > 1:
            self._check_cp_dropout(dropout_p)
        outs = []
        q_start = 0
        for start, end in zip(cu_list[:-1], cu_list[1:]):
            length = end - start
            if length == 0:
                continue
            n_q = length // cp
            q = q_thd[q_start:q_start + n_q].transpose(0, 1)[None]  # [1, h, n_q, d]
            k = k_tgd[start:end].transpose(0, 1)[None]  # [1, g, length, d]
            v = v_tgd[start:end].transpose(0, 1)[None]
            if cp > 1:
                out = _zigzag_attention(q, k, v, cp=cp, rank=rank, scale=self.softmax_scale)
            else:
                out = _sdpa(q, k, v, causal=True, scale=self.softmax_scale, dropout_p=dropout_p)
            outs.append(out[0].transpose(0, 1))
            q_start += n_q
        out = torch.cat(outs, dim=0) if outs else q_thd.new_zeros(0, num_heads, head_dim)
        return out.reshape(t_local, num_heads * head_dim)
