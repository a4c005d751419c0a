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
CP group (a differentiable gather whose backward reduce-scatters the gradient) and queries are masked by
their global positions. SDPA computes the attention, one sequence at a time for packed input, so memory is
O(L_i^2 / cp) per sequence rather than O(T^2) for the whole pack.
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


def _sdpa(q_hqd, k_hkd, v_hkd, *, mask_qk=None, causal=False, scale, dropout_p):
    # [h, q, d] x [h, k, d]: SDPA with an explicit boolean mask (True = attend) or its causal fast path.
    return F.scaled_dot_product_attention(q_hqd, k_hkd, v_hkd, attn_mask=mask_qk, is_causal=causal,
                                          dropout_p=dropout_p, scale=scale)


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
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            from megatron.core import parallel_state

            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group
        self.cp_size = config.context_parallel_size

    def _gather_kv(self, k, v):
        """K, V of the whole CP group, concatenated in rank order along dim 0 (each rank's local order)."""
        k_all = gather_from_cp(k, group=self.cp_group)
        v_all = gather_from_cp(v, group=self.cp_group)
        return k_all.flatten(0, 1), v_all.flatten(0, 1)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_bias is not None:
            raise ValueError("LocalCoreAttention does not support attention_bias")
        dropout_p = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", "thd") == "thd":
            return self._forward_packed(query, key, value, packed_seq_params, dropout_p)
        return self._forward_padded(query, key, value, attention_mask, dropout_p)

    def _forward_padded(self, q_sbhd, k_sbgd, v_sbgd, attention_mask, dropout_p):
        s_local, b, num_heads, head_dim = q_sbhd.shape
        cp = self.cp_size
        if cp > 1:
            if attention_mask is not None:
                raise ValueError("with context parallelism pass attention_mask=None (causal masking only)")
            rank = dist.get_rank(self.cp_group)
            seq_len = s_local * cp
            k_sbgd, v_sbgd = self._gather_kv(k_sbgd, v_sbgd)
            q_pos = cp_layout.local_positions(seq_len, cp_size=cp, cp_rank=rank).to(q_sbhd.device)
            k_pos = torch.cat([cp_layout.local_positions(seq_len, cp_size=cp, cp_rank=r) for r in range(cp)])
            mask = k_pos.to(q_sbhd.device)[None, :] <= q_pos[:, None]
        else:
            mask = None
            if attention_mask is not None:  # Megatron convention: True = masked out
                s_k = k_sbgd.shape[0]
                causal = torch.ones(s_local, s_k, dtype=torch.bool, device=q_sbhd.device).tril()
                mask = causal & ~attention_mask.to(torch.bool)  # broadcasts to [b, 1, s, s]
        q = q_sbhd.permute(1, 2, 0, 3)  # [b, h, s, d]
        k = _expand_kv(k_sbgd, num_heads, 2).permute(1, 2, 0, 3)
        v = _expand_kv(v_sbgd, num_heads, 2).permute(1, 2, 0, 3)
        out = _sdpa(q, k, v, mask_qk=mask, causal=mask is None, scale=self.softmax_scale, dropout_p=dropout_p)
        return out.permute(2, 0, 1, 3).reshape(s_local, b, num_heads * head_dim)

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
        k_all = _expand_kv(k_tgd, num_heads, 1)
        v_all = _expand_kv(v_tgd, num_heads, 1)
        outs = []
        q_start = 0
        for start, end in zip(cu_list[:-1], cu_list[1:]):
            length = end - start
            if length == 0:
                continue
            n_q = length // cp
            q = q_thd[q_start:q_start + n_q].transpose(0, 1)  # [h, n_q, d]
            k = k_all[start:end].transpose(0, 1)
            v = v_all[start:end].transpose(0, 1)
            if cp > 1:
                q_pos = cp_layout.local_positions(length, cp_size=cp, cp_rank=rank).to(q.device)
                mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
                out = _sdpa(q, k, v, mask_qk=mask, scale=self.softmax_scale, dropout_p=dropout_p)
            else:
                out = _sdpa(q, k, v, causal=True, scale=self.softmax_scale, dropout_p=dropout_p)
            outs.append(out.transpose(0, 1))
            q_start += n_q
        out = torch.cat(outs, dim=0) if outs else q_thd.new_zeros(0, num_heads, head_dim)
        return out.reshape(t_local, num_heads * head_dim)
