"""Log-prob and entropy of sampled tokens over a tensor-parallel-sharded vocabulary, chunked.

At 20k tokens x 152k vocabulary the fp32 logits alone are 12 GiB per sequence, and autograd through
``log_softmax`` keeps two or three such tensors alive. This module never materialises more than one
chunk of ``chunk_size x V/tp`` logits: the forward pass walks the sequence in chunks and keeps only
per-token scalars (logsumexp), and the backward pass *recomputes* each chunk's logits from the hidden
states and the output-weight shard. Peak extra memory is a small multiple of one chunk, independent
of the sequence length (see ``tools/benchmarks/bench_logprobs.py``).

Math, per token with logits ``z = (h @ W^T) / temperature`` over the valid vocabulary:
    logp   = z[y] - logsumexp(z)
    H      = logsumexp(z) - sum_v softmax(z)_v * z_v
    dlogp/dz = onehot(y) - softmax(z)
The max, sum-exp, target logit and sum p*z are reduced across the TP group (all_reduce MAX, then one
SUM of three stacked vectors per chunk). Rows of the weight past ``num_valid_vocab`` (Megatron pads the
vocabulary to a multiple of 128*tp) are never multiplied, so they take no probability mass and get a
zero gradient.

Entropy is returned detached: it is a logged metric (the recipes use no entropy bonus), so it costs
no backward work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _chunk_logits(hidden_CH: torch.Tensor, weight_VH: torch.Tensor, *, inv_temperature: float,
                  out_CV: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits of one chunk over this rank's valid vocab columns (padded rows are never multiplied).

    ``out_CV``: a reused fp32 workspace of the chunk's shape. A fresh chunk-sized tensor per chunk costs
    more than the arithmetic on CPU (the allocator returns big blocks to the OS, so every chunk page-faults
    its ~chunk x V x 4 bytes in again)."""
    if out_CV is not None and hidden_CH.dtype == torch.float32:
        logits_CV = torch.matmul(hidden_CH, weight_VH.t(), out=out_CV)
    elif out_CV is not None:
        logits_CV = out_CV.copy_(torch.matmul(hidden_CH, weight_VH.t()))
    else:
        logits_CV = torch.matmul(hidden_CH, weight_VH.t()).float()
    if inv_temperature != 1.0:
        logits_CV.mul_(inv_temperature)
    return logits_CV


def _workspace(num_tokens: int, chunk_size: int, vocab_local: int, device) -> torch.Tensor:
    return torch.empty(min(chunk_size, num_tokens), vocab_local, dtype=torch.float32, device=device)


def _local_target(labels_C: torch.Tensor, *, vocab_start: int, vocab_local: int):
    """Local column of each label and whether this rank owns it."""
    local_C = labels_C - vocab_start
    owned_C = (local_C >= 0) & (local_C < vocab_local)
    return local_C.clamp(0, vocab_local - 1), owned_C


