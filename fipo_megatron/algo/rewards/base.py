"""The reward registry (docs/algorithm.md §6).

A reward fn is ``fn(*, response_text: str, ground_truth: str, **extra) -> dict`` with keys ``score``
(the reward, DAPO: +1 / -1), ``acc`` (bool: the answer is right) and optionally ``pred`` (the
extracted answer); ``extra`` (e.g. ``data_source``) may be ignored. It sees the decoded response
only: the overlong penalty, which needs token counts, is added by ``overlong.overlong_penalty``.
The dict form is what verl's ``compute_score`` functions return, so theirs register unchanged.
"""

from __future__ import annotations

from typing import Callable

from fipo_megatron.registry import Registry

RewardFn = Callable[..., dict]
_REWARDS: Registry[RewardFn] = Registry("reward")


def register_reward(name: str, *, failure_score: float = -1.0) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under ``name`` (decorator). ``failure_score``: the score of a call that
    raises or times out (DAPO's rule: -1, "wrong"; a 0 / 1 task: 0)."""
    return _REWARDS.register(name, metadata=float(failure_score))


def get_reward(name: str) -> RewardFn:
    """The reward registered under ``name``; ``UnknownNameError`` (KeyError, ValueError) lists known names."""
    return _REWARDS.get(name)


def reward_failure_score(name: str) -> float:
    """The score a failed or timed-out call of reward ``name`` gets (see ``register_reward``)."""
    return _REWARDS.metadata(name)


def registered_rewards() -> list[str]:
    """Names of all registered rewards (the package's own are registered when ``fipo_megatron.data`` is
    imported: ``synthetic`` and ``math_verify`` live there)."""
    return _REWARDS.names()


