"""Engine data parallelism (rollout/multi.py): prompts split across engine replicas by expected cost,
weights fanned out to each, and the factories that build replicas. The replicas here are real embedded
engines (transformers on CPU); the single engine's own output is the reference, and the split is checked
against an exhaustive search for the best one."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

from fipo_megatron.rollout.base import SamplingParams, get_engine, shard_seed
from fipo_megatron.rollout.embedded import EmbeddedEngine
from fipo_megatron.rollout.base import RolloutOutput
from fipo_megatron.rollout.multi import CostModel, MultiEngine, balanced_split, gather_slots, place_shard
from fipo_megatron.testing.tiny_models import tiny_hf_model
from fipo_megatron.weights.transport import FanOutTransport, InProcessTransport

PROMPTS = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12]]


def _engines(model, k):
    return [EmbeddedEngine(model=copy.deepcopy(model)) for _ in range(k)]


def _as_tuples(outs):
    return [(o.prompt_index, o.token_ids, o.finish_reason) for o in outs]


def _best_makespan(costs, num_parts):
    best = float("inf")
    for assignment in itertools.product(range(num_parts), repeat=len(costs)):
        totals = [0.0] * num_parts
        for c, part in zip(costs, assignment):
            totals[part] += c
        best = min(best, max(totals))
    return best


def test_balanced_split_is_a_partition_within_4_3_of_the_best():
    rng = random.Random(0)
    for trial in range(60):
        num_items, num_parts = rng.randint(0, 8), rng.randint(1, 3)
        costs = [float(rng.choice([1, 2, 5, 40, 300, 2000])) for _ in range(num_items)]
        parts = balanced_split(costs, num_parts)
        assert len(parts) == num_parts and all(p == sorted(p) for p in parts)
        assert sorted(i for p in parts for i in p) == list(range(num_items))
        if num_items:
            makespan = max(sum(costs[i] for i in p) for p in parts)
            assert makespan <= 4 / 3 * _best_makespan(costs, num_parts) + 1e-9, (costs, parts)
        assert balanced_split(costs, num_parts) == parts  # deterministic
    # one long chain of thought against many short ones: it gets an engine to itself
    assert balanced_split([100.0, 10, 10, 10, 10, 10, 10], 2) == [[0], [1, 2, 3, 4, 5, 6]]
    # equal costs: the count is balanced (sizes differ by at most one)
    assert [len(p) for p in balanced_split([1.0] * 7, 3)] == [3, 2, 2]
    with pytest.raises(ValueError, match="num_parts"):
        balanced_split([1.0], 0)


def _outs(lengths_by_prompt):
    return [RolloutOutput(token_ids=[7] * n, log_probs=[0.0] * n, finish_reason="length", prompt_index=i)
            for i, lengths in enumerate(lengths_by_prompt) for n in lengths]


def test_cost_model_uses_previous_response_lengths_then_the_mean_then_the_prompt_length():
    model = CostModel(max_prompts=2)
    prompts = [[1, 2, 3], [4], [5, 6]]
    assert model.costs(prompts) == [3.0, 1.0, 2.0]  # nothing sampled yet: prompt lengths
    model.observe(prompts[:2], _outs([[10, 30], [100, 100]]))
    # known: previous mean response length; unknown: the mean of all 4 responses so far (60)
    assert model.costs(prompts) == [3 + 20.0, 1 + 100.0, 2 + 60.0]
    model.observe([[5, 6]], _outs([[4]]))  # a third prompt: the oldest ([1, 2, 3]) leaves the history
    mean = (10 + 30 + 100 + 100 + 4) / 5
    assert model.costs(prompts) == [3 + mean, 1 + 100.0, 2 + 4.0]
    again = CostModel(max_prompts=2)
    again.load_state_dict(__import__("json").loads(__import__("json").dumps(model.state_dict())))
    assert again.costs(prompts) == model.costs(prompts)


def test_place_shard_checks_counts_and_order():
    slots = [None] * 3
    place_shard(slots, _outs([[1, 2], [3, 4]]), indices=[0, 2], n=2, source="engine 0")
    place_shard(slots, _outs([[5, 6]]), indices=[1], n=2, source="engine 1")
    assert [(o.prompt_index, len(o.token_ids)) for o in gather_slots(slots)] == [
        (0, 1), (0, 2), (1, 5), (1, 6), (2, 3), (2, 4)]
    with pytest.raises(RuntimeError, match=r"engine 1 returned 1 responses for 1 prompts x n=2"):
        place_shard([None], _outs([[5]]), indices=[0], n=2, source="engine 1")
    with pytest.raises(RuntimeError, match="out of prompt order"):
        place_shard([None] * 2, _outs([[1], [2]])[::-1], indices=[0, 1], n=1, source="engine 0")


@pytest.mark.parametrize("num_engines,prompts", [(2, PROMPTS), (3, PROMPTS), (3, PROMPTS[:2])])
def test_greedy_outputs_equal_one_engine(num_engines, prompts):
    model = tiny_hf_model("qwen2", seed=0)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=5, n=2)
    single = EmbeddedEngine(model=copy.deepcopy(model)).generate(prompts, sampling)
    multi = MultiEngine(_engines(model, num_engines))
    try:
        outs = multi.generate(prompts, sampling)
    finally:
        multi.shutdown()
    assert _as_tuples(outs) == _as_tuples(single)
    assert [o.prompt_index for o in outs] == [i for i in range(len(prompts)) for _ in range(2)]
    for a, b in zip(outs, single):
        torch.testing.assert_close(torch.tensor(a.log_probs), torch.tensor(b.log_probs), rtol=0, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_uses_a_seed_per_engine():
    model = tiny_hf_model("qwen2", seed=0)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=11)
    multi = MultiEngine(_engines(model, 2))
    try:
        first = multi.generate(PROMPTS, sampling)
        again = MultiEngine(_engines(model, 2))
        try:  # a fresh pair of engines with the same (empty) cost history draws the same responses
            assert _as_tuples(again.generate(PROMPTS, sampling)) == _as_tuples(first)
        finally:
            again.shutdown()
    finally:
        multi.shutdown()
    assert [o.prompt_index for o in first] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    # prompt lengths 3, 2, 1, 4, 2: engine 0 gets prompts 3 and 4 (4 + 2 tokens), engine 1 prompts 0-2
    # (3 + 2 + 1); engine 0 samples with the request's seed, engine 1 with its own: what a lone engine
    # gives for those prompts with those seeds
    seed1 = shard_seed(11, "engine", 1)
    assert seed1 not in (11, 12, 13) and shard_seed(11, "engine", 0) == 11 and shard_seed(11, "node", 1) != seed1
    for indices, seed in (([3, 4], 11), ([0, 1, 2], seed1)):
        lone = EmbeddedEngine(model=copy.deepcopy(model)).generate([PROMPTS[i] for i in indices], SamplingParams(
            temperature=1.0, max_new_tokens=6, n=3, seed=seed))
        assert [o.token_ids for i in indices for o in first[3 * i:3 * i + 3]] == [o.token_ids for o in lone]


def test_the_split_follows_previous_response_lengths():
    """After a request, a prompt that drew long responses counts for them: the next split of the same
    prompts puts it on an engine of its own (greedy, so the response lengths are the model's own)."""
    model = tiny_hf_model("qwen2", seed=0)
    prompts = [[1, 2, 3, 4, 5, 6]] + [[i, i + 1] for i in range(7, 12)]
    multi = MultiEngine(_engines(model, 2))
    calls: list[list[list[int]]] = [[], []]
    for k, engine in enumerate(multi.engines):
        generate = engine.generate

        def recording(shard, sampling, generate=generate, k=k):
            calls[k].append(shard)
            out = generate(shard, sampling)
            if shard and shard[0] == prompts[1]:  # pretend prompt 1 drew 40-token chains of thought
                for o in out[:1]:
                    o.token_ids, o.log_probs = o.token_ids * 40, o.log_probs * 40
            return out

        engine.generate = recording
    try:
        sampling = SamplingParams(temperature=0.0, max_new_tokens=1)
        multi.generate(prompts, sampling)
        # by prompt length: the 6-token prompt and one 2-token prompt (8 tokens) against four 2-token ones
        assert calls == [[[prompts[0], prompts[4]]], [[prompts[1], prompts[2], prompts[3], prompts[5]]]]
        multi.generate(prompts, sampling)  # prompt 1 now costs 2 + 40 tokens, the others 1 response token
        assert calls[0][1] == [prompts[1]] and calls[1][1] == [prompts[0]] + prompts[2:]
    finally:
        multi.shutdown()


class _Broken:
    def generate(self, prompts, sampling):
        raise ConnectionError("server went away")

    def shutdown(self):
        pass


def test_a_failing_engine_is_named():
    model = tiny_hf_model("qwen2", seed=0)
    multi = MultiEngine(_engines(model, 1) + [_Broken()])
    try:
        with pytest.raises(RuntimeError, match=r"rollout engine 1 of 2 failed to generate prompts 0..2.*went away"):
            multi.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=2))
    finally:
        multi.shutdown()
    with pytest.raises(ValueError, match="at least one"):
        MultiEngine([])


