"""The data the trainer hands the actor each step: responses with their advantages.

Kept deliberately small and framework-free: the trainer builds it from the rollout on one rank and
broadcasts it; the actor picks its data-parallel share, packs it, and splits it into mini-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(kw_only=True)
class Sample:
    """One response to one prompt.

    ``prompt_ids`` and ``response_ids`` are token ids; the response ends at EOS or at the length limit
    (nothing after EOS is included). ``advantage`` is the GRPO advantage broadcast to every response
    token. ``rollout_log_probs`` are the engine's per-token log-probs of ``response_ids`` (used only for
    the train/rollout mismatch metric: the actor recomputes old log-probs itself, docs/algorithm.md §1).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    group_id: int = 0
    reward: float = 0.0
    rollout_log_probs: list[float] | None = None
    finish_reason: str = "stop"

    @property
    def num_tokens(self) -> int:
        """Prompt plus response tokens: what the actor's forward pass processes for this sample."""
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(kw_only=True)
class TrainBatch:
    """One step's training data, identical on every rank, ordered by group (prompt).

    ``num_responses_per_prompt`` is the group size n; mini-batches are ``ppo_mini_batch_size`` prompts,
    i.e. ``ppo_mini_batch_size * n`` samples (verl's convention). ``temperature`` is the sampling
    temperature the rollout used: log-probs are computed from logits / temperature, as sampled.
    """

    samples: list[Sample]
    num_responses_per_prompt: int
    temperature: float = 1.0

    def to_wire(self) -> tuple:
        """This batch as the other ranks receive it (``from_wire`` rebuilds it): token ids as int32 arrays,
        and without the engine's log-probs, which only rank 0's mismatch metric reads. That keeps every
        rank's copy of a 20k-token x 8192-response batch small and cheap to pickle."""
        rows = [(np.asarray(s.prompt_ids, np.int32), np.asarray(s.response_ids, np.int32),
                 s.advantage, s.group_id, s.reward, s.finish_reason) for s in self.samples]
        return rows, self.num_responses_per_prompt, self.temperature

    @classmethod
    def from_wire(cls, payload: tuple) -> TrainBatch:
        """The batch ``to_wire`` described (``rollout_log_probs`` is None on every sample)."""
        rows, n, temperature = payload
        samples = [Sample(prompt_ids=p.tolist(), response_ids=r.tolist(), advantage=a, group_id=g, reward=rw,
                          finish_reason=fr) for p, r, a, g, rw, fr in rows]
        return cls(samples=samples, num_responses_per_prompt=n, temperature=temperature)
