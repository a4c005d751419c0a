"""Per-token records: the policy loss's token tap, the actor's capture on the last mini-batch, the record format.

- The tap changes nothing (loss, metrics and gradient bit-identical with and without it) and its values
  equal a float64 re-computation from docs/algorithm.md written here (FutureKL by the recurrence, per sequence).
- The actor's capture: weights and metrics bit-identical with and without records; the tapped Δlog p of the
  last mini-batch equals the log-probs of a second actor trained on the earlier mini-batches only, minus the
  old log-probs; under context parallelism (2 gloo ranks) the taps equal the single-process ones.
- Records built from taps follow the documented format; a broken record is rejected by line and key.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fipo_megatron.algo.policy_loss import TOKEN_TAP_FIELDS, PolicyLossConfig, get_policy_loss
from fipo_megatron.batch import Sample, TrainBatch
from fipo_megatron.token_records import (FORMAT, PER_TOKEN_KEYS, TokenRecordWriter, build_records,
                                         read_token_records, select_record_samples, validate_record)


def _packed(seed=0):
    """Three packed sequences (prompt tokens masked out) with ratios above c and negative advantages."""
    rng = np.random.default_rng(seed)
    lens, prompts, advs = [14, 9, 21], [3, 2, 4], [1.2, -0.8, -1.5]
    old, d, adv, mask = [], [], [], []
    for n, p, a in zip(lens, prompts, advs):
        old.append(-rng.uniform(0.1, 3.0, n))
        dd = rng.normal(0.0, 0.5, n)
        d.append(dd)
        adv.append(np.full(n, a))
        m = np.zeros(n)
        m[p:] = 1
        mask.append(m)
    d[0][5] = math.log(12.0)   # ratio > c, positive advantage: masked out of FutureKL
    d[2][6] = math.log(15.0)   # A < 0, ratio > c: dual-clipped
    d[2][10] = math.log(20.0)  # a second one: the sequence is invalidated
    cat = lambda xs: torch.tensor(np.concatenate(xs), dtype=torch.float32)  # noqa: E731
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.long)
    old_t = cat(old)
    return old_t + cat(d), old_t, cat(adv), cat(mask), cu


def _future_kl_reference(x, cu, gamma):
    out = np.zeros(len(x))
    for s in range(len(cu) - 1):
        acc = 0.0
        for t in range(int(cu[s + 1]) - 1, int(cu[s]) - 1, -1):
            acc = float(x[t]) + gamma * acc
            out[t] = acc
    return out


@pytest.mark.parametrize("mode", ["fipo", "dapo", "grpo"])
def test_tap_changes_nothing_and_matches_float64(mode):
    cfg = PolicyLossConfig(loss_mode=mode)
    logp, old, adv, mask, cu = _packed()
    fn = get_policy_loss(mode)
    results = []
    for tap in (None, {}):
        lp = logp.clone().requires_grad_(True)
        kwargs = {} if tap is None else {"token_tap": tap}
        loss, metrics = fn(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask, config=cfg,
                           cu_seqlens=cu, **kwargs)
        loss.backward()
        results.append((loss.detach(), metrics, lp.grad.clone(), tap))
    (l0, m0, g0, _), (l1, m1, g1, tap) = results
    assert torch.equal(l0, l1) and m0 == m1 and torch.equal(g0, g1)
    assert set(tap) == set(TOKEN_TAP_FIELDS)
    assert all(v.shape == logp.shape and not v.requires_grad for v in tap.values())

    m = mask.numpy() != 0
    d = np.clip(logp.double().numpy() - old.double().numpy(), -20, 20)
    ratio = np.exp(d)
    c = cfg.clip_ratio_c
    np.testing.assert_allclose(tap["delta_logp"].numpy(), d, atol=1e-6)
    fkl = _future_kl_reference(np.where(m & (ratio <= c), d, 0.0), cu, cfg.gamma)
    np.testing.assert_allclose(tap["future_kl"].numpy(), fkl, atol=1e-5)
    if mode == "fipo":
        f = np.clip(np.exp(fkl), 1.0, 1.2)
        f = np.where((adv.numpy() < 0) & (ratio > cfg.safety_thresh), np.clip(f, 0.8, 1.0), f)
    else:
        f = np.ones_like(d)
    np.testing.assert_allclose(tap["influence_weight"].numpy(), f, atol=1e-6)
    aw = adv.double().numpy() * f
    hi = cfg.clip_ratio_low if mode == "grpo" else cfg.clip_ratio_high
    l1_, l2_ = -aw * ratio, -aw * np.clip(ratio, 1 - cfg.clip_ratio_low, 1 + hi)
    np.testing.assert_array_equal(tap["ppo_clipped"].numpy(), m & (l2_ > l1_ + 1e-12))
    dual = m & (adv.numpy() < 0) & (np.maximum(l1_, l2_) > -aw * c)
    np.testing.assert_array_equal(tap["dual_clipped"].numpy(), dual)
    np.testing.assert_array_equal(tap["future_kl_masked"].numpy(), m & (ratio > c))
    np.testing.assert_array_equal(tap["response_mask"].numpy(), m)
    # The third sequence has two dual-clipped tokens: dropped by fipo and dapo, kept by grpo.
    third = slice(int(cu[2]), int(cu[3]))
    assert tap["kept"][third].any().item() == (mode == "grpo")
    assert tap["kept"][: int(cu[2])].numpy().tolist() == m[: int(cu[2])].tolist()


def _batch():
    g = torch.Generator().manual_seed(1)
    lengths = [(5, 7), (3, 11), (8, 4), (4, 9), (6, 6), (2, 13), (7, 5), (3, 8)]
    samples = [Sample(prompt_ids=torch.randint(0, 256, (p,), generator=g).tolist(),
                      response_ids=torch.randint(3, 256, (r,), generator=g).tolist(),
                      advantage=float(torch.randn(1, generator=g)), group_id=i // 2, reward=float(i % 2))
               for i, (p, r) in enumerate(lengths)]
    return TrainBatch(samples=samples, num_responses_per_prompt=2, temperature=1.0)


def _actor(hf_config, full, layout=(1, 1, 1)):
    from fipo_megatron.actor.actor import MegatronActor
    from fipo_megatron.actor.config import ActorConfig
    from fipo_megatron.parallel.topology import ParallelConfig

    tp, pp, cp = layout
    actor = MegatronActor(hf_config=hf_config, parallel=ParallelConfig(tp=tp, pp=pp, cp=cp),
                          actor_config=ActorConfig(ppo_mini_batch_size=2, max_tokens_per_micro_batch=40,
                                                   logprob_chunk_size=5, lr=1e-3, lr_warmup_steps=0,
                                                   params_dtype="float32", seed=7),
                          loss_config=PolicyLossConfig(decay_rate=4.0))
    actor.load_full_state_dict(full)
    return actor


RECORD = [4, 6, 7]  # samples of the second (last) mini-batch of 4


def _single_worker(rank, world_size, hf_config, full, batch):
    from fipo_megatron.models.sharding import gather_full_state_dict
    from fipo_megatron.parallel.topology import destroy_parallel

    out = {}
    for record in ((), RECORD):
        actor = _actor(hf_config, full)
        metrics = actor.update(batch, record_samples=record)
        out[bool(record)] = dict(metrics=metrics, taps=actor.last_token_taps, old=actor.last_old_log_probs,
                                 weights=gather_full_state_dict(actor.model_chunks, groups=actor.groups,
                                                                vocab_size=hf_config.vocab_size))
        destroy_parallel()
    # The policy the last mini-batch starts from: one update on the first mini-batch alone.
    actor = _actor(hf_config, full)
    actor.update(TrainBatch(samples=batch.samples[:4], num_responses_per_prompt=2, temperature=1.0))
    out["moved_logp"] = actor.compute_log_probs(batch)
    with pytest.raises(ValueError, match="last mini-batch"):
        actor.update(batch, record_samples=[1])
    destroy_parallel()
    return out


def _cp_worker(rank, world_size, hf_config, full, batch):
    from fipo_megatron.parallel.topology import destroy_parallel

    actor = _actor(hf_config, full, layout=(1, 1, 2))
    actor.update(batch, record_samples=RECORD)
    taps = actor.last_token_taps
    destroy_parallel()
    return taps


@pytest.fixture(scope="module")
def actor_runs():
    from fipo_megatron.testing.distributed import run_distributed
    from fipo_megatron.testing.tiny_models import tiny_hf_model

    model = tiny_hf_model("qwen2", seed=0)
    from fipo_megatron.checkpoint.registry import get_mapping

    mapping = get_mapping(model.config)
    sd = model.state_dict()
    full = {n: mapping.hf_to_megatron(n, {h: sd[h] for h in mapping.hf_sources(n)}) for n in mapping.megatron_names()}
    batch = _batch()
    single = run_distributed(_single_worker, 1, args=(model.config, full, batch), timeout=300)[0]
    cp = run_distributed(_cp_worker, 2, args=(model.config, full, batch), timeout=300)
    return batch, single, cp


@pytest.mark.slow
@pytest.mark.distributed
def test_actor_capture_changes_nothing(actor_runs):
    _, single, _ = actor_runs
    off, on = single[False], single[True]
    untimed = [{k: v for k, v in m.items() if "timing" not in k} for m in (off["metrics"], on["metrics"])]
    assert off["taps"] is None and untimed[0] == untimed[1]
    assert set(off["weights"]) == set(on["weights"])
    assert all(torch.equal(off["weights"][k], on["weights"][k]) for k in off["weights"])


@pytest.mark.slow
@pytest.mark.distributed
def test_actor_taps_are_the_last_mini_batch_movement(actor_runs):
    batch, single, _ = actor_runs
    taps, old, moved = single[True]["taps"], single[True]["old"], single["moved_logp"]
    assert sorted(taps) == RECORD
    gamma = PolicyLossConfig(decay_rate=4.0).gamma
    for i in RECORD:
        t = taps[i]
        n = len(batch.samples[i].response_ids)
        assert all(t[f].shape == (n,) for f in TOKEN_TAP_FIELDS)
        want = (moved[i].double() - old[i].double()).numpy()
        assert np.abs(want).max() > 1e-4  # the first mini-batch did move the policy
        np.testing.assert_allclose(t["delta_logp"].numpy(), want, atol=2e-5)
        ref = _future_kl_reference(t["delta_logp"].double().numpy(), [0, n], gamma)
        np.testing.assert_allclose(t["future_kl"].numpy(), ref, atol=2e-5)
        assert (t["advantage"] == batch.samples[i].advantage).all() and (t["response_mask"] == 1).all()


@pytest.mark.slow
@pytest.mark.distributed
def test_actor_taps_under_context_parallel_match_single_process(actor_runs):
    _, single, cp = actor_runs
    assert cp[1] is None and sorted(cp[0]) == RECORD
    for i in RECORD:
        for f in TOKEN_TAP_FIELDS:
            np.testing.assert_allclose(cp[0][i][f].numpy(), single[True]["taps"][i][f].numpy(), atol=2e-5,
                                       err_msg=f"sample {i} {f}")


class _CharTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join("<eos>" if i == 2 else chr(ord("a") + i % 26) for i in ids)


def test_records_format_round_trip_and_errors(tmp_path):
    batch = _batch()
    picked = select_record_samples(batch, mini_batch_samples=4, num_samples=3, seed=5)
    assert picked == select_record_samples(batch, mini_batch_samples=4, num_samples=3, seed=5)
    assert len(picked) == 3 and all(4 <= i < 8 for i in picked)
    signs = {batch.samples[i].advantage > 0 for i in picked}
    assert signs == {True, False}  # both signs when the mini-batch has both
    taps = {}
    for i in picked:
        n = len(batch.samples[i].response_ids)
        taps[i] = {f: torch.linspace(-1, 1, n) if f not in ("response_mask", "kept", "future_kl_masked", "ppo_clipped",
                                                             "dual_clipped") else (torch.arange(n) % 2).float()
                   for f in TOKEN_TAP_FIELDS}
    records = build_records(step=7, batch=batch, taps=taps, tokenizer=_CharTok(), loss_mode="fipo",
                            num_mini_batches=2, mini_batch_samples=4)
    writer = TokenRecordWriter(str(tmp_path))
    writer.write(records)
    back = read_token_records(str(tmp_path))
    assert back == json.loads(json.dumps(records))
    rec = back[0]
    assert rec["format"] == FORMAT and rec["step"] == 7 and rec["mini_batch"] == 1 and rec["sample"] == picked[0]
    n = len(batch.samples[picked[0]].response_ids)
    assert len(rec["tokens"]) == n and all(len(rec[k]) == n for k in PER_TOKEN_KEYS)
    assert rec["kept"] == [i % 2 for i in range(n)] and rec["delta_logp"][0] == -1.0
    # A resumed run drops records after its checkpoint's step.
    later = [dict(r, step=9) for r in records]
    writer.write(later)
    TokenRecordWriter(str(tmp_path), resume_step=7)
    assert {r["step"] for r in read_token_records(str(tmp_path))} == {7}
    bad = dict(records[0], future_kl=records[0]["future_kl"][:-1])
    with pytest.raises(ValueError, match="future_kl"):
        validate_record(bad)
    (tmp_path / "token_records.jsonl").write_text(json.dumps(bad) + "\n" + json.dumps(records[0]) + "\n")
    with pytest.raises(ValueError, match=r"token_records.jsonl:1: future_kl"):
        read_token_records(str(tmp_path))
    with pytest.raises(ValueError, match="kept"):
        validate_record(dict(records[0], kept=[2] * n))
