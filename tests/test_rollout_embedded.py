"""The embedded engine against transformers itself: greedy == HF generate, top-k=1 == greedy, returned
log-probs == a full-forward recomputation, EOS/stop ids end a response, seeds reproduce, weight updates."""

from __future__ import annotations

import pytest
import torch

from fipo_megatron.rollout.base import RolloutEngine, SamplingParams, get_engine
from fipo_megatron.rollout.embedded import EmbeddedEngine
from fipo_megatron.testing.tiny_models import tiny_hf_model

PROMPTS = [[5, 17, 33, 2, 90], [7], [100, 101, 102, 103, 104, 105, 106, 11], [42, 42]]


def _sharp_model(family="qwen2", seed=0):
    # Random tiny models have flat logits; scaling the output layer makes the argmax well separated, so
    # padded-vs-unpadded float rounding cannot flip a greedy choice.
    model = tiny_hf_model(family, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def _full_forward_logp(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_greedy_matches_hf_generate_and_top_k_1():
    model = _sharp_model("qwen2")
    engine = EmbeddedEngine(model=model, eos_token_ids=[], max_batch_size=3)  # 4 prompts -> 2 batches
    assert isinstance(engine, RolloutEngine)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12))
    topk1 = engine.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=12, seed=3))
    for i, prompt in enumerate(PROMPTS):
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=12, min_new_tokens=12, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
        assert outs[i].token_ids == ref, f"prompt {i}"
        assert outs[i].prompt_index == i and outs[i].finish_reason == "length"
        assert topk1[i].token_ids == ref
        torch.testing.assert_close(torch.tensor(outs[i].log_probs, dtype=torch.float64),
                                   _full_forward_logp(model, prompt, ref, 0.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sampled_log_probs_match_full_forward(family):
    model = tiny_hf_model(family, seed=1)
    engine = EmbeddedEngine(model=model, eos_token_ids=[])
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=10, n=2, seed=11)
    outs = engine.generate(PROMPTS, sampling)
    assert [o.prompt_index for o in outs] == [0, 0, 1, 1, 2, 2, 3, 3]
    max_err = 0.0
    for out in outs:
        ref = _full_forward_logp(model, PROMPTS[out.prompt_index], out.token_ids, 0.7)
        max_err = max(max_err, (torch.tensor(out.log_probs, dtype=torch.float64) - ref).abs().max().item())
    assert max_err < 1e-5, max_err
    # Same seed, same samples; another seed gives other samples.
    again = engine.generate(PROMPTS, sampling)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    other = engine.generate(PROMPTS, SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=10, n=2, seed=12))
    assert [o.token_ids for o in other] != [o.token_ids for o in outs]


