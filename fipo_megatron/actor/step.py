"""One pass of packed micro-batches through Megatron's pipeline schedule, and the reductions around it.

Exact token mean (docs/algorithm.md §5, the default "token-mean"): the loss function hands Megatron the *sum* of the
per-token loss over this micro-batch's kept tokens together with their count (``calculate_per_token_loss``
mode). Megatron's DDP then sums gradients over DP x CP, and ``finalize_model_grads`` all-reduces the
counts (broadcast from the last pipeline stage, summed over DP x CP) and divides every gradient by the
total before the optimizer clips it. The gradient is therefore exactly that of

    sum over kept tokens of the mini-batch (all micro-batches, DP and CP ranks) of l  /  number of kept tokens

which equals passing ``num_global_tokens`` = all response tokens and rescaling by total/kept afterwards,
without the extra pass over the gradients. The released code's per-micro-batch mean
("token-mean-microbatch") is scaled by the micro-batch's share of this DP rank's sequences and by 1/dp
(verl's DP average), and reports zero tokens so that Megatron leaves it unscaled.

Metrics combine by name (``aggregation_kind``: ``*_min``, ``*_max``, ``num_*``, else a mean), over
micro-batches and DP x CP ranks in ``reduce_metrics`` and over a step's mini-batches in
``combine_mini_batches``; the actor only calls them.

Per-token records: a ``TokenCapture`` handed to ``make_loss_fn`` makes the loss fill a ``token_tap``
(``algo.policy_loss.TOKEN_TAP_FIELDS``) on the micro-batches that hold one of its samples, and
``collect_token_taps`` brings those samples' values to global rank 0. Without a capture nothing is
tapped, stored or communicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fipo_megatron.actor.packing import PackedMicroBatch


def run_schedule(*, model_chunks: list, micro_batches: list[PackedMicroBatch], forward_step, forward_only: bool,
                 groups) -> list:
    """Run ``forward_step`` over ``micro_batches`` with Megatron's schedule; the loss outputs (last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    # Interleaved pipelines take one iterator per model chunk; each walks the same micro-batches.
    iters = [iter(micro_batches) for _ in model_chunks]
    max_len = max(int(mb.cu_seqlens_padded[-1]) for mb in micro_batches)
    kwargs = dict(forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
                  model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
                  num_microbatches=len(micro_batches), seq_length=max_len, micro_batch_size=1,
                  forward_only=forward_only)
    return fb(**kwargs) or []


@dataclass(kw_only=True)
class TokenCapture:
    """Which samples of one mini-batch to tap per token (indices into that mini-batch's samples), and the
    ``(micro-batch, tap)`` pairs the loss filled on this rank."""

    sample_indices: frozenset[int]
    taps: list = field(default_factory=list)

    def wants(self, mb: PackedMicroBatch) -> bool:
        """Whether micro-batch ``mb`` holds one of the samples to tap."""
        return any(i in self.sample_indices for i in mb.sample_indices)


def make_loss_fn(*, loss_fn, loss_config, groups, num_local_seqs: int, capture: TokenCapture | None = None):
    """Megatron ``loss_func`` body: ``(mb, logp_T, entropy_T) -> (loss, num_tokens, reduced)``.

    ``num_local_seqs``: sequences of this DP rank's mini-batch share (for "token-mean-microbatch").
    ``capture``: tap the per-token values of its samples (the loss must accept ``token_tap``).
    """
    from fipo_megatron.parallel.cp_future_kl import CPShard

    def compute(mb: PackedMicroBatch, logp_T: torch.Tensor, entropy_T: torch.Tensor):
        cp = None
        if groups.cp_size > 1:
            cp = CPShard(cp_group=groups.cp_group, cp_size=groups.cp_size, cp_rank=groups.cp_rank,
                         cu_seqlens=mb.cu_seqlens_padded.long())
        per_token = loss_config.loss_agg_mode == "token-mean"
        tap = {} if capture is not None and capture.wants(mb) else None
        loss, metrics = loss_fn(log_prob=logp_T, old_log_prob=mb.old_log_probs_T, advantages=mb.advantages_T,
                                response_mask=mb.response_mask_T, config=loss_config,
                                cu_seqlens=mb.local_cu_seqlens, num_global_tokens=1.0 if per_token else None, cp=cp,
                                **({} if tap is None else {"token_tap": tap}))
        if tap is not None:
            capture.taps.append((mb, tap))
        if per_token:
            num_tokens = torch.tensor(int(metrics["num_kept_tokens"]), dtype=torch.int, device=loss.device)
            loss_sum = loss.detach().float()
        else:
            loss = loss * (float(metrics["num_seqs"]) / num_local_seqs / groups.dp_size)
            num_tokens = torch.zeros((), dtype=torch.int, device=loss.device)  # Megatron: leave unscaled
            loss_sum = float(metrics["pg_loss"]) * float(metrics["num_kept_tokens"])
        mask = mb.response_mask_T != 0
        reduced = {"metrics": metrics, "loss_sum": float(loss_sum), "num_local_tokens": int(mask.sum()),
                   "num_neg_tokens": int((mask & (mb.advantages_T < 0)).sum()),
                   "num_pos_tokens": int((mask & (mb.advantages_T > 0)).sum()),
                   "entropy_sum": float(entropy_T[mask].double().sum()) if entropy_T.numel() else 0.0}
        return loss, num_tokens, reduced

    return compute


