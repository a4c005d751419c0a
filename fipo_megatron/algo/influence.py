"""FIPO influence weights from FutureKL (docs/algorithm.md §4). Detached: no gradient flows through them."""

from __future__ import annotations

import torch

#: ``future_kl_clip_ratio = 0`` caps exp(FutureKL) at this value instead of clipping to a band.
UNCLIPPED_INFLUENCE_CAP = 10.0
#: band that the safety rule forces weights into for negative-advantage tokens with a large ratio.
SAFETY_BAND = (0.8, 1.0)


def influence_bounds(*, clip_ratio: float, clip_high_only: bool) -> tuple[float, float]:
    """The (lower, upper) clamp of exp(FutureKL); also the thresholds of the IW clip-ratio metrics.

    ``clip_ratio > 0``: [1, 1 + r] if ``clip_high_only`` (32B recipe) else [1 - r, 1 + r] (7B recipe);
    ``clip_ratio == 0``: [0, 10] (only the cap applies; 0 is where the released code counts "lower" clips).
    """
    if clip_ratio == 0.0:
        return 0.0, UNCLIPPED_INFLUENCE_CAP
    return (1.0 if clip_high_only else 1.0 - clip_ratio), 1.0 + clip_ratio


@torch.no_grad()
def influence_weights(*, future_kl: torch.Tensor, ratio: torch.Tensor, advantages: torch.Tensor,
                      clip_ratio: float, clip_high_only: bool, safety_thresh: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, raw)``: ``raw = exp(FutureKL)``, ``f`` its clamp with the safety rule applied after it.

    Safety rule: where ``A < 0`` and ``ratio > safety_thresh``, ``f = clamp(f, 0.8, 1.0)`` (with the
    [1, 1.2] band this resets f to exactly 1, so an over-sampled bad token is not pushed down harder).
    """
    raw = torch.exp(future_kl.detach())
    lower, upper = influence_bounds(clip_ratio=clip_ratio, clip_high_only=clip_high_only)
    f = raw.clamp(max=upper) if clip_ratio == 0.0 else raw.clamp(min=lower, max=upper)
    unsafe = (advantages < 0) & (ratio.detach() > safety_thresh)
    f = torch.where(unsafe, f.clamp(min=SAFETY_BAND[0], max=SAFETY_BAND[1]), f)
    return f, raw
