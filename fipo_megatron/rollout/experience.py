"""From engine outputs to the actor's ``TrainBatch``: score, shape, filter groups, GRPO advantages.

One prompt's ``n`` responses form a ``Group``. Per generation batch, the rollout phase (``rollout/phase.py``) does

    groups = score_groups(records, outputs, n=n, ...)        # rule reward (timed) + overlong shaping
    acc.add([g for g in groups if keep_group(g, metric)])     # DAPO dynamic sampling (algo.dynamic_sampling)
    batch = build_train_batch(acc.take(), n=n, temperature=t) # GRPO advantages (algo.advantages), once full

Reward conventions follow the DAPO recipe: ``score`` is the rule's +1 / -1 (or the task's own scale),
``acc`` its correctness, ``reward = score + overlong_penalty`` is what the advantage sees, and the
dynamic-sampling metric is one of ``acc`` / ``score`` / ``seq_reward`` (= reward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fipo_megatron.algo.advantages import get_advantage
from fipo_megatron.algo.dynamic_sampling import group_is_informative
from fipo_megatron.batch import Sample, TrainBatch
from fipo_megatron.data.dataset import PromptRecord
from fipo_megatron.data.scoring import ScoreRunner
from fipo_megatron.rollout.base import RolloutOutput


@dataclass(kw_only=True)
class Group:
    """The ``n`` responses to one prompt with their scores and shaped rewards."""

    record: PromptRecord
    outputs: list[RolloutOutput]
    scores: list[float]
    accs: list[bool]
    rewards: list[float]
    preds: list = field(default_factory=list)  # extracted answers when the rule reports them (majority vote)

    def metric(self, name: str) -> list:
        """The values dynamic sampling compares (``algorithm.filter_groups.metric``): ``acc``, ``score`` or
        ``seq_reward`` (score plus overlong shaping)."""
        if name == "acc":
            return self.accs
        if name == "score":
            return self.scores
        if name == "seq_reward":
            return self.rewards
        raise ValueError(f"unknown filter metric {name!r}; expected acc, score or seq_reward")


def score_groups(records: list[PromptRecord], outputs: list[RolloutOutput], *, n: int, tokenizer,
                 runner: ScoreRunner, overlong_penalty: Callable[[int], float] | None) -> tuple[list[Group], dict]:
    """Score every response (one timed call each) and add the overlong penalty of its length."""
    if len(outputs) != len(records) * n:
        raise ValueError(f"expected {len(records)} x {n} outputs, got {len(outputs)}")
    items = []
    for out in outputs:
        rec = records[out.prompt_index]
        items.append({"response_text": tokenizer.decode(out.token_ids, skip_special_tokens=True),
                      "ground_truth": rec.ground_truth, "data_source": rec.data_source})
    results, counts = runner.score(items)
    groups = []
    for p, rec in enumerate(records):
        outs = outputs[p * n:(p + 1) * n]
        if any(o.prompt_index != p for o in outs):
            raise ValueError("engine outputs are not grouped by prompt in prompt order")
        res = results[p * n:(p + 1) * n]
        scores = [r["score"] for r in res]
        penalties = [overlong_penalty(len(o.token_ids)) if overlong_penalty else 0.0 for o in outs]
        groups.append(Group(record=rec, outputs=list(outs), scores=scores, accs=[r["acc"] for r in res],
                            rewards=[s + q for s, q in zip(scores, penalties)], preds=[r.get("pred") for r in res]))
    counts["overlong_penalty_sum"] = float(sum(g.rewards[i] - g.scores[i] for g in groups for i in range(n)))
    return groups, counts


def keep_group(group: Group, metric: str) -> bool:
    """DAPO's filter (``algo.dynamic_sampling``): keep a group only if its ``metric`` values disagree."""
    return group_is_informative([float(v) for v in group.metric(metric)])


def build_train_batch(groups: list[Group], *, n: int, temperature: float, adv_estimator: str = "grpo",
                      norm_adv_by_std: bool = True) -> TrainBatch:
    """One ``Sample`` per response, grouped by prompt, with its advantage (``algo.advantages`` registry;
    ``grpo`` without std normalisation is ``grpo_no_std``, verl's ``norm_adv_by_std_in_grpo=False``)."""
    if adv_estimator == "grpo" and not norm_adv_by_std:
        adv_estimator = "grpo_no_std"
    # float64 in, float64 out: the estimators return the rewards' dtype (float32 for python lists)
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
    group_ids = [gid for gid, g in enumerate(groups) for _ in g.rewards]
    advantages = get_advantage(adv_estimator)(rewards=rewards, group_ids=group_ids).tolist() if groups else []
    samples, k = [], 0
    for gid, g in enumerate(groups):
        for out, reward in zip(g.outputs, g.rewards):
            samples.append(Sample(prompt_ids=list(g.record.prompt_ids), response_ids=list(out.token_ids),
                                  advantage=float(advantages[k]), group_id=gid, reward=float(reward),
                                  rollout_log_probs=list(out.log_probs), finish_reason=out.finish_reason))
            k += 1
    return TrainBatch(samples=samples, num_responses_per_prompt=n, temperature=temperature)
