"""The reward registry (docs/algorithm.md §6).

A reward fn is ``fn(*, response_text: str, ground_truth: str, **extra) -> dict`` with keys ``score``
(the reward, DAPO: +1 / -1), ``acc`` (bool: the answer is right) and optionally ``pred`` (the
extracted answer); ``extra`` (e.g. ``data_source``) may be ignored. It sees the decoded response
only: the overlong penalty, which needs token counts, is added by ``overlong.overlong_penalty``.
The dict form is what verl's ``compute_score`` functions return, so theirs register unchanged.
"""

from __future__ import annotations

from typing import Callable

from fipo_megatron.algo.registry import Registry

RewardFn = Callable[..., dict]
_REWARDS: Registry[RewardFn] = Registry("reward")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under ``name`` (decorator)."""
    return _REWARDS.register(name)


def get_reward(name: str) -> RewardFn:
    """The reward registered under ``name``; ``UnknownNameError`` (KeyError, ValueError) lists known names."""
    return _REWARDS.get(name)


