"""Policy losses: FIPO (docs/algorithm.md §1-5), DAPO and GRPO, behind a registry of named functions.

Every loss has the signature

    fn(*, log_prob, old_log_prob, advantages, response_mask, config, cu_seqlens=None,
       num_global_tokens=None, cp=None) -> (loss, metrics)

and the built-in losses also take ``token_tap`` (a dict, default None; see ``TOKEN_TAP_FIELDS``).

- tensors all of one shape: (B, T) right-padded rows (one response per row), or 1-D packed with
  ``cu_seqlens`` (S+1 int offsets; prompt/padding tokens carry ``response_mask = 0``);
  ``response_mask`` is read as a boolean (non-zero = response token);
- ``num_global_tokens`` ("token-mean" only): loss = sum of l over kept tokens / num_global_tokens, so
  the caller can make the token mean exact across micro-batches, DP and CP ranks; without it, the mean
  over this call's kept tokens (under CP: the kept tokens of the whole CP group, so the losses of the
  CP ranks add up to the unsplit loss);
- ``cp``: a ``ContextParallelShard`` (``parallel.cp_future_kl.CPShard`` is the one in use): the inputs
  are this CP rank's zig-zag share (packed with local ``cu_seqlens``, or (B, T // cp)); FutureKL gets its
  cross-rank carries and the per-sequence invalidation counts are summed over the CP group before the
  ``> 1`` test. The loss only calls the shard's methods, so this module imports nothing of
  ``parallel``;
- ``metrics``: python floats (names in ``loss_metrics``), plus ``num_tokens`` (response tokens),
  ``num_kept_tokens`` (after invalidation, this rank's share), ``num_seqs`` and ``num_dropped_seqs``
  (sequences of this call; identical on every CP rank of a group, so do not sum them over CP).
  ``pg_loss`` is the token mean of l over this call's kept tokens, whatever the aggregation.

Aggregation (``loss_agg_mode``):
- "token-mean" (default): the exact global token mean when the caller passes ``num_global_tokens``.
  Which tokens are kept depends on the current log-probs, so the usual recipe is: pass the mini-batch's
  response-token count, sum ``num_kept_tokens`` over micro-batches and ranks, and scale the gradient by
  ``num_global_tokens / total_kept`` before the optimizer step (the loss is linear in that factor).
- "token-mean-microbatch": the released code's form: this call's kept-token mean (under CP, over the
  CP group's kept tokens; ``num_global_tokens`` is ignored; the released code divides by
  ``count + 1e-8``, here by ``max(count, 1)``: both give 0 for an empty micro-batch). The caller
  multiplies it by the micro-batch's share of the mini-batch's sequences (``num_seqs / sequences per
  mini-batch``, verl's ``loss_scale_factor``) before backward.
The "seq-mean-*" modes are not offered: no FIPO/DAPO recipe uses them.

- ``token_tap``: when a dict is passed, it receives detached per-token tensors of the input's shape
  (``TOKEN_TAP_FIELDS``) for per-token records; the loss and the metrics are computed exactly as without
  it. Under "dapo" / "grpo" ``future_kl`` is what FIPO's would be (the loss does not read it) and
  ``influence_weight`` is 1. The actor passes it only when records are asked for (``actor/step.py``).

Gradient: only through ``ratio``; FutureKL and the influence weights are detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from fipo_megatron.algo.future_kl import future_kl, gamma_from_tau
from fipo_megatron.algo.influence import influence_bounds, influence_weights
from fipo_megatron.algo.loss_metrics import influence_metrics, masked_mean, masked_rate, ratio_metrics, to_floats
from fipo_megatron.registry import Registry

#: the log-ratio is clamped to this range before exp (docs/algorithm.md §1).
LOG_RATIO_CLAMP = 20.0
LOSS_AGG_MODES = ("token-mean", "token-mean-microbatch")
#: what ``token_tap`` receives: float tensors, then boolean ones (all detached, the input's shape).
TOKEN_TAP_FIELDS = ("delta_logp", "future_kl", "influence_weight", "advantage", "loss",
                    "response_mask", "future_kl_masked", "ppo_clipped", "dual_clipped", "kept")


class ContextParallelShard(Protocol):
    """What a loss needs of context parallelism: the layout of this rank's zig-zag share and the two
    collectives that complete a per-sequence quantity over the CP group (docs/algorithm.md §3.1).

    ``cp_size``: ranks in the CP group; with 1 every rank holds whole sequences and the loss ignores the
    shard."""

    cp_size: int

    @property
    def is_packed(self) -> bool:
        """True for the packed (THD) layout, False for (B, T // cp_size) rows."""
        ...

    @property
    def local_cu_seqlens(self) -> torch.Tensor | None:
        """Offsets of the sequences in this rank's packed share (None for rows)."""
        ...

    def future_kl(self, x_local: torch.Tensor, *, gamma: float) -> torch.Tensor:
        """Exact FutureKL of this rank's share of ``x`` (docs/algorithm.md §3); collective over the CP group."""
        ...

    def sum_over_group(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the CP group (the same on every CP rank); collective."""
        ...


PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
_POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register a policy loss under ``name`` (decorator). The function must keep the module's signature."""
    return _POLICY_LOSSES.register(name)


def get_policy_loss(name: str) -> PolicyLossFn:
    """The loss registered under ``name``; raises ``UnknownNameError`` (KeyError and ValueError) listing known names."""
    return _POLICY_LOSSES.get(name)


@dataclass(frozen=True, kw_only=True)
class PolicyLossConfig:
    """Policy-loss settings; defaults are the FIPO 32B recipe.

    Attributes:
        loss_mode: registered loss name: "fipo", "dapo" (FIPO with f = 1) or "grpo" (PPO clip 1 +- clip_ratio_low,
            dual clip, no FutureKL, no invalidation), or one added with ``register_policy_loss``.
        clip_ratio_low: eps_low of the PPO clip (ratio >= 1 - eps_low).
        clip_ratio_high: eps_high of the PPO clip (ratio <= 1 + eps_high); DAPO's clip-higher. Unused by "grpo".
        clip_ratio_c: dual-clip bound c (> 1): caps the loss of negative-advantage tokens at -A*c, and tokens
            with ratio > c do not feed FutureKL.
        decay_rate: tau, the FutureKL half-life in tokens (gamma = 2^(-1/tau)).
        future_kl_clip_ratio: r of the influence-weight clamp; 0 means f = min(exp(FutureKL), 10).
        future_kl_clip_high_only: clamp f to [1, 1+r] (True, 32B) or [1-r, 1+r] (False, 7B).
        safety_thresh: negative-advantage tokens with ratio above it get f clamped to [0.8, 1.0] (§4).
        loss_agg_mode: "token-mean" or "token-mean-microbatch" (see the module docstring).
    """

    loss_mode: str = "fipo"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    decay_rate: float = 32.0
    future_kl_clip_ratio: float = 0.2
    future_kl_clip_high_only: bool = True
    safety_thresh: float = 10.0
    loss_agg_mode: str = "token-mean"

    def __post_init__(self) -> None:
        if self.loss_mode not in _POLICY_LOSSES:
            raise ValueError(f"loss_mode {self.loss_mode!r} is not registered; known: {_POLICY_LOSSES.names()}")
        if not 0.0 <= self.clip_ratio_low < 1.0:
            raise ValueError(f"clip_ratio_low must be in [0, 1), got {self.clip_ratio_low}")
        if not 0.0 <= self.clip_ratio_high < math.inf:
            raise ValueError(f"clip_ratio_high must be >= 0 and finite, got {self.clip_ratio_high}")
        if not 1.0 < self.clip_ratio_c < math.inf:
            raise ValueError(f"clip_ratio_c must be > 1 (dual-clip bound), got {self.clip_ratio_c}")
        if not 0.0 < self.decay_rate < math.inf:
            raise ValueError(f"decay_rate (tau) must be > 0 and finite, got {self.decay_rate}")
        if not 0.0 <= self.future_kl_clip_ratio <= 1.0:
            raise ValueError(f"future_kl_clip_ratio must be in [0, 1], got {self.future_kl_clip_ratio}")
        if not isinstance(self.future_kl_clip_high_only, bool):
            raise ValueError(f"future_kl_clip_high_only must be a bool, got {self.future_kl_clip_high_only!r}")
        if not 0.0 < self.safety_thresh:
            raise ValueError(f"safety_thresh must be > 0, got {self.safety_thresh}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")

    @property
    def gamma(self) -> float:
        """FutureKL decay per token."""
        return gamma_from_tau(self.decay_rate)


def _sequence_layout(shape: torch.Size, cu_seqlens: torch.Tensor | None, device: torch.device):
    """(number of sequences, sequence id per token or None for the (B, T) layout)."""
    if cu_seqlens is None:
        return shape[0], None
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    ids = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens, output_size=shape[0])
    return lens.numel(), ids


def _check_inputs(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, cp):
    shapes = {t.shape for t in (log_prob, old_log_prob, advantages, response_mask)}
    if len(shapes) != 1:
        raise ValueError(f"log_prob, old_log_prob, advantages, response_mask must share one shape, got {shapes}")
    if log_prob.dim() == 1:
        if cu_seqlens is None:
            raise ValueError("packed (1-D) inputs need cu_seqlens")
        if cu_seqlens[[0, -1]].tolist() != [0, log_prob.numel()]:  # one host sync
            raise ValueError(f"cu_seqlens must run from 0 to {log_prob.numel()} (the packed length)")
        if cp is not None and cp.cp_size > 1:
            if not cp.is_packed:
                raise ValueError("packed inputs need a CPShard with cu_seqlens")
            if not torch.equal(cu_seqlens.long().cpu(), cp.local_cu_seqlens.long().cpu()):
                raise ValueError("cu_seqlens must be this CP rank's local offsets, cp.cu_seqlens // cp_size")
    elif log_prob.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is only for packed (1-D) inputs")
        if cp is not None and cp.cp_size > 1 and cp.is_packed:
            raise ValueError("(B, T) inputs need a CPShard with padded_seq_len")
    else:
        raise ValueError(f"inputs must be (B, T) or 1-D packed, got shape {tuple(log_prob.shape)}")


def clipped_policy_loss(*, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, config: PolicyLossConfig, cu_seqlens: torch.Tensor | None = None,
                        num_global_tokens: int | float | torch.Tensor | None = None,
                        cp: ContextParallelShard | None = None,
                        use_future_kl: bool, invalidate_seqs: bool, clip_ratio_high: float,
                        token_tap: dict | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The shared body of the built-in losses: dual-clip PPO on ``A * f`` (docs/algorithm.md §1-5).

    ``use_future_kl``: f from FutureKL (FIPO, §2-4) or f = 1; ``invalidate_seqs``: drop responses with more
    than one dual-clipped negative-advantage token (§5); ``clip_ratio_high``: the upper PPO clip. The other
    arguments are those of the module's loss signature.

    Returns ``(loss, metrics)``: a 0-dim tensor whose gradient flows only through ``log_prob`` (aggregated
    as ``config.loss_agg_mode`` says), and python floats (see the module docstring). Raises ValueError for
    inputs of mismatched shapes or offsets.
    """
    if cu_seqlens is None and cp is not None and cp.is_packed and log_prob.dim() == 1:
        cu_seqlens = cp.local_cu_seqlens
    _check_inputs(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, cp)
    if cp is not None and cp.cp_size == 1:
        cp = None  # one CP rank holds whole sequences: the plain scan and counts are already complete
    c = config.clip_ratio_c
    if log_prob.dtype in (torch.float16, torch.bfloat16):
        # bf16 resolves log-probs near -5 only to steps of 2^-5: coarser than the log-ratios FutureKL sums.
        log_prob = log_prob.float()
    old_log_prob = old_log_prob.detach().to(log_prob.dtype)
    advantages = advantages.detach().to(log_prob.dtype)
    mask = response_mask.detach() != 0

    log_ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    ratio_d = ratio.detach()
    metrics: dict[str, torch.Tensor | float] = {}
    if use_future_kl:
        with torch.no_grad():
            x = torch.where(mask & (ratio_d <= c), log_ratio.detach(), 0)  # docs/algorithm.md §2: x = d * mask * M
            fkl = cp.future_kl(x, gamma=config.gamma) if cp is not None else future_kl(x, config.gamma, cu_seqlens)
            weights, raw = influence_weights(future_kl=fkl, ratio=ratio_d, advantages=advantages,
                                             clip_ratio=config.future_kl_clip_ratio,
                                             clip_high_only=config.future_kl_clip_high_only,
                                             safety_thresh=config.safety_thresh)
            lower, upper = influence_bounds(clip_ratio=config.future_kl_clip_ratio,
                                            clip_high_only=config.future_kl_clip_high_only)
            metrics.update(influence_metrics(weights=weights, raw=raw, mask=mask, lower=lower, upper=upper))
        adv_w = advantages * weights
    else:
        adv_w = advantages

    # docs/algorithm.md §5: PPO clip with clip-higher, then the dual clip for negative advantages.
    loss1 = -adv_w * ratio
    loss2 = -adv_w * ratio.clamp(1.0 - config.clip_ratio_low, 1.0 + clip_ratio_high)
    loss_max = torch.maximum(loss1, loss2)
    loss3 = -adv_w * c  # no gradient: adv_w is detached
    loss_tok = torch.where(adv_w < 0, torch.minimum(loss_max, loss3), loss_max)

    with torch.no_grad():
        num_seqs, seq_ids = _sequence_layout(log_prob.shape, cu_seqlens, log_prob.device)
        dual_clipped = (advantages < 0) & mask & (loss_max.detach() > loss3)  # §5, sequence invalidation
        if invalidate_seqs:
            if seq_ids is None:
                counts = dual_clipped.sum(dim=1)
            else:
                counts = torch.zeros(num_seqs, dtype=torch.long, device=log_prob.device).index_add_(
                    0, seq_ids, dual_clipped.long())
            if cp is not None:
                counts = cp.sum_over_group(counts)
            dropped = counts > 1
            keep = mask & ~(dropped[:, None] if seq_ids is None else dropped[seq_ids])
        else:
            dropped = torch.zeros(num_seqs, dtype=torch.bool, device=log_prob.device)
            keep = mask
        num_kept = keep.sum()
        num_kept_group = cp.sum_over_group(num_kept) if cp is not None else num_kept

    loss_sum = torch.where(keep, loss_tok, 0).sum()
    if config.loss_agg_mode == "token-mean" and num_global_tokens is not None:
        denom = torch.as_tensor(num_global_tokens, dtype=loss_sum.dtype, device=loss_sum.device)
        if bool(denom < 0):
            raise ValueError(f"num_global_tokens must be >= 0, got {num_global_tokens}")
    else:
        denom = num_kept_group.to(loss_sum.dtype)
    loss = loss_sum / denom.clamp(min=1)

    with torch.no_grad():
        metrics.update({
            "pg_loss": loss_sum.detach() / num_kept.clamp(min=1),
            "pg_clipfrac": masked_rate(loss2 > loss1, mask),
            "pg_clipfrac_lower": masked_rate(dual_clipped, mask),
            "ppo_kl": masked_mean(-log_ratio.detach(), mask),
        })
        metrics.update(ratio_metrics(ratio=ratio_d, advantages=advantages, mask=mask, clip_ratio_c=c))
        metrics.update({"num_tokens": mask.sum(), "num_kept_tokens": num_kept, "num_seqs": float(num_seqs),
                        "num_dropped_seqs": dropped.sum()})
        if token_tap is not None:
            if not use_future_kl:  # for the records only: what FIPO would weight these tokens by
                x = torch.where(mask & (ratio_d <= c), log_ratio.detach(), 0)
                fkl = cp.future_kl(x, gamma=config.gamma) if cp is not None else future_kl(x, config.gamma, cu_seqlens)
                weights = torch.ones_like(ratio_d)
            token_tap.update(delta_logp=log_ratio.detach(), future_kl=fkl.to(ratio_d.dtype), influence_weight=weights,
                             advantage=advantages, loss=loss_tok.detach(), response_mask=mask,
                             future_kl_masked=mask & (ratio_d > c), ppo_clipped=mask & (loss2.detach() > loss1.detach()),
                             dual_clipped=dual_clipped, kept=keep)
    return loss, to_floats(metrics)


@register_policy_loss("fipo")
def fipo_policy_loss(*, log_prob, old_log_prob, advantages, response_mask, config, cu_seqlens=None,
                     num_global_tokens=None, cp=None, token_tap=None):
    """FIPO (docs/algorithm.md §1-5): dual-clip PPO on ``A * f``, f from the clamped exp(FutureKL), with invalidation."""
    return clipped_policy_loss(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages,
                               response_mask=response_mask, config=config, cu_seqlens=cu_seqlens,
                               num_global_tokens=num_global_tokens, cp=cp, token_tap=token_tap, use_future_kl=True,
                               invalidate_seqs=True, clip_ratio_high=config.clip_ratio_high)


@register_policy_loss("dapo")
def dapo_policy_loss(*, log_prob, old_log_prob, advantages, response_mask, config, cu_seqlens=None,
                     num_global_tokens=None, cp=None, token_tap=None):
    """DAPO: FIPO with f = 1 (clip-higher, dual clip, the same sequence invalidation), no FutureKL.

    Keeping the invalidation makes "fipo" and "dapo" differ only by FutureKL: equal on the first
    mini-batch of a step (docs/algorithm.md §1).
    """
    return clipped_policy_loss(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages,
                               response_mask=response_mask, config=config, cu_seqlens=cu_seqlens,
                               num_global_tokens=num_global_tokens, cp=cp, token_tap=token_tap, use_future_kl=False,
                               invalidate_seqs=True, clip_ratio_high=config.clip_ratio_high)


@register_policy_loss("grpo")
def grpo_policy_loss(*, log_prob, old_log_prob, advantages, response_mask, config, cu_seqlens=None,
                     num_global_tokens=None, cp=None, token_tap=None):
    """GRPO as verl runs it ("vanilla" PPO loss): symmetric clip ``1 +- clip_ratio_low`` plus the dual clip
    at ``clip_ratio_c`` for negative advantages; no FutureKL, no sequence invalidation, no KL term.
    """
    return clipped_policy_loss(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages,
                               response_mask=response_mask, config=config, cu_seqlens=cu_seqlens,
                               num_global_tokens=num_global_tokens, cp=cp, token_tap=token_tap, use_future_kl=False,
                               invalidate_seqs=False, clip_ratio_high=config.clip_ratio_low)
