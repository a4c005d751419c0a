"""MegatronActor end to end on gloo: log-probs against transformers, every parallel layout against the
single-process run (log-probs, entropy, and the weights after a 2-mini-batch FIPO update), rerun
determinism, influence weights on the first vs second mini-batch, and the non-finite loss guard.

Spawns: one of world 1 (references and single-process checks), one of world 2 (tp2, pp2, cp2, dp2),
one of world 4 (tp2 x pp2, tp2 x cp2); layouts of one world size share a spawn.
"""

from __future__ import annotations

import copy
import math

import megatron.core  # noqa: F401  (imported once here; forked ranks inherit it)
import pytest
import torch

from fipo_megatron.batch import TrainBatch
from fipo_megatron.models.sharding import canonical_name
from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.testing.tiny_models import tiny_hf_model
from conftest import actor_config as _actor_config, full_megatron_state as _full_state, train_batch as _batch

TOL = 1e-5


def _run(layout, hf_config, full, batch, actor_kw=None, loss_kw=None):
    """Build an actor for ``layout`` = (tp, pp, cp), load ``full``, log-probs, one update, gather weights."""
    from fipo_megatron.actor.actor import MegatronActor
    from fipo_megatron.algo.policy_loss import PolicyLossConfig
    from fipo_megatron.models.sharding import gather_full_state_dict
    from fipo_megatron.parallel.topology import ParallelConfig, destroy_parallel

    tp, pp, cp = layout
    actor = MegatronActor(hf_config=hf_config, parallel=ParallelConfig(tp=tp, pp=pp, cp=cp),
                          actor_config=_actor_config(**(actor_kw or {})), loss_config=PolicyLossConfig(**(loss_kw or {})))
    actor.load_full_state_dict(full)
    logp, entropy = actor.compute_log_probs(batch, return_entropy=True)
    metrics = actor.update(batch)
    after = gather_full_state_dict(actor.model_chunks, groups=actor.groups, vocab_size=hf_config.vocab_size)
    out = dict(logp=logp, entropy=entropy, metrics=metrics, per_mini=actor.last_mini_batch_metrics, after=after,
               old=actor.last_old_log_probs)
    destroy_parallel()
    return out


def _layouts_worker(rank, world_size, layouts, hf_configs, fulls, batch):
    results = [_run(layout, hf_configs[family], fulls[family], batch) for layout, family in layouts]
    return results if rank == 0 else None


def _reference_worker(rank, world_size, hf_configs, fulls, batch):
    """World 1: the single-process references, determinism, and the NaN guard."""
    out = {family: _run((1, 1, 1), hf_configs[family], fulls[family], batch) for family in hf_configs}
    out["rerun"] = _run((1, 1, 1), hf_configs["qwen2"], fulls["qwen2"], batch)
    # NaN advantage in the first mini-batch only: that step is skipped, the second one runs. Equal to a
    # run on the second mini-batch alone iff the skipped step touched neither weights nor Adam state.
    nan_batch = copy.deepcopy(batch)
    nan_batch.samples[1].advantage = float("nan")
    out["nan"] = _run((1, 1, 1), hf_configs["qwen2"], fulls["qwen2"], nan_batch)
    second_only = TrainBatch(samples=batch.samples[4:], num_responses_per_prompt=2, temperature=batch.temperature)
    out["second_only"] = _run((1, 1, 1), hf_configs["qwen2"], fulls["qwen2"], second_only)
    out["microbatch"] = _run((1, 1, 1), hf_configs["llama"], fulls["llama"], batch,
                             loss_kw=dict(loss_agg_mode="token-mean-microbatch"))
    return out


@pytest.fixture(scope="module")
def setup():
    models = {"qwen2": tiny_hf_model("qwen2", seed=0), "llama": tiny_hf_model("llama", seed=1)}
    hf_configs = {k: m.config for k, m in models.items()}
    fulls = {k: _full_state(m) for k, m in models.items()}
    return models, hf_configs, fulls, _batch()