def test_weight_sync_fans_out_to_every_engine():
    source = tiny_hf_model("qwen2", seed=5)
    multi = MultiEngine(_engines(tiny_hf_model("qwen2", seed=0), 2))
    try:
        transport = multi.weight_transport()
        assert isinstance(transport, FanOutTransport)
        assert all(isinstance(t, InProcessTransport) for t in transport.transports)
        state = [(n, t) for n, t in source.state_dict().items() if n != "lm_head.weight"]  # tied
        for i in range(0, len(state), 3):  # several buckets
            transport.send(state[i:i + 3])
        transport.finish()  # strict: each engine checks that every parameter arrived
        for engine in multi.engines:
            got = engine.model.state_dict()
            for name, tensor in state:
                assert torch.equal(got[name], tensor), name
        sampling = SamplingParams(temperature=0.0, max_new_tokens=4)
        reference = EmbeddedEngine(model=copy.deepcopy(source)).generate(PROMPTS, sampling)
        assert _as_tuples(multi.generate(PROMPTS, sampling)) == _as_tuples(reference)
        multi.release_memory()
        multi.resume_memory()
    finally:
        multi.shutdown()


def test_get_engine_builds_replicas_or_refuses():
    model = tiny_hf_model("qwen2", seed=0)
    engine = get_engine("embedded", num_engines=2, hf_config=model.config)
    try:
        assert isinstance(engine, MultiEngine) and len(engine) == 2
    finally:
        engine.shutdown()
    single = get_engine("embedded", hf_config=model.config)
    assert isinstance(single, EmbeddedEngine)
    with pytest.raises(ValueError, match="does not support num_engines > 1"):
        get_engine("vllm", num_engines=2, model_path="/nonexistent")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_engines must be an integer >= 1"):
            get_engine("embedded", num_engines=bad, hf_config=model.config)