class _ChunkedVocabParallelLogProb(torch.autograd.Function):
    """Autograd function: forward chunked, backward recomputes each chunk's logits (see module doc)."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, labels_T, tp_group, inv_temperature, chunk_size, vocab_start,
                num_invalid, with_entropy):
        num_tokens = hidden_TH.shape[0]
        vocab_local = weight_VH.shape[0] - num_invalid
        valid_VH = weight_VH[:vocab_local]
        tp_size = _group_size(tp_group)
        logp_T = torch.empty(num_tokens, dtype=torch.float32, device=hidden_TH.device)
        lse_T = torch.empty_like(logp_T)
        entropy_T = torch.empty_like(logp_T) if with_entropy else None
        logits_ws = _workspace(num_tokens, chunk_size, vocab_local, hidden_TH.device)
        exp_ws = _workspace(num_tokens, chunk_size, vocab_local, hidden_TH.device)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits_CV = _chunk_logits(hidden_TH[start:end], valid_VH, inv_temperature=inv_temperature,
                                      out_CV=logits_ws[:end - start])
            max_C = logits_CV.max(dim=1).values
            if tp_size > 1:
                dist.all_reduce(max_C, op=dist.ReduceOp.MAX, group=tp_group)
            local_C, owned_C = _local_target(labels_T[start:end], vocab_start=vocab_start, vocab_local=vocab_local)
            target_C = logits_CV.gather(1, local_C.unsqueeze(1)).squeeze(1).masked_fill(~owned_C, 0.0)
            # Two chunk-sized buffers at most: the shifted logits z - m and exp(z - m).
            logits_CV.sub_(max_C.unsqueeze(1))
            exp_CV = torch.exp(logits_CV, out=exp_ws[:end - start])
            sums = [exp_CV.sum(dim=1), target_C]
            if with_entropy:
                # sum_v e^(z_v - m) * (z_v - m), one dot product per row (no chunk-sized temporary)
                sums.append(torch.bmm(exp_CV.unsqueeze(1), logits_CV.unsqueeze(2)).view(-1))
            del logits_CV, exp_CV
            stacked_KC = torch.stack(sums)
            if tp_size > 1:
                dist.all_reduce(stacked_KC, group=tp_group)
            sumexp_C = stacked_KC[0]
            lse_C = max_C + sumexp_C.log()
            lse_T[start:end] = lse_C
            logp_T[start:end] = stacked_KC[1] - lse_C
            if with_entropy:
                # H = lse - E_p[z] = log(sumexp) - E_p[z - m]
                entropy_T[start:end] = sumexp_C.log() - stacked_KC[2] / sumexp_C
        del logits_ws, exp_ws
        ctx.save_for_backward(hidden_TH, weight_VH, labels_T, lse_T)
        ctx.tp_group, ctx.inv_temperature, ctx.chunk_size = tp_group, inv_temperature, chunk_size
        ctx.vocab_start, ctx.num_invalid = vocab_start, num_invalid
        if entropy_T is None:
            entropy_T = torch.zeros(0, device=hidden_TH.device)
        ctx.mark_non_differentiable(entropy_T)
        return logp_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logp_T, _grad_entropy):
        hidden_TH, weight_VH, labels_T, lse_T = ctx.saved_tensors
        vocab_local = weight_VH.shape[0] - ctx.num_invalid
        valid_VH = weight_VH[:vocab_local]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden_TH = torch.zeros_like(hidden_TH) if need_h else None
        # fp32 accumulator for the weight gradient: many chunks sum into it.
        grad_weight_VH = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if need_w else None
        grad_logp_T = grad_logp_T.float()
        num_tokens = hidden_TH.shape[0]
        logits_ws = _workspace(num_tokens, ctx.chunk_size, vocab_local, hidden_TH.device)
        for start in range(0, num_tokens, ctx.chunk_size):
            end = min(start + ctx.chunk_size, num_tokens)
            g_C = grad_logp_T[start:end]
            if not bool(g_C.any()):
                continue  # prompt/padding chunks: nothing flows back (common in long prompts)
            logits_CV = _chunk_logits(hidden_TH[start:end], valid_VH, inv_temperature=ctx.inv_temperature,
                                      out_CV=logits_ws[:end - start])
            # dlogp/dz = onehot - p, so dL/dz = g * (onehot - p); built in place over the logits buffer.
            probs_CV = logits_CV.sub_(lse_T[start:end].unsqueeze(1)).exp_()
            grad_z_CV = probs_CV.mul_(-g_C.unsqueeze(1))
            local_C, owned_C = _local_target(labels_T[start:end], vocab_start=ctx.vocab_start, vocab_local=vocab_local)
            grad_z_CV.scatter_add_(1, local_C.unsqueeze(1), (g_C * owned_C).unsqueeze(1))
            if ctx.inv_temperature != 1.0:
                grad_z_CV.mul_(ctx.inv_temperature)
            grad_z_CV = grad_z_CV.to(hidden_TH.dtype)
            if need_h:
                grad_hidden_TH[start:end] = torch.matmul(grad_z_CV, valid_VH)
            if need_w:
                acc_VH = grad_weight_VH[:vocab_local]  # padded rows keep a zero gradient
                if grad_z_CV.dtype == torch.float32:
                    acc_VH.addmm_(grad_z_CV.t(), hidden_TH[start:end])
                else:
                    acc_VH.add_(torch.matmul(grad_z_CV.t(), hidden_TH[start:end]).float())
            del logits_CV, probs_CV, grad_z_CV
        if need_h and _group_size(ctx.tp_group) > 1:
            # Every TP rank saw the same hidden states but only its vocab shard: the gradients add up.
            dist.all_reduce(grad_hidden_TH, group=ctx.tp_group)
        if need_w:
            grad_weight_VH = grad_weight_VH.to(weight_VH.dtype)
        return grad_hidden_TH, grad_weight_VH, None, None, None, None, None, None, None


def vocab_parallel_log_probs(*, hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor,
                             tp_group=None, temperature: float = 1.0, chunk_size: int = 4096,
                             vocab_start: int = 0, num_valid_vocab: int | None = None,
                             with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (differentiable) and entropy (detached) of ``labels_T`` under ``softmax(h W^T / temperature)``.

    Args:
        hidden_TH: final hidden states, ``[T, H]``, identical on every TP rank (sequence-parallel callers
            gather first). Its gradient is summed over the TP group in backward.
        weight_VH: this TP rank's shard of the output weight, ``[V/tp, H]``, covering global vocab ids
            ``[vocab_start, vocab_start + V/tp)``.
        labels_T: global token ids, ``[T]`` (any id for positions whose log-prob is unused).
        tp_group: the tensor-parallel group (None: no TP).
        temperature: the rollout's sampling temperature.
        chunk_size: tokens per chunk; memory is ``O(chunk_size * V/tp)``.
        num_valid_vocab: the real (unpadded) vocabulary size; columns at or past it are ignored.
        with_entropy: also return the per-token entropy (detached, fp32).

    Returns:
        ``(logp_T, entropy_T)`` in fp32; ``entropy_T`` is None when ``with_entropy`` is False.
    """
    if hidden_TH.dim() != 2 or weight_VH.dim() != 2 or hidden_TH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"hidden_TH {tuple(hidden_TH.shape)} and weight_VH {tuple(weight_VH.shape)} must be [T, H] and [V, H]")
    if labels_T.shape != hidden_TH.shape[:1]:
        raise ValueError(f"labels_T {tuple(labels_T.shape)} must be [T] with T = {hidden_TH.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab_local = weight_VH.shape[0]
    valid_end = vocab_start + vocab_local if num_valid_vocab is None else num_valid_vocab
    num_invalid = max(0, min(vocab_local, vocab_start + vocab_local - valid_end))
    logp_T, entropy_T = _ChunkedVocabParallelLogProb.apply(
        hidden_TH, weight_VH, labels_T.long(), tp_group, 1.0 / temperature, int(chunk_size), int(vocab_start),
        int(num_invalid), bool(with_entropy))
    return logp_T, (entropy_T if with_entropy else None)


def naive_log_probs(*, hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor,
                    temperature: float = 1.0, num_valid_vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: full-vocabulary logits and ``log_softmax`` (single process). For tests and benchmarks."""
    logits_TV = torch.matmul(hidden_TH, weight_VH.t()).float() / temperature
    if num_valid_vocab is not None:
        logits_TV = logits_TV[:, :num_valid_vocab]
    logprobs_TV = torch.log_softmax(logits_TV, dim=-1)
    logp_T = logprobs_TV.gather(1, labels_T.long().unsqueeze(1)).squeeze(1)
    entropy_T = -(logprobs_TV.exp() * logprobs_TV).sum(dim=-1)
    return logp_T, entropy_T.detach()
