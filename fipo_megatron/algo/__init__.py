"""The RL algorithm as pure torch (no Megatron import), tested on CPU against float64 references.

- ``future_kl``: FutureKL, the discounted future sum of the log-ratio, O(B*T) (docs/algorithm.md §3);
- ``policy_loss``: ``PolicyLossConfig`` and the registered losses "fipo", "dapo", "grpo" (docs/algorithm.md §1-5),
  with ``influence`` (weights, docs/algorithm.md §4) and ``loss_metrics`` (docs/algorithm.md §7);
- ``advantages``: GRPO advantages (docs/algorithm.md §6); ``rewards``: DAPO math rule, overlong shaping;
- ``dynamic_sampling``: DAPO's group filter and generation-batch accumulator.
The context-parallel completion of FutureKL lives in ``parallel.cp_future_kl``; the loss reaches it only
through the shard it is handed (``policy_loss.ContextParallelShard``), so ``algo`` imports nothing of
``parallel``.
"""

from fipo_megatron.algo.future_kl import future_kl, gamma_from_tau
from fipo_megatron.algo.policy_loss import PolicyLossConfig, get_policy_loss, register_policy_loss

__all__ = ["PolicyLossConfig", "future_kl", "gamma_from_tau", "get_policy_loss", "register_policy_loss"]