def collect_token_taps(capture: TokenCapture, *, groups) -> dict[int, dict[str, torch.Tensor]] | None:
    """The tapped per-token values of ``capture``'s samples: ``{sample index: {field: [response_len]}}``
    (float32, CPU; boolean fields as 0/1) on global rank 0, None elsewhere. Collective over the job.

    The last pipeline stage holds the taps; each CP group all-gathers its zig-zag shards and its rank 0 of
    TP and CP sends the samples it owns (TP ranks computed identical values).
    """
    from fipo_megatron.algo.policy_loss import TOKEN_TAP_FIELDS

    mine: dict[int, dict[str, torch.Tensor]] = {}
    if groups.is_last_stage:
        for mb, tap in capture.taps:
            missing = [f for f in TOKEN_TAP_FIELDS if f not in tap]
            if missing:
                raise ValueError(f"the policy loss filled token_tap without {missing}")
            local_FT = torch.stack([tap[f].detach().float() for f in TOKEN_TAP_FIELDS])
            shards = [local_FT]
            if groups.cp_size > 1:
                shards = [torch.empty_like(local_FT) for _ in range(groups.cp_size)]
                dist.all_gather(shards, local_FT.contiguous(), group=groups.cp_group)
            per_field = [mb.gather_responses([s[k] for s in shards]) for k in range(len(TOKEN_TAP_FIELDS))]
            for j, i in enumerate(mb.sample_indices):
                if i in capture.sample_indices:
                    mine[i] = {f: per_field[k][j] for k, f in enumerate(TOKEN_TAP_FIELDS)}
        if groups.tp_rank != 0 or groups.cp_rank != 0:
            mine = {}
    if dist.get_world_size() == 1:
        return mine
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    return {i: values for part in gathered for i, values in part.items()}


def logprob_loss_fn(mb: PackedMicroBatch, logp_T: torch.Tensor, entropy_T: torch.Tensor):
    """Forward-only ``loss_func`` body: hand the detached log-probs and entropy back to the caller."""
    zero = torch.zeros((), dtype=torch.float32, device=logp_T.device)
    return zero, torch.zeros((), dtype=torch.int, device=logp_T.device), {
        "mb": mb, "logp": logp_T.detach().float(), "entropy": entropy_T.detach().float()}


def aggregation_kind(name: str) -> str:
    """How a metric combines across micro-batches, ranks and mini-batches, by its name: ``*_min`` by min,
    ``*_max`` by max, ``num_*`` (counts) by sum, everything else by a (token-weighted) mean."""
    if name.endswith("_min"):
        return "min"
    if name.endswith("_max"):
        return "max"
    if name.startswith("num_"):
        return "sum"
    return "mean"


def _weight(name: str, out: dict) -> float:
    """How much one micro-batch's value of ``name`` counts: its tokens of the set the statistic is over."""
    if name.startswith("neg_is_"):
        return float(out["num_neg_tokens"])
    if name.startswith("pos_is_"):
        return float(out["num_pos_tokens"])
    return float(out["num_local_tokens"])


