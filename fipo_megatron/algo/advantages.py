"""Outcome advantages per response (docs/algorithm.md §6), behind a registry.

An advantage fn is ``fn(*, rewards, group_ids, **options) -> Tensor`` with one value per response;
``group_ids`` says which prompt each response answers (any hashable ints; groups need not be
contiguous). The actor broadcasts the value to every token of the response.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from fipo_megatron.registry import Registry

AdvantageFn = Callable[..., torch.Tensor]
_ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an advantage estimator under ``name`` (decorator)."""
    return _ADVANTAGES.register(name)


def get_advantage(name: str) -> AdvantageFn:
    """The estimator registered under ``name``; ``UnknownNameError`` (KeyError, ValueError) lists known names."""
    return _ADVANTAGES.get(name)


def _group_stats(rewards: torch.Tensor | Sequence[float], group_ids: torch.Tensor | Sequence[int]):
    """(rewards in float64, group index per response, group mean, unbiased group std, group size)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    g = torch.as_tensor(group_ids).flatten()
    if r.numel() != g.numel():
        raise ValueError(f"rewards ({r.numel()}) and group_ids ({g.numel()}) must have one entry per response")
    if g.dtype.is_floating_point:
        raise ValueError("group_ids must be integers")
    _, idx = torch.unique(g, return_inverse=True)
    num_groups = int(idx.max()) + 1 if idx.numel() else 0
    size = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, idx, r) / size
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, idx, (r - mean[idx]) ** 2)
    # Unbiased std (n - 1); a group of one has no spread: std 0 (its advantage is 0, not NaN).
    std = torch.where(size > 1, (sq / (size - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    return r, idx, mean, std, size


def _out_dtype(rewards) -> torch.dtype:
    return rewards.dtype if isinstance(rewards, torch.Tensor) and rewards.dtype.is_floating_point else torch.float32


@register_advantage("grpo")
def grpo_advantages(*, rewards, group_ids, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``A = (R - mean_group) / (std_group + eps)``, unbiased std, computed in float64.

    A group of size 1 gets ``A = 0`` (no baseline to compare with). verl instead uses mean 0, std 1
    there (A = R); the DAPO/FIPO recipes sample 16 responses per prompt, so this never differs there.
    A group whose rewards all agree gets A = 0 (dynamic sampling drops such groups anyway).
    """
    r, idx, mean, std, _ = _group_stats(rewards, group_ids)
    return ((r - mean[idx]) / (std[idx] + eps)).to(_out_dtype(rewards))


@register_advantage("grpo_no_std")
def grpo_no_std_advantages(*, rewards, group_ids) -> torch.Tensor:
    """Dr. GRPO's variant: ``A = R - mean_group`` (no division by the std)."""
    r, idx, mean, _, _ = _group_stats(rewards, group_ids)
    return (r - mean[idx]).to(_out_dtype(rewards))