def test_eos_and_stop_ids_end_responses():
    model = _sharp_model("qwen2")
    free = EmbeddedEngine(model=model, eos_token_ids=[])
    greedy = free.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8))
    eos = greedy[0].token_ids[3]
    engine = EmbeddedEngine(model=model, eos_token_ids=[eos])
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8))
    for full, out in zip(greedy, outs):
        if eos in full.token_ids:
            cut = full.token_ids.index(eos) + 1
            assert out.token_ids == full.token_ids[:cut] and out.finish_reason == "stop"
            assert out.log_probs == pytest.approx(full.log_probs[:cut], abs=1e-6)
        else:
            assert out.token_ids == full.token_ids and out.finish_reason == "length"
    assert len(outs[0].token_ids) <= 4
    stop = greedy[1].token_ids[1]
    outs = free.generate(PROMPTS[1:2], SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=[stop]))
    assert outs[0].token_ids[-1] == stop and outs[0].finish_reason == "stop"
    assert outs[0].token_ids == greedy[1].token_ids[:greedy[1].token_ids.index(stop) + 1]


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # tied and untied embeddings
def test_update_weights_loads_another_model(family):
    source = _sharp_model(family, seed=5)
    engine = get_engine("embedded", hf_config=source.config)
    sd = source.state_dict()
    names = list(sd)
    # Two buckets, as a bucketed sync sends them; tied lm_head arrives under either name.
    if family == "qwen2":
        names = [n for n in names if n != "lm_head.weight"]
    engine.update_weights([(n, sd[n]) for n in names[: len(names) // 2]])
    engine.update_weights([(n, sd[n]) for n in names[len(names) // 2:]])
    engine.finish_weight_update()
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    ref = EmbeddedEngine(model=source, eos_token_ids=[]).generate(PROMPTS, sampling)
    engine.eos_token_ids = ()
    got = engine.generate(PROMPTS, sampling)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]

    with pytest.raises(ValueError, match="unknown parameter name.*model.layers.9.mlp.up_proj.weight"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])
    engine.update_weights([(names[0], sd[names[0]])])
    with pytest.raises(ValueError, match="did not update"):
        engine.finish_weight_update()


def test_sampling_params_validation_and_auto_engine():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=0), dict(max_new_tokens=0), dict(n=0)):
        field = next(iter(bad))
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    if not torch.cuda.is_available():
        model = tiny_hf_model("qwen2")
        assert isinstance(get_engine("auto", model=model), EmbeddedEngine)
    with pytest.raises(ValueError, match="unknown rollout engine"):
        get_engine("nope")


def test_build_from_model_dir_and_memory_calls(tmp_path):
    model = _sharp_model("llama", seed=2)
    model.save_pretrained(tmp_path)
    from_dir = EmbeddedEngine(model_path=str(tmp_path), eos_token_ids=[])
    in_memory = EmbeddedEngine(model=model, eos_token_ids=[])
    sampling = SamplingParams(temperature=0.0, max_new_tokens=5)
    from_dir.release_memory()   # CPU: nothing to give back, the engine stays usable after resume
    from_dir.resume_memory()
    assert [o.token_ids for o in from_dir.generate(PROMPTS, sampling)] == \
        [o.token_ids for o in in_memory.generate(PROMPTS, sampling)]
    with pytest.raises(ValueError, match="exactly one"):
        EmbeddedEngine(model=model, model_path=str(tmp_path))
    from_dir.shutdown()


def test_lm_head_runs_on_last_position_only():
    """Prefill and decode apply the LM head to one position per row (the prompt's other positions' logits
    were never read); the sampled tokens stay transformers' greedy ones (first test)."""
    model = _sharp_model("qwen2")
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[:2])))
    engine = EmbeddedEngine(model=model, eos_token_ids=[])
    engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=3))
    assert seen == [(len(PROMPTS), 1)] * 3


def test_samples_of_a_prompt_share_one_prefill():
    """The n samples of a prompt (and a prompt repeated in the request) prefill once: the first forward of a
    decode batch holds each distinct prompt once, the later ones every row. The copied rows still sample
    independently, their log-probs match a full forward, and a group split across decode batches works."""
    model = tiny_hf_model("llama", seed=2)
    shapes = []
    model.model.embed_tokens.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    prompts = PROMPTS + [PROMPTS[0]]  # prompt 4 repeats prompt 0: one prefill row serves both
    engine = EmbeddedEngine(model=model, eos_token_ids=[], max_batch_size=6)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=5, n=3, seed=4)
    outs = engine.generate(prompts, sampling)
    assert [o.prompt_index for o in outs] == [i for i in range(5) for _ in range(3)]
    # 15 rows in decode batches of 6, 6, 3: rows 0-5 are prompts 0, 0, 0, 1, 1, 1 ... rows 12-14 prompt 4.
    longest = max(len(p) for p in PROMPTS)
    prefills = [s for s in shapes if s[1] > 1]
    assert prefills == [(2, 5), (2, longest), (1, 5)], shapes
    assert shapes.count((6, 1)) == 2 * 4 and shapes.count((3, 1)) == 4, shapes
    for out in outs:
        ref = _full_forward_logp(model, prompts[out.prompt_index], out.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(out.log_probs, dtype=torch.float64), ref, atol=1e-5, rtol=0)
    for i in range(5):
        group = [tuple(o.token_ids) for o in outs if o.prompt_index == i]
        assert len(set(group)) > 1, f"prompt {i}: its samples are copies of one another {group}"
    # n = 4 with room for 6: decode batches of one whole group each, so every prompt is prefilled once.
    shapes.clear()
    outs = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=2, n=4, seed=4))
    assert shapes == [shape for p in PROMPTS for shape in ((1, len(p)), (4, 1))] and len(outs) == 16, shapes


def test_cache_goes_by_the_keyword_the_model_names():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` and removes the old name in 5.40: the
    engine passes whichever keyword this model's forward declares, never the other."""
    import inspect

    model = tiny_hf_model("qwen2", seed=0)
    declared = set(inspect.signature(model.forward).parameters)
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    EmbeddedEngine(model=model, eos_token_ids=[]).generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=3))
    assert len(seen) == 3
    expected = "cache" if "cache" in declared else "past_key_values"
    for keys in seen:
        assert expected in keys and not ({"cache", "past_key_values"} - {expected}) & keys, keys
