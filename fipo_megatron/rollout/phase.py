"""The rollout phase of one step, on global rank 0: generate, score and filter until the step's prompts
are full, then GRPO advantages. Returns the step's ``TrainBatch`` and its metrics.

    phase = build.build_run_parts(cfg, rank=0, run_dir=d).rollout
    batch, metrics = phase.collect(step)       # None when no prompt had mixed rewards
    metrics = phase.validate(step)             # avg@k of the validation prompts

One generation batch is ``gen_batch_size`` prompts from the sampler, ``sampling.n`` responses each
(``rollout/experience.py`` scores them and adds the overlong shaping). DAPO dynamic sampling keeps the
groups whose rewards disagree and generates again until ``num_prompts`` are kept or
``max_num_gen_batches`` is spent (``algo/dynamic_sampling.GroupAccumulator`` keeps the count). Sampling
seeds derive from ``(seed, step, generation batch)``, so a resumed run draws exactly what an uninterrupted
one would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from fipo_megatron.algo.dynamic_sampling import GroupAccumulator
from fipo_megatron.batch import TrainBatch
from fipo_megatron.data.dataset import PromptDataset, PromptSampler
from fipo_megatron.data.scoring import ScoreRunner
from fipo_megatron.log import get_logger
from fipo_megatron.metrics import PhaseTimer, response_length_metrics
from fipo_megatron.rollout.base import RolloutEngine, SamplingParams
from fipo_megatron.rollout.experience import Group, build_train_batch, keep_group, score_groups

logger = get_logger(__name__)


def derive_seed(seed: int, step: int, gen_batch: int) -> int:
    """The sampling seed of generation batch ``gen_batch`` (1-based; 0 for validation) of ``step``."""
    return (seed * 1_000_003 + step * 1009 + gen_batch) % (2**31 - 1)


@dataclass(kw_only=True)
class RolloutPhase:
    """Rank 0's rollout: the engine, the prompts and the reward, with the step's shape.

    ``num_prompts``: prompts per step (``data.train_batch_size``); ``mini_batch_size``: prompts per
    optimizer step, so a short batch (budget spent, ``on_exhausted="train"``) keeps whole mini-batches.
    ``filter_metric``: the dynamic-sampling metric (``acc``/``score``/``seq_reward``), or None to keep
    every group. ``seed``: the base of every sampling seed (``derive_seed``).
    """

    engine: RolloutEngine
    train_data: PromptDataset
    sampler: PromptSampler
    tokenizer: Any
    scorer: ScoreRunner
    sampling: SamplingParams
    overlong_penalty: Callable[[int], float] | None
    num_prompts: int
    gen_batch_size: int
    mini_batch_size: int
    max_response_length: int
    filter_metric: str | None
    max_num_gen_batches: int
    on_exhausted: str
    adv_estimator: str
    norm_adv_by_std: bool
    seed: int
    val_data: PromptDataset | None = None
    val_sampling: SamplingParams | None = None

    def collect(self, step: int, *, timer: PhaseTimer | None = None) -> tuple[TrainBatch | None, dict[str, float]]:
        """Generate, score and filter until the step's prompts are full; the batch (None if no prompt had
        mixed rewards) and the step's rollout metrics."""
        timer = timer or PhaseTimer()
        n = self.sampling.n
        # no filter: every group is kept, so the loop stops once the prompts are full (no budget needed)
        acc: GroupAccumulator[Group] = GroupAccumulator(
            target_num_groups=self.num_prompts,
            max_num_gen_batches=self.max_num_gen_batches if self.filter_metric else 0)
        seen: list[Group] = []
        counts = {"num_timeouts": 0, "num_errors": 0, "overlong_penalty_sum": 0.0}
        gen_tokens, gen_time = 0, 0.0
        while acc.should_generate_more():
            records = [self.train_data[i] for i in self.sampler.next_indices(self.gen_batch_size)]
            sampling = dataclasses.replace(self.sampling, seed=derive_seed(self.seed, step, acc.num_gen_batches + 1))
            before = timer.seconds.get("rollout", 0.0)
            with timer("rollout"):
                outputs = self.engine.generate([r.prompt_ids for r in records], sampling)
            gen_time += timer.seconds["rollout"] - before
            gen_tokens += sum(len(o.token_ids) for o in outputs)
            with timer("reward"):
                groups, c = score_groups(records, outputs, n=n, tokenizer=self.tokenizer, runner=self.scorer,
                                         overlong_penalty=self.overlong_penalty)
            for k in counts:
                counts[k] += c[k]
            seen += groups
            acc.add([g for g in groups if keep_group(g, self.filter_metric)] if self.filter_metric else groups,
                    num_generated=len(groups))
        num_gen_batches = acc.num_gen_batches
        if not acc.is_full and self.on_exhausted == "train":
            logger.info("step %d: only %d of %d prompts have mixed rewards after %d generation batches",
                        step, acc.num_groups, self.num_prompts, num_gen_batches)
        kept = acc.take(on_exhausted=self.on_exhausted, whole_multiple_of=self.mini_batch_size)
        all_rewards = [r for g in seen for r in g.rewards]
        metrics = {
            "num_gen_batches": float(num_gen_batches),
            "batch/num_prompts": float(len(kept)),
            "batch/num_filtered_groups": float(len(seen) - len(kept)),
            "rollout/reward_mean": float(np.mean(all_rewards)),
            "rollout/acc": float(np.mean([a for g in seen for a in g.accs])),
            "rollout/tokens_per_s": gen_tokens / max(gen_time, 1e-9),
            "reward/num_timeouts": float(counts["num_timeouts"]),
            "reward/num_errors": float(counts["num_errors"]),
            "reward/overlong_penalty_mean": counts["overlong_penalty_sum"] / max(len(all_rewards), 1),
            "data/epoch": float(self.sampler.epoch),
            **{f"data/{k}": float(v) for k, v in self.train_data.stats.items()},
        }
        if not kept:
            logger.warning("step %d: no prompt with mixed rewards; skipping the update", step)
            return None, metrics
        batch = build_train_batch(kept, n=n, temperature=self.sampling.temperature, adv_estimator=self.adv_estimator,
                                  norm_adv_by_std=self.norm_adv_by_std)
        rewards = [s.reward for s in batch.samples]
        metrics.update({"reward/mean": float(np.mean(rewards)), "reward/max": float(np.max(rewards)),
                        "reward/min": float(np.min(rewards)),
                        "reward/score_mean": float(np.mean([s for g in kept for s in g.scores])),
                        "reward/acc": float(np.mean([a for g in kept for a in g.accs]))})
        metrics.update(response_length_metrics([len(s.response_ids) for s in batch.samples],
                                               max_response_length=self.max_response_length))
        return batch, metrics

    def validate(self, step: int) -> dict[str, float]:
        """Sample the validation prompts with the validation settings: ``val/score_mean`` and ``val/acc``
        (avg@k over ``val_sampling.n`` responses per prompt); empty without validation data."""
        if self.val_data is None or self.val_sampling is None:
            return {}
        sampling = dataclasses.replace(self.val_sampling, seed=derive_seed(self.seed, step, 0) + 7)
        records = list(self.val_data.records)
        outputs = self.engine.generate([r.prompt_ids for r in records], sampling)
        groups, _ = score_groups(records, outputs, n=sampling.n, tokenizer=self.tokenizer, runner=self.scorer,
                                 overlong_penalty=None)
        return {"val/score_mean": float(np.mean([s for g in groups for s in g.scores])),
                "val/acc": float(np.mean([a for g in groups for a in g.accs]))}
