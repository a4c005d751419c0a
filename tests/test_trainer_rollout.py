"""The rollout phase on its own (rank 0: real embedded engine, synthetic task, no Megatron, no process group):
dynamic sampling stays within its generation budget, keeps only informative groups, trains on whole
mini-batches, consumes prompts in sampler order, and is reproducible from the step's seed."""

from __future__ import annotations

import os

import numpy as np

import pytest

from fipo_megatron.build import build_run_parts
from fipo_megatron.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rollout_phase(tmp_path, overrides):
    cfg = load_config(os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml"),
                      overrides=[f"trainer.run_dir={tmp_path}", "data.max_response_length=4", "reward.overlong_buffer.len=1",
                                 *overrides])
    return build_run_parts(cfg, rank=0, run_dir=str(tmp_path)).rollout


def test_dynamic_sampling_budget_and_whole_mini_batches(tmp_path):
    overrides = ["data.train_batch_size=12", "data.gen_batch_size=6", "actor.ppo_mini_batch_size=4", "rollout.n=4",
                 "algorithm.filter_groups.max_num_gen_batches=2"]
    t = _rollout_phase(tmp_path, overrides)
    batch, m = t.collect(1)
    # at most 2 generation batches of 6 prompts: 12 groups seen, only informative ones kept, cut to 4s
    assert m["num_gen_batches"] <= 2
    assert t.sampler.index == 6 * int(m["num_gen_batches"])
    kept = int(m["batch/num_prompts"])
    assert kept % 4 == 0 and kept <= 12 and m["batch/num_filtered_groups"] == 6 * m["num_gen_batches"] - kept
    assert batch is not None and kept >= 4  # deterministic: seeded sampling of a seeded random model
    if batch is not None:
        assert len(batch.samples) == 4 * kept and batch.num_responses_per_prompt == 4
        for gid in range(kept):
            group = batch.samples[4 * gid:4 * gid + 4]
            assert {s.group_id for s in group} == {gid}
            assert len({s.reward for s in group}) > 1             # mixed outcomes only (metric acc)
            assert abs(sum(s.advantage for s in group)) < 1e-9    # GRPO advantages are centred per group
        assert np.mean([s.reward for s in batch.samples]) == m["reward/mean"]

    # the same step from the same sampler position draws the same responses (seeded per step / gen batch)
    again = _rollout_phase(tmp_path, overrides)
    batch2, m2 = again.collect(1)
    assert m2["rollout/acc"] == m["rollout/acc"] and m2["batch/num_prompts"] == m["batch/num_prompts"]
    if batch is not None:
        assert [s.response_ids for s in batch2.samples] == [s.response_ids for s in batch.samples]


def test_without_filter_one_generation_batch(tmp_path):
    t = _rollout_phase(tmp_path, ["algorithm.filter_groups.enable=false", "data.train_batch_size=8",
                                    "data.gen_batch_size=8", "actor.ppo_mini_batch_size=2", "rollout.n=2"])
    batch, m = t.collect(1)
    assert m["num_gen_batches"] == 1 and m["batch/num_prompts"] == 8 and len(batch.samples) == 16
    assert m["rollout/acc"] == m["reward/acc"]                   # nothing filtered: same population
    assert all(len(s.response_ids) <= 4 for s in batch.samples)
    assert m["response_length/max"] <= 4 and 0.0 <= m["response_length/clip_ratio"] <= 1.0


def test_exhausted_budget_raises_when_asked_as_dapo_does(tmp_path):
    # a random policy cannot fill 64 prompts from one generation batch of 8: the budget runs out
    overrides = ["data.train_batch_size=64", "data.gen_batch_size=8", "actor.ppo_mini_batch_size=4", "rollout.n=4",
                 "algorithm.filter_groups.max_num_gen_batches=1"]
    batch, m = _rollout_phase(tmp_path, overrides).collect(1)
    assert m["num_gen_batches"] == 1 and m["batch/num_prompts"] <= 8     # on_exhausted=train (default)
    t = _rollout_phase(tmp_path, overrides + ["algorithm.filter_groups.on_exhausted=raise"])
    with pytest.raises(RuntimeError, match=r"of 64 prompts have mixed rewards after 1 generation batches"):
        t.collect(1)
