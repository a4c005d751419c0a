"""Engine data parallelism (rollout/multi.py): prompts split across engine replicas, weights fanned out to
each, and the factories that build replicas. The replicas here are real embedded engines (transformers on
CPU); the single engine's own output is the reference."""

from __future__ import annotations

import copy

import pytest
import torch

from fipo_megatron.rollout.base import SamplingParams, get_engine, shard_seed
from fipo_megatron.rollout.embedded import EmbeddedEngine
from fipo_megatron.rollout.multi import MultiEngine, split_evenly
from fipo_megatron.testing.tiny_models import tiny_hf_model
from fipo_megatron.weights.transport import FanOutTransport, InProcessTransport

PROMPTS = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12]]


def _engines(model, k):
    return [EmbeddedEngine(model=copy.deepcopy(model)) for _ in range(k)]


def _as_tuples(outs):
    return [(o.prompt_index, o.token_ids, o.finish_reason) for o in outs]


def test_split_evenly():
    assert split_evenly(5, 2) == [(0, 3), (3, 5)]
    assert split_evenly(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert split_evenly(2, 3) == [(0, 1), (1, 2)]
    assert split_evenly(0, 2) == []
    for items in range(12):
        for parts in range(1, 5):
            ranges = split_evenly(items, parts)
            assert [i for a, b in ranges for i in range(a, b)] == list(range(items))
            sizes = [b - a for a, b in ranges]
            assert not sizes or max(sizes) - min(sizes) <= 1


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
        first, again = multi.generate(PROMPTS, sampling), multi.generate(PROMPTS, sampling)
    finally:
        multi.shutdown()
    assert _as_tuples(first) == _as_tuples(again)
    # engine 0 samples its shard (prompts 0-2) with the request's seed, engine 1 (prompts 3, 4) with its own:
    # what a lone engine gives for those prompts with those seeds
    seed1 = shard_seed(11, "engine", 1)
    assert seed1 not in (11, 12, 13) and shard_seed(11, "engine", 0) == 11 and shard_seed(11, "node", 1) != seed1
    for (a, b), seed in (((0, 3), 11), ((3, 5), seed1)):
        lone = EmbeddedEngine(model=copy.deepcopy(model)).generate(PROMPTS[a:b], SamplingParams(
            temperature=1.0, max_new_tokens=6, n=3, seed=seed))
        assert [o.token_ids for o in first[3 * a:3 * b]] == [o.token_ids for o in lone]


class _Broken:
    def generate(self, prompts, sampling):
        raise ConnectionError("server went away")

    def shutdown(self):
        pass


def test_a_failing_engine_is_named():
    model = tiny_hf_model("qwen2", seed=0)
    multi = MultiEngine(_engines(model, 1) + [_Broken()])
    try:
        with pytest.raises(RuntimeError, match=r"rollout engine 1 of 2 failed to generate prompts 3..4.*went away"):
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