def test_sglang_refuses_several_engines_in_one_process():
    # One sglang.Engine per process (rollout/sglang_engine.py): replicas are refused before any starts.
    from fipo_megatron.rollout.sglang_engine import _sglang_replica

    with pytest.raises(ValueError, match="one sglang.Engine per process"):
        _sglang_replica({"model_path": "/m", "tp_size": 4, "base_gpu_id": 0}, 0)


def test_rank0_placement_keeps_the_split_history_for_a_resume():
    from fipo_megatron.rollout.node_engines import RolloutPlacement

    model = tiny_hf_model("qwen2", seed=0)
    placement = RolloutPlacement("rank0")  # no process group needed
    multi, resumed = MultiEngine(_engines(model, 2)), MultiEngine(_engines(model, 2))
    try:
        multi.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=3, n=2))
        state = placement.engine_state(multi)
        assert state["num_responses"] == 2 * len(PROMPTS)
        placement.load_engine_state(resumed, state)
        assert resumed.cost_model.costs(PROMPTS) == multi.cost_model.costs(PROMPTS) != [len(p) for p in PROMPTS]
        placement.load_engine_state(resumed, None)  # a checkpoint without it: nothing changes
        assert resumed.cost_model.costs(PROMPTS) == multi.cost_model.costs(PROMPTS)
    finally:
        multi.shutdown()
        resumed.shutdown()