@pytest.fixture(scope="module")
def reference(setup):
    _, hf_configs, fulls, batch = setup
    return run_distributed(_reference_worker, 1, args=(hf_configs, fulls, batch), timeout=300)[0]


def _hf_log_probs(model, batch):
    """Per-sample response log-probs and entropies from transformers' forward pass, in float64."""
    logps, ents = [], []
    for s in batch.samples:
        with torch.no_grad():
            logits = model(torch.tensor([s.prompt_ids + s.response_ids])).logits[0].double() / batch.temperature
        logprobs = logits.log_softmax(-1)[len(s.prompt_ids) - 1:-1]
        logps.append(logprobs.gather(1, torch.tensor(s.response_ids).unsqueeze(1)).squeeze(1))
        ents.append(-(logprobs.exp() * logprobs).sum(-1))
    return logps, ents


def _hf_reference_update(model, batch, actor_config, loss_config):
    """The same training step written with transformers + torch only: per-sample forward, the registered
    FIPO loss on the mini-batch's concatenated responses (its own exact token mean), global-norm clip,
    AdamW with Megatron's default parameter groups (no weight decay on biases and 1-D weights).

    "token-mean-microbatch": the released code's form instead: per micro-batch (the actor's plan) the
    kept-token mean, weighted by the micro-batch's share of the mini-batch's sequences.
    """
    from fipo_megatron.actor.packing import plan_and_pack
    from fipo_megatron.algo.policy_loss import get_policy_loss

    model = copy.deepcopy(model).train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() == 1 or n.endswith(".bias")]
    c = actor_config
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps)

    def response_log_probs(samples):
        out = []
        for s in samples:
            logits = model(torch.tensor([s.prompt_ids + s.response_ids])).logits[0] / batch.temperature
            lp = logits.float().log_softmax(-1)[len(s.prompt_ids) - 1:-1]
            out.append(lp.gather(1, torch.tensor(s.response_ids).unsqueeze(1)).squeeze(1))
        return out

    with torch.no_grad():
        old = response_log_probs(batch.samples)
    per_mini = c.ppo_mini_batch_size * batch.num_responses_per_prompt
    for start in range(0, len(batch.samples), per_mini):
        mini = list(range(start, min(start + per_mini, len(batch.samples))))
        if loss_config.loss_agg_mode == "token-mean":
            groups = [mini]
        else:
            plan = plan_and_pack([batch.samples[i] for i in mini], dp_size=1, dp_rank=0,
                                 max_tokens=c.max_tokens_per_micro_batch)
            groups = [[mini[j] for j in mb.sample_indices] for mb in plan]
        opt.zero_grad()
        for idx in groups:
            samples = [batch.samples[i] for i in idx]
            logp = torch.cat(response_log_probs(samples))
            lens = torch.tensor([len(s.response_ids) for s in samples])
            cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
            adv = torch.cat([torch.full((len(s.response_ids),), s.advantage) for s in samples])
            loss, _ = get_policy_loss(loss_config.loss_mode)(
                log_prob=logp, old_log_prob=torch.cat([old[i] for i in idx]), advantages=adv,
                response_mask=torch.ones_like(logp), config=loss_config, cu_seqlens=cu)
            (loss * len(idx) / len(mini)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip_grad)
        opt.step()
    return {canonical_name(n): t for n, t in _full_state(model).items()}


