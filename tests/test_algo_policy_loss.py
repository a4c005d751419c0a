"""Policy losses (docs/algorithm.md §1-5) against a per-token float64 reference written here from docs/algorithm.md."""

import math

import numpy as np
import pytest
import torch

from fipo_megatron.algo.policy_loss import PolicyLossConfig, get_policy_loss, register_policy_loss
from fipo_megatron.registry import UnknownNameError

CONFIGS = {
    "32b": PolicyLossConfig(),  # f in [1, 1.2], safety 10
    "7b": PolicyLossConfig(future_kl_clip_high_only=False, safety_thresh=3.0),  # f in [0.8, 1.2]
    "cap": PolicyLossConfig(future_kl_clip_ratio=0.0),  # f = min(exp(FKL), 10)
}


def make_sequences(seed=0):
    """Sequences as python lists: (prompt_len, logp, old, adv, mask) with every edge docs/algorithm.md names."""
    rng = np.random.default_rng(seed)
    specs = [  # (prompt tokens, response tokens, advantage)
        (3, 30, 1.3), (2, 0, 0.7), (1, 1, -0.9), (4, 25, -1.1), (2, 28, -0.6), (0, 17, 0.8), (5, 22, -1.7),
        (1, 12, 0.0),
    ]
    seqs = []
    for i, (num_prompt, num_resp, adv) in enumerate(specs):
        n = num_prompt + num_resp
        old = -rng.uniform(0.05, 4.0, n)
        d = rng.normal(0.0, 0.6, n) * (1.0 if i % 2 else 0.2)
        resp = slice(num_prompt, n)
        if i == 3:  # A < 0 and two ratios above c: this response must be dropped
            d[num_prompt + 4] = math.log(12.0)
            d[num_prompt + 20] = math.log(30.0)
        if i == 4:  # A < 0 and one ratio above c: dual-clipped but kept
            d[num_prompt + 7] = math.log(15.0)
            d[num_prompt + 2] = math.log(4.0)  # between the 7B safety threshold (3) and c
        if i == 0:  # A > 0 and a ratio above c; a log-ratio beyond the +-20 clamp
            d[num_prompt + 5] = math.log(11.0)
            d[num_prompt + 9] = 25.0
        if i == 5:  # drifts up: exp(FutureKL) passes the cap of 10
            d += 0.3
        if i == 6:
            d[num_prompt + 3] = -25.0
            d[num_prompt + 11] = math.log(6.0)
        logp = old + d
        mask = np.zeros(n)
        mask[resp] = 1.0
        seqs.append((logp, old, np.full(n, adv), mask))
    return seqs


def reference(seqs, cfg, mode, num_global=None):
    """Loss, d loss / d logp per sequence, dropped sequence indices, per-token weights, in python floats."""
    gamma = 2.0 ** (-1.0 / cfg.decay_rate)
    c, lo = cfg.clip_ratio_c, cfg.clip_ratio_low
    hi = cfg.clip_ratio_low if mode == "grpo" else cfg.clip_ratio_high
    rc = cfg.future_kl_clip_ratio
    per_seq, dropped = [], []
    for s, (logp, old, adv, mask) in enumerate(seqs):
        n = len(logp)
        raw_d = [logp[t] - old[t] for t in range(n)]
        d = [min(max(v, -20.0), 20.0) for v in raw_d]
        r = [math.exp(v) for v in d]
        x = [d[t] if (mask[t] and r[t] <= c) else 0.0 for t in range(n)]
        toks = []
        for t in range(n):
            if mode == "fipo":
                fkl = sum(gamma ** (k - t) * x[k] for k in range(t, n))
                raw = math.exp(fkl)
                if rc == 0.0:
                    f = min(raw, 10.0)
                elif cfg.future_kl_clip_high_only:
                    f = min(max(raw, 1.0), 1.0 + rc)
                else:
                    f = min(max(raw, 1.0 - rc), 1.0 + rc)
                f_clamped = f
                if adv[t] < 0 and r[t] > cfg.safety_thresh:
                    f = min(max(f, 0.8), 1.0)
            else:
                f = f_clamped = 1.0
            aw = adv[t] * f
            l1 = -aw * r[t]
            l2 = -aw * min(max(r[t], 1 - lo), 1 + hi)
            lm = max(l1, l2)
            l3 = -aw * c
            loss = min(lm, l3) if aw < 0 else lm
            dual = adv[t] < 0 and mask[t] and lm > l3
            if abs(raw_d[t]) > 20 or (aw < 0 and lm > l3) or l2 > l1:
                dl = 0.0  # clamped log-ratio, dual-clipped, or PPO-clipped: no gradient
            else:
                dl = -aw * r[t]
            toks.append(dict(loss=loss, dl=dl, dual=dual, f=f, f_clamped=f_clamped, r=r[t], mask=mask[t]))
        if mode != "grpo" and sum(tk["dual"] for tk in toks) > 1:
            dropped.append(s)
        per_seq.append(toks)
    kept = [(s, t) for s, toks in enumerate(per_seq) for t, tk in enumerate(toks) if tk["mask"] and s not in dropped]
    denom = num_global if num_global is not None else max(len(kept), 1)
    loss = sum(per_seq[s][t]["loss"] for s, t in kept) / denom
    grads = [[0.0] * len(toks) for toks in per_seq]
    for s, t in kept:
        grads[s][t] = per_seq[s][t]["dl"] / denom
    return loss, grads, dropped, per_seq


