"""Diagnostics of the policy loss (docs/algorithm.md §7 names, without ``actor/``), computed with one host sync.

Definitions follow the released FIPO loss (``future_kl`` mode): every rate is a mean over the
response tokens (``response_mask``, before sequence invalidation); quantiles use linear interpolation
(``torch.quantile``'s default) over the response tokens with ``A < 0`` ("neg") or ``A > 0`` ("pos");
an empty set gives 0. ``neg_ratio_4_10`` counts ``4 <= ratio < clip_ratio_c`` (c = 10 in the recipes),
as the released code does. Values are local to this call: the caller averages them across
micro-batches and ranks (weighting rates by ``num_tokens`` makes those exact; quantiles stay local).
"""

from __future__ import annotations

import torch

_NEG_QUANTILES = {"neg_is_p75": 0.75, "neg_is_p995": 0.995, "neg_is_p999": 0.999}
_POS_QUANTILES = {"pos_is_p25": 0.25, "pos_is_median": 0.5, "pos_is_p75": 0.75, "pos_is_p995": 0.995,
                  "pos_is_p999": 0.999}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (bool) is set; 0 when nothing is.

    Accumulated in float64: the sum runs over up to millions of tokens whose terms may cancel (the
    log-ratios behind ``ppo_kl`` have both signs), where a float32 total would keep few significant digits.
    """
    return torch.where(mask, values, 0).sum(dtype=torch.float64) / mask.sum().clamp(min=1)


def masked_rate(condition: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the ``mask`` tokens where the boolean ``condition`` holds (integer counts: exact, cheap)."""
    return (condition & mask).sum().double() / mask.sum().clamp(min=1)


def sorted_quantiles(sorted_values: torch.Tensor, qs: list[float]) -> torch.Tensor:
    """Quantiles of a sorted 1-D tensor, linear interpolation (= ``torch.quantile``); zeros if empty.

    One sort serves every quantile, and there is no ``torch.quantile`` input-size limit (16M elements).
    """
    n = sorted_values.numel()
    if n == 0:
        return sorted_values.new_zeros(len(qs))
    pos = torch.tensor(qs, dtype=torch.float64, device=sorted_values.device) * (n - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    v = sorted_values.double()
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _masked_min_max(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the ``mask`` entries (0, 0 if none), without a boolean gather (no host sync)."""
    zero = values.new_zeros(())
    if values.numel() == 0:
        return zero, zero
    any_set = mask.any()
    low = torch.where(mask, values, torch.inf).min()
    high = torch.where(mask, values, -torch.inf).max()
    return torch.where(any_set, low, zero), torch.where(any_set, high, zero)


@torch.no_grad()
def ratio_metrics(*, ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip_ratio_c: float) -> dict[str, torch.Tensor]:
    """Importance-ratio tail diagnostics over response tokens, split by the sign of the advantage."""
    neg = (advantages < 0) & mask
    pos = (advantages > 0) & mask
    out = {
        "neg_ratio_2_3": masked_rate((ratio >= 2.0) & (ratio < 3.0) & neg, mask),
        "neg_ratio_3_4": masked_rate((ratio >= 3.0) & (ratio < 4.0) & neg, mask),
        "neg_ratio_4_10": masked_rate((ratio >= 4.0) & (ratio < clip_ratio_c) & neg, mask),
        "pos_mini_frac": masked_rate((ratio < 1e-3) & pos, mask),
    }
    neg_sorted = ratio[neg].sort().values
    pos_sorted = ratio[pos].sort().values
    out["neg_is_max"] = neg_sorted[-1] if neg_sorted.numel() else ratio.new_zeros(())
    out.update(zip(_NEG_QUANTILES, sorted_quantiles(neg_sorted, list(_NEG_QUANTILES.values()))))
    out["pos_is_min"], out["pos_is_max"] = ((pos_sorted[0], pos_sorted[-1]) if pos_sorted.numel()
                                            else (ratio.new_zeros(()), ratio.new_zeros(())))
    out.update(zip(_POS_QUANTILES, sorted_quantiles(pos_sorted, list(_POS_QUANTILES.values()))))
    return out


@torch.no_grad()
def influence_metrics(*, weights: torch.Tensor, raw: torch.Tensor, mask: torch.Tensor,
                      lower: float, upper: float) -> dict[str, torch.Tensor]:
    """Influence-weight statistics over response tokens; clip rates count weights at a bound.

    "At a bound" is within 1e-7 of it, exactly as the released code counts (``compute_policy_loss_future_kl``;
    docs/algorithm.md §7), so the rates compare with its runs. The slack is not needed for the clamped
    weights themselves (torch compares an fp32 tensor with a Python float in fp32, where the clamp's value
    equals the bound); its one effect is to also count a weight one fp32 ulp inside the band (1.19999993
    against the bound 1.2), which the clamp did not touch."""
    upper_rate = masked_rate(weights >= upper - 1e-7, mask)
    lower_rate = masked_rate(weights <= lower + 1e-7, mask)
    w_min, w_max = _masked_min_max(weights, mask)
    r_min, r_max = _masked_min_max(raw, mask)
    return {
        "influence_weights_mean": masked_mean(weights, mask),
        "influence_weights_min": w_min, "influence_weights_max": w_max,
        "influence_weights_mean_raw": masked_mean(raw, mask),
        "raw_influence_weights_min": r_min, "raw_influence_weights_max": r_max,
        "IW_upper_clip_ratio": upper_rate, "IW_lower_clip_ratio": lower_rate,
        "IW_overall_clip_ratio": upper_rate + lower_rate,
    }


def to_floats(metrics: dict[str, torch.Tensor | float | int]) -> dict[str, float]:
    """Tensor scalars -> python floats with a single device-to-host copy."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        values = torch.stack([metrics[k].detach().reshape(()).double() for k in keys]).cpu().tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in metrics}
