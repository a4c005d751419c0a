"""Train/rollout mismatch: how far the engine's log-probs are from the actor's recomputed old log-probs.

The actor recomputes ``old_logp`` itself (docs/algorithm.md §1), so a mismatch never changes the loss; it is a health
metric. A large value after a weight sync points at a sync bug (wrong tensor, stale KV cache, wrong
temperature convention) or at precision differences (BF16/FP8 engine vs FP32 logits in the actor).
"""

from __future__ import annotations

from typing import Sequence

import torch


def rollout_mismatch_metrics(*, actor_log_probs: Sequence[torch.Tensor | Sequence[float]],
                             rollout_log_probs: Sequence[torch.Tensor | Sequence[float] | None],
                             prefix: str = "rollout/") -> dict[str, float]:
    """Mean and max of |actor old log-prob - engine log-prob| over all response tokens of one step.

    Both arguments hold one entry per response (response tokens only, same order). Responses whose
    engine log-probs are ``None`` (an engine that did not return them) are skipped. Returns
    ``{prefix+"logprob_abs_diff_mean", prefix+"logprob_abs_diff_max", prefix+"num_logprob_tokens"}``
    (mean and max are 0.0 when no token is compared), plus the mean of the signed difference
    (actor - engine), which separates a bias (e.g. a temperature mismatch) from noise.
    """
    if len(actor_log_probs) != len(rollout_log_probs):
        raise ValueError(f"actor_log_probs has {len(actor_log_probs)} responses, rollout_log_probs "
                         f"{len(rollout_log_probs)}")
    diffs = []
    for i, (actor, engine) in enumerate(zip(actor_log_probs, rollout_log_probs)):
        if engine is None:
            continue
        actor_T = torch.as_tensor(actor, dtype=torch.float64).flatten().cpu()
        engine_T = torch.as_tensor(engine, dtype=torch.float64).flatten().cpu()
        if actor_T.numel() != engine_T.numel():
            raise ValueError(f"response {i}: {actor_T.numel()} actor log-probs but {engine_T.numel()} engine log-probs")
        diffs.append(actor_T - engine_T)
    signed = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    num_tokens = signed.numel()
    absdiff = signed.abs()
    return {
        f"{prefix}logprob_abs_diff_mean": absdiff.mean().item() if num_tokens else 0.0,
        f"{prefix}logprob_abs_diff_max": absdiff.max().item() if num_tokens else 0.0,
        f"{prefix}logprob_diff_mean": signed.mean().item() if num_tokens else 0.0,
        f"{prefix}num_logprob_tokens": float(num_tokens),
    }