def packed_tensors(seqs, dtype=torch.float64):
    cat = lambda i: torch.tensor(np.concatenate([s[i] for s in seqs]), dtype=dtype)  # noqa: E731
    cu = torch.tensor([0] + [len(s[0]) for s in seqs]).cumsum(0).to(torch.int32)
    return cat(0), cat(1), cat(2), cat(3), cu


def padded_tensors(seqs, dtype=torch.float64):
    width = max(len(s[0]) for s in seqs)
    out = [torch.zeros(len(seqs), width, dtype=dtype) for _ in range(4)]
    for i, seq in enumerate(seqs):
        for k in range(4):
            out[k][i, :len(seq[k])] = torch.tensor(seq[k], dtype=dtype)
    return out


def run_loss(mode, cfg, logp, old, adv, mask, **kw):
    logp = logp.clone().requires_grad_()
    loss, metrics = get_policy_loss(mode)(log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask,
                                          config=cfg, **kw)
    loss.backward()
    return loss, logp.grad, metrics


def test_reference_data_exercises_every_branch():
    seqs = make_sequences()
    for name, cfg in CONFIGS.items():
        _, _, dropped, per_seq = reference(seqs, cfg, "fipo")
        assert dropped == [3]
        toks = [tk for toks in per_seq for tk in toks if tk["mask"]]
        lower = 0.0 if cfg.future_kl_clip_ratio == 0 else (1.0 if cfg.future_kl_clip_high_only else 0.8)
        upper = 10.0 if cfg.future_kl_clip_ratio == 0 else 1.2
        assert any(tk["f_clamped"] == upper for tk in toks), name
        assert any(lower < tk["f_clamped"] < upper for tk in toks), name
        if cfg.future_kl_clip_ratio:
            assert any(tk["f_clamped"] == lower for tk in toks), name
        assert any(tk["f"] != tk["f_clamped"] for tk in toks), f"safety rule never changes f ({name})"


@pytest.mark.parametrize("mode,cfg_name", [("fipo", "32b"), ("fipo", "7b"), ("fipo", "cap"), ("dapo", "32b"),
                                           ("grpo", "32b")])
def test_loss_and_gradient_match_reference(mode, cfg_name):
    cfg = CONFIGS[cfg_name]
    seqs = make_sequences()
    ref_loss, ref_grads, dropped, _ = reference(seqs, cfg, mode)
    logp, old, adv, mask, cu = packed_tensors(seqs)
    loss, grad, metrics = run_loss(mode, cfg, logp, old, adv, mask, cu_seqlens=cu)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([g for gs in ref_grads for g in gs], dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)
    assert metrics["num_dropped_seqs"] == len(dropped)
    assert metrics["num_seqs"] == len(seqs)
    assert metrics["num_tokens"] == mask.sum().item()
    assert metrics["num_kept_tokens"] == sum(m for i, s in enumerate(seqs) if i not in dropped for m in s[3])

    # The padded (B, T) layout gives the same loss and gradients.
    p_logp, p_old, p_adv, p_mask = padded_tensors(seqs)
    p_loss, p_grad, p_metrics = run_loss(mode, cfg, p_logp, p_old, p_adv, p_mask)
    assert p_loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    for i, gs in enumerate(ref_grads):
        torch.testing.assert_close(p_grad[i, :len(gs)], torch.tensor(gs, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert p_metrics["num_dropped_seqs"] == metrics["num_dropped_seqs"]

    # float32 inputs: same numbers to float rounding.
    l32, g32, _ = run_loss(mode, cfg, *(t.float() for t in (logp, old, adv, mask)), cu_seqlens=cu)
    assert l32.dtype == torch.float32 and torch.isfinite(g32).all()
    assert l32.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)


def test_num_global_tokens_and_microbatch_mode():
    cfg = CONFIGS["32b"]
    seqs = make_sequences()
    logp, old, adv, mask, cu = packed_tensors(seqs)
    ref_loss, ref_grads, _, _ = reference(seqs, cfg, "fipo", num_global=1000)
    loss, grad, _ = run_loss("fipo", cfg, logp, old, adv, mask, cu_seqlens=cu, num_global_tokens=1000)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([g for gs in ref_grads for g in gs], dtype=torch.float64))
    # token-mean-microbatch ignores num_global_tokens: the call's own kept-token mean.
    micro = PolicyLossConfig(loss_agg_mode="token-mean-microbatch")
    loss_micro, _, metrics = run_loss("fipo", micro, logp, old, adv, mask, cu_seqlens=cu, num_global_tokens=1000)
    assert loss_micro.item() == pytest.approx(reference(seqs, cfg, "fipo")[0], rel=1e-12)
    assert metrics["pg_loss"] == pytest.approx(loss_micro.item(), rel=1e-12)


