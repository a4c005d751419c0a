"""Rewards: DAPO's math rule, overlong shaping, and the registry (``register_reward`` / ``get_reward``)."""

from fipo_megatron.algo.rewards import dapo_math  # noqa: F401  (registers "dapo_math")
from fipo_megatron.algo.rewards.base import get_reward, register_reward, registered_rewards, reward_failure_score
from fipo_megatron.algo.rewards.overlong import overlong_penalty

__all__ = ["get_reward", "overlong_penalty", "register_reward", "registered_rewards", "reward_failure_score"]