def _assert_lists_close(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        err = float((a.double() - b.double()).abs().max())
        assert err <= TOL, f"{what}: sample {i} max error {err:.2e}"


def _assert_params_close(got, want, what):
    assert set(got) == set(want), f"{what}: names differ {set(got) ^ set(want)}"
    for name in want:
        err = float((got[name].double() - want[name].double()).abs().max())
        assert err <= TOL, f"{what}: {name} max error {err:.2e}"


@pytest.mark.distributed
def test_single_process_matches_transformers_and_moves(setup, reference):
    models, _, fulls, batch = setup
    for family, model in models.items():
        logp, ent = _hf_log_probs(model, batch)
        _assert_lists_close(reference[family]["logp"], logp, f"{family} log-probs vs transformers")
        _assert_lists_close(reference[family]["entropy"], ent, f"{family} entropy vs transformers")
        before = {canonical_name(n): t for n, t in fulls[family].items()}
        moved = max(float((v - before[n][:v.shape[0]]).abs().max()) for n, v in reference[family]["after"].items())
        assert moved > 1e-4, "the update did not change the weights"
        # the old log-probs the update recomputed are those of the weights before it (docs/algorithm.md §1)
        for a, b in zip(reference[family]["old"], reference[family]["logp"]):
            assert torch.equal(a, b)
        m = reference[family]["metrics"]
        assert m["actor/num_mini_batches"] == 2 and m["actor/num_skipped_steps"] == 0
        assert math.isfinite(m["actor/grad_norm"]) and m["actor/lr"] == pytest.approx(2e-4)


@pytest.mark.distributed
def test_update_matches_plain_torch_reference(setup, reference):
    """Megatron actor (packing, chunked vocab-parallel log-prob, per-token loss reduction, DDP, Megatron
    Adam) against an update written from scratch with transformers + torch.optim.AdamW."""
    from fipo_megatron.algo.policy_loss import PolicyLossConfig

    models, _, _, batch = setup
    for family, model in models.items():
        want = _hf_reference_update(model, batch, _actor_config(), PolicyLossConfig())
        got = reference[family]["after"]
        _assert_params_close(got, {n: want[n][:t.shape[0]] for n, t in got.items()}, f"{family} vs torch reference")


@pytest.mark.distributed
def test_microbatch_mean_mode_matches_plain_torch_reference(setup, reference):
    from fipo_megatron.algo.policy_loss import PolicyLossConfig

    models, _, _, batch = setup
    want = _hf_reference_update(models["llama"], batch, _actor_config(),
                                PolicyLossConfig(loss_agg_mode="token-mean-microbatch"))
    got = reference["microbatch"]["after"]
    _assert_params_close(got, {n: want[n][:t.shape[0]] for n, t in got.items()}, "llama micro-batch mean")
    # and it is a different update from the exact token mean (the micro-batches have unequal sizes)
    exact = reference["llama"]["after"]
    assert max(float((got[n] - exact[n]).abs().max()) for n in got) > 1e-6


@pytest.mark.distributed
def test_influence_weights_one_on_first_mini_batch_only(reference):
    first, second = reference["qwen2"]["per_mini"]
    # Spec §1: the policy has not moved on the first mini-batch, so FutureKL = 0 and f = 1 exactly.
    assert first["influence_weights_min"] == 1.0 and first["influence_weights_max"] == 1.0
    assert first["influence_weights_mean"] == 1.0
    assert second["influence_weights_max"] > 1.0 + 1e-4
    # Not bit-zero: the old-log-prob pass packs the whole step, the update one mini-batch, and a token's
    # log-prob can differ by an ulp between packings (seen with the math attention path as well).
    assert abs(second["ppo_kl"]) > 1e-4 and abs(first["ppo_kl"]) < 1e-6


@pytest.mark.distributed
def test_rerun_is_bit_identical(reference):
    a, b = reference["qwen2"], reference["rerun"]
    assert [m["pg_loss"] for m in a["per_mini"]] == [m["pg_loss"] for m in b["per_mini"]]
    for name in a["after"]:
        assert torch.equal(a["after"][name], b["after"][name]), name


@pytest.mark.distributed
def test_nan_loss_skips_step_and_leaves_state(reference):
    nan, second_only = reference["nan"], reference["second_only"]
    assert [m["num_skipped_steps"] for m in nan["per_mini"]] == [1.0, 0.0]
    assert not math.isfinite(nan["per_mini"][0]["pg_loss"])
    assert nan["metrics"]["actor/num_skipped_steps"] == 1.0
    for name in second_only["after"]:
        torch.testing.assert_close(nan["after"][name], second_only["after"][name], atol=1e-7, rtol=0)


def _check_layouts(results, layouts, reference):
    for res, (layout, family) in zip(results, layouts):
        ref = reference[family]
        what = f"{family} (tp, pp, cp)={layout}"
        _assert_lists_close(res["logp"], ref["logp"], f"{what} log-probs")
        _assert_lists_close(res["entropy"], ref["entropy"], f"{what} entropy")
        _assert_params_close(res["after"], ref["after"], f"{what} weights after update")
        for got, want in zip(res["per_mini"], ref["per_mini"]):
            assert got["num_kept_tokens"] == want["num_kept_tokens"]
            assert got["pg_loss"] == pytest.approx(want["pg_loss"], abs=TOL)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


@pytest.mark.distributed
def test_world2_layouts_match_single_process(setup, reference):
    _, hf_configs, fulls, batch = setup
    # (tp, pp, cp) on 2 ranks; dp = 2 for (1, 1, 1)
    layouts = [((2, 1, 1), "qwen2"), ((1, 2, 1), "qwen2"), ((1, 1, 2), "qwen2"), ((1, 1, 1), "llama")]
    results = run_distributed(_layouts_worker, 2, args=(layouts, hf_configs, fulls, batch), timeout=400)[0]
    _check_layouts(results, layouts, reference)


@pytest.mark.distributed
def test_world4_layouts_match_single_process(setup, reference):
    _, hf_configs, fulls, batch = setup
    layouts = [((2, 2, 1), "llama"), ((2, 1, 2), "qwen2")]
    results = run_distributed(_layouts_worker, 4, args=(layouts, hf_configs, fulls, batch), timeout=400)[0]
    _check_layouts(results, layouts, reference)


def test_actor_config_validation():
    from fipo_megatron.actor.config import ActorConfig

    with pytest.raises(ValueError, match="ppo_mini_batch_size"):
        ActorConfig(ppo_mini_batch_size=0)
    with pytest.raises(ValueError, match="params_dtype"):
        ActorConfig(params_dtype="float16")
    with pytest.raises(ValueError, match="recompute"):
        ActorConfig(recompute="some")
    assert ActorConfig(recompute="full").recompute_overrides()["recompute_granularity"] == "full"


def test_reduce_metrics_weights_and_empty_sets():
    """The aggregation arithmetic on one rank (``is_last_stage=False`` and pp=1: no collective runs)."""
    from types import SimpleNamespace

    from fipo_megatron.actor.step import reduce_metrics

    groups = SimpleNamespace(is_last_stage=False, pp_size=1, cp_size=1)

    def out(n, n_neg, n_pos, **m):
        return {"metrics": m, "loss_sum": m.get("pg_loss", 0.0) * m.get("num_kept_tokens", 0.0),
                "num_local_tokens": n, "num_neg_tokens": n_neg, "num_pos_tokens": n_pos, "entropy_sum": 2.0 * n}

    res = reduce_metrics([
        out(10, 0, 10, pg_clipfrac=0.5, pos_is_min=0.7, neg_is_max=0.0, neg_is_p75=0.0, pg_loss=1.0, num_kept_tokens=10.0),
        out(30, 30, 0, pg_clipfrac=0.1, pos_is_min=0.0, neg_is_max=1.5, neg_is_p75=1.2, pg_loss=-1.0, num_kept_tokens=20.0),
    ], groups=groups, device="cpu")
    assert res["pg_clipfrac"] == pytest.approx((0.5 * 10 + 0.1 * 30) / 40)
    assert res["pos_is_min"] == pytest.approx(0.7)  # the empty positive set of mb 2 reports 0: ignored
    assert res["neg_is_max"] == pytest.approx(1.5) and res["neg_is_p75"] == pytest.approx(1.2)
    assert res["num_kept_tokens"] == 30.0
    assert res["pg_loss"] == pytest.approx((1.0 * 10 - 1.0 * 20) / 30)  # exact global token mean
    assert res["entropy"] == pytest.approx(2.0)