def test_fipo_equals_dapo_on_first_minibatch():
    seqs = make_sequences(seed=7)
    logp, _, adv, mask, cu = packed_tensors(seqs)
    for cfg in CONFIGS.values():
        lf, gf, mf = run_loss("fipo", cfg, logp, logp.clone(), adv, mask, cu_seqlens=cu)
        ld, gd, md = run_loss("dapo", cfg, logp, logp.clone(), adv, mask, cu_seqlens=cu)
        assert lf.item() == ld.item()
        assert torch.equal(gf, gd)
        assert mf["influence_weights_mean"] == 1.0 and mf["influence_weights_max"] == 1.0
        # Policy unchanged: gradient is -A / N on every response token.
        torch.testing.assert_close(gf, -adv * mask / mask.sum())


def test_empty_and_single_token_responses():
    cfg = CONFIGS["32b"]
    z = torch.zeros(3, 5, dtype=torch.float64)
    loss, grad, metrics = run_loss("fipo", cfg, z - 1.0, z - 1.2, z - 1.0, z)
    assert loss.item() == 0.0 and torch.equal(grad, z) and metrics["num_tokens"] == 0
    assert all(math.isfinite(v) for v in metrics.values())
    empties = [((2, 0), {}), ((0,), {"cu_seqlens": torch.tensor([0])}), ((0,), {"cu_seqlens": torch.tensor([0, 0])})]
    for shape, kw in empties:
        e = torch.zeros(shape, dtype=torch.float64)
        loss, grad, metrics = run_loss("fipo", cfg, e, e, e, e, **kw)
        assert loss.item() == 0.0 and grad.shape == shape and metrics["num_tokens"] == 0
    one = [(np.array([-0.5]), np.array([-0.7]), np.array([-1.0]), np.array([1.0]))]
    ref_loss, ref_grads, _, _ = reference(one, cfg, "fipo")
    loss, grad, _ = run_loss("fipo", cfg, *packed_tensors(one)[:4], cu_seqlens=torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12) and grad.item() == pytest.approx(ref_grads[0][0])