def reduce_metrics(outputs: list[dict], *, groups, device) -> dict[str, float]:
    """Combine the last stage's per-micro-batch outputs over micro-batches and DP x CP ranks.

    Means are weighted by the tokens each micro-batch's statistic is over (response tokens; for the
    ``neg_is_*`` / ``pos_is_*`` ratio statistics the negative / positive-advantage tokens), which is
    exact for the token means (clip fractions, ``ppo_kl``, influence-weight means) and an approximation
    for the quantiles. A micro-batch whose set is empty (the loss reports 0 there) or whose value is not
    finite is left out, also of the min/max. Every rank of the job gets the result (the last pipeline
    stage broadcasts it).
    """
    names = sorted({k for o in outputs for k in o["metrics"]})
    sums = torch.zeros(len(names) + 4, dtype=torch.float64, device=device)  # + weights per name below
    weights = torch.zeros(len(names), dtype=torch.float64, device=device)
    mins = torch.full((len(names),), math.inf, dtype=torch.float64, device=device)
    maxs = torch.full((len(names),), -math.inf, dtype=torch.float64, device=device)
    for o in outputs:
        for i, name in enumerate(names):
            v = o["metrics"].get(name)
            kind = aggregation_kind(name)
            w = _weight(name, o)
            if v is None or not math.isfinite(v) or (w == 0 and kind != "sum"):
                continue
            if kind == "min":
                mins[i] = min(float(mins[i]), v)
            elif kind == "max":
                maxs[i] = max(float(maxs[i]), v)
            elif kind == "sum":
                sums[i] += v
            else:
                sums[i] += v * w
                weights[i] += w
        sums[-4] += o["loss_sum"]
        sums[-3] += float(o["metrics"].get("num_kept_tokens", 0.0))
        sums[-2] += o["entropy_sum"]
        sums[-1] += o["num_local_tokens"]
    packed = torch.cat([sums, weights, mins, -maxs])
    if groups.is_last_stage:
        sum_part = packed[:len(sums) + len(weights)]
        dist.all_reduce(sum_part, group=groups.dp_cp_group)
        min_part = packed[len(sums) + len(weights):]
        dist.all_reduce(min_part, op=dist.ReduceOp.MIN, group=groups.dp_cp_group)
        packed = torch.cat([sum_part, min_part])
    if groups.pp_size > 1:
        # Only the last stage ran the loss, so only it knows the names; it sends names and values.
        payload = [(names, packed.cpu()) if groups.is_last_stage else None]
        dist.broadcast_object_list(payload, src=dist.get_global_rank(groups.pp_group, groups.pp_size - 1),
                                   group=groups.pp_group)
        names, packed = payload[0]
    n = len(names)
    sums, weights = packed[:n + 4], packed[n + 4:2 * n + 4]
    mins, maxs = packed[2 * n + 4:3 * n + 4], -packed[3 * n + 4:]
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        kind = aggregation_kind(name)
        if kind == "min":
            value = float(mins[i])
        elif kind == "max":
            value = float(maxs[i])
        elif kind == "sum":
            value = float(sums[i])
        else:
            value = float(sums[i] / weights[i]) if weights[i] > 0 else float("nan")
        if math.isfinite(value) or kind in ("mean", "sum"):
            out[name] = value
    loss_sum, kept, ent_sum, num_tok = (float(x) for x in sums[n:n + 4])
    for name in ("num_seqs", "num_dropped_seqs"):  # identical on every CP rank of a group
        if name in out:
            out[name] /= groups.cp_size
    out["pg_loss"] = loss_sum / max(kept, 1.0)  # the exact global token mean of the mini-batch
    out["num_kept_tokens"] = kept
    out["entropy"] = ent_sum / max(num_tok, 1.0)
    return out


def combine_mini_batches(per_mini: list[dict[str, float]]) -> dict[str, float]:
    """Mini-batch metrics -> step metrics: min of ``*_min``, max of ``*_max``, sum of ``num_*``, else the mean."""
    out: dict[str, float] = {}
    for name in sorted({k for m in per_mini for k in m}):
        values = [m[name] for m in per_mini if name in m]
        finite = [v for v in values if math.isfinite(v)]
        kind = aggregation_kind(name)
        if kind == "min":
            out[name] = min(finite) if finite else float("nan")
        elif kind == "max":
            out[name] = max(finite) if finite else float("nan")
        elif kind == "sum":
            out[name] = float(sum(values))
        else:  # mini-batches count alike, whatever their token counts
            out[name] = sum(finite) / len(finite) if finite else float("nan")
    return out