def test_half_precision_inputs():
    seqs = make_sequences(seed=5)
    ref_loss = reference(seqs, CONFIGS["32b"], "fipo")[0]
    logp, old, adv, mask, cu = packed_tensors(seqs)
    loss, grad, _ = run_loss("fipo", CONFIGS["32b"], logp.bfloat16(), old.bfloat16(), adv, mask, cu_seqlens=cu)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
    # bf16 log-probs carry ~3 significant digits; the reference on the rounded inputs is exact.
    rounded = [tuple(np.asarray(torch.tensor(a).bfloat16().double()) if k < 2 else a for k, a in enumerate(s))
               for s in seqs]
    assert loss.item() == pytest.approx(reference(rounded, CONFIGS["32b"], "fipo")[0], rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx(ref_loss, abs=0.05)


def test_metrics_match_numpy():
    cfg = CONFIGS["7b"]
    seqs = make_sequences(seed=3)
    logp, old, adv, mask, cu = packed_tensors(seqs)
    _, _, metrics = run_loss("fipo", cfg, logp, old, adv, mask, cu_seqlens=cu)
    _, _, _, per_seq = reference(seqs, cfg, "fipo")
    toks = [tk for toks in per_seq for tk in toks if tk["mask"]]
    adv_tok = [s[2][t] for s in seqs for t in range(len(s[0])) if s[3][t]]
    d = [min(max(s[0][t] - s[1][t], -20), 20) for s in seqs for t in range(len(s[0])) if s[3][t]]
    r = np.array([tk["r"] for tk in toks])
    f = np.array([tk["f"] for tk in toks])
    a = np.array(adv_tok)
    assert metrics["ppo_kl"] == pytest.approx(-np.mean(d), rel=1e-10)
    assert metrics["influence_weights_mean"] == pytest.approx(f.mean(), rel=1e-10)
    assert metrics["influence_weights_min"] == pytest.approx(f.min())
    assert metrics["influence_weights_max"] == pytest.approx(f.max())
    assert metrics["IW_upper_clip_ratio"] == pytest.approx(np.mean(f >= 1.2 - 1e-7))
    assert metrics["IW_lower_clip_ratio"] == pytest.approx(np.mean(f <= 0.8 + 1e-7))
    neg, pos = r[a < 0], r[a > 0]
    for name, q in [("neg_is_p75", .75), ("neg_is_p995", .995), ("neg_is_p999", .999)]:
        assert metrics[name] == pytest.approx(np.quantile(neg, q), rel=1e-10)
    for name, q in [("pos_is_p25", .25), ("pos_is_median", .5), ("pos_is_p75", .75), ("pos_is_p999", .999)]:
        assert metrics[name] == pytest.approx(np.quantile(pos, q), rel=1e-10)
    assert metrics["neg_is_max"] == pytest.approx(neg.max()) and metrics["pos_is_min"] == pytest.approx(pos.min())
    assert metrics["neg_ratio_3_4"] == pytest.approx(np.mean((r >= 3) & (r < 4) & (a < 0)))
    assert metrics["neg_ratio_4_10"] == pytest.approx(np.mean((r >= 4) & (r < 10) & (a < 0)))
    assert metrics["pos_mini_frac"] == pytest.approx(np.mean((r < 1e-3) & (a > 0)))


def test_config_validation_names_the_field():
    for field, bad in [("loss_mode", "ppo2"), ("clip_ratio_low", -0.1), ("clip_ratio_high", -1.0),
                       ("clip_ratio_c", 1.0), ("decay_rate", 0.0), ("decay_rate", -3.0),
                       ("future_kl_clip_ratio", -0.2), ("safety_thresh", 0.0), ("loss_agg_mode", "seq-mean")]:
        with pytest.raises(ValueError, match=field):
            PolicyLossConfig(**{field: bad})
    with pytest.raises(TypeError):
        PolicyLossConfig("fipo")  # keyword-only


def test_registry():
    with pytest.raises(UnknownNameError, match="fipo"):  # lists the known names
        get_policy_loss("nope")
    with pytest.raises(KeyError):
        get_policy_loss("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("fipo")(lambda **kw: None)

    @register_policy_loss("test_zero")
    def zero_loss(*, log_prob, **kw):
        return (log_prob * 0).sum(), {}

    assert get_policy_loss("test_zero") is zero_loss
    assert PolicyLossConfig(loss_mode="test_zero").loss_mode == "test_zero"


def test_input_validation():
    cfg = CONFIGS["32b"]
    x = torch.zeros(6)
    fn = get_policy_loss("fipo")
    with pytest.raises(ValueError, match="cu_seqlens"):
        fn(log_prob=x, old_log_prob=x, advantages=x, response_mask=x, config=cfg)
    with pytest.raises(ValueError, match="one shape"):
        fn(log_prob=x, old_log_prob=x[:5], advantages=x, response_mask=x, config=cfg, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fn(log_prob=x, old_log_prob=x, advantages=x, response_mask=x, config=cfg, cu_seqlens=torch.tensor([0, 5]))


def test_clip_rates_count_the_released_codes_slack():
    """IW clip rates count a weight within 1e-7 of a bound, as the released code does: in fp32 the clamped
    value and the value one ulp inside the band count, two ulps inside do not."""
    from fipo_megatron.algo.loss_metrics import influence_metrics

    def inward(x, towards, steps):
        t = torch.tensor([x], dtype=torch.float32)
        for _ in range(steps):
            t = torch.nextafter(t, torch.tensor([towards], dtype=torch.float32))
        return t

    weights = torch.cat([inward(1.2, 0.0, k) for k in range(3)] + [inward(0.8, 2.0, k) for k in range(3)]
                        + [torch.ones(2)])
    out = influence_metrics(weights=weights, raw=weights, mask=torch.ones_like(weights, dtype=torch.bool), lower=0.8, upper=1.2)
    assert out["IW_upper_clip_ratio"].item() == pytest.approx(2 / 8)
    assert out["IW_lower_clip_ratio"].item() == pytest.approx(2 / 8)
