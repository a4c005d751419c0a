"""GRPO advantages vs numpy, the DAPO math rule, overlong shaping and dynamic sampling bookkeeping."""

import numpy as np
import pytest
import torch

from fipo_megatron.algo.advantages import get_advantage, register_advantage
from fipo_megatron.algo.dynamic_sampling import GroupAccumulator, group_is_informative, keep_informative_groups
from fipo_megatron.registry import UnknownNameError
from fipo_megatron.algo.rewards import get_reward, overlong_penalty, register_reward
from fipo_megatron.algo.rewards.dapo_math import extract_answer, last_boxed, normalize_final_answer


def numpy_grpo(rewards, group_ids, eps=1e-6):
    rewards, group_ids = np.asarray(rewards, dtype=np.float64), np.asarray(group_ids)
    out = np.zeros_like(rewards)
    for g in np.unique(group_ids):
        sel = group_ids == g
        if sel.sum() > 1:
            out[sel] = (rewards[sel] - rewards[sel].mean()) / (rewards[sel].std(ddof=1) + eps)
    return out


def test_grpo_advantages_match_numpy():
    rng = np.random.default_rng(0)
    rewards = rng.choice([-1.0, 1.0], size=64) + rng.uniform(-0.3, 0, size=64)  # with overlong shaping
    group_ids = rng.permutation(np.repeat(np.arange(8) * 7 + 3, 8))  # non-contiguous, non-zero-based ids
    adv = get_advantage("grpo")(rewards=torch.tensor(rewards), group_ids=torch.tensor(group_ids))
    assert adv.dtype == torch.float64
    np.testing.assert_allclose(adv.numpy(), numpy_grpo(rewards, group_ids), rtol=1e-12, atol=1e-12)
    # lists in, float32 out; a group of one and an all-equal group give 0 (not NaN)
    adv = get_advantage("grpo")(rewards=[1.0, -1.0, 1.0, 0.5, 1.0, 1.0], group_ids=[0, 0, 0, 1, 2, 2])
    assert adv.dtype == torch.float32
    np.testing.assert_allclose(adv.numpy(), numpy_grpo([1.0, -1.0, 1.0, 0.5, 1.0, 1.0], [0, 0, 0, 1, 2, 2]), rtol=1e-6)
    assert adv[3] == 0 and adv[4] == 0 and torch.isfinite(adv).all()
    no_std = get_advantage("grpo_no_std")(rewards=[1.0, -1.0, 1.0], group_ids=[5, 5, 5])
    np.testing.assert_allclose(no_std.numpy(), [2 / 3, -4 / 3, 2 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="one entry per response"):
        get_advantage("grpo")(rewards=[1.0, 2.0], group_ids=[0])
    with pytest.raises(UnknownNameError, match="grpo"):
        get_advantage("gae")

    @register_advantage("test_const")
    def const(*, rewards, group_ids):
        return torch.ones(len(rewards))

    assert get_advantage("test_const") is const


@pytest.mark.parametrize("response,truth,correct", [
    ("so the total is 12.\nAnswer: 12", "12", True),
    ("Answer: 3\nwait, recheck.\nAnswer: $\\boxed{1,000}$ dollars", "1000", True),
    ("answer:  \\frac{1}{2}", "\\frac12", True),      # shorthand TeX normalised on both sides
    ("Answer: x = 5", "5", True),                      # right-hand side of the last '='
    ("Answer: 10^\\circ", "10", True),
    ("Answer: \\text{(B)}", "(B)", True),
    ("Answer: 13", "12", False),
    ("The answer is \\boxed{12}", "12", False),        # no "Answer:" line: invalid in DAPO's default mode
    ("", "12", False),
])
def test_dapo_math_rule(response, truth, correct):
    out = get_reward("dapo_math")(response_text=response, ground_truth=truth, data_source="math")
    assert out["acc"] is correct
    assert out["score"] == (1.0 if correct else -1.0)


def test_dapo_math_strict_box_and_helpers():
    fn = get_reward("dapo_math")
    assert fn(response_text="... so \\boxed{\\frac{1}{2}}", ground_truth="\\frac{1}{2}", strict_box=True)["acc"]
    assert not fn(response_text="\\boxed{12} and later text" + " " * 120, ground_truth="12", strict_box=True)["acc"]
    assert fn(response_text="Answer: 7", ground_truth="Sum is \\boxed{7}.", ground_truth_boxed=True)["acc"]
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_answer("no final line") == "[INVALID]"
    assert extract_answer("Answer: 1\n" + "x" * 400) == "[INVALID]"  # only the last 300 characters are searched
    assert normalize_final_answer(" 100,000 ") == "100000"
    assert normalize_final_answer("\\sqrt2") == "\\sqrt{2}"
    with pytest.raises(ValueError, match="already registered"):
        register_reward("dapo_math")(lambda **kw: {})


def test_overlong_penalty():
    kw = dict(max_response_length=20480, buffer_length=4096)
    assert overlong_penalty(response_length=0, **kw) == 0.0
    assert overlong_penalty(response_length=16384, **kw) == 0.0
    assert overlong_penalty(response_length=16385, **kw) == pytest.approx(-1 / 4096)
    assert overlong_penalty(response_length=18432, **kw) == pytest.approx(-0.5)
    assert overlong_penalty(response_length=20480, **kw) == pytest.approx(-1.0)
    assert overlong_penalty(response_length=20480, penalty_factor=0.5, **kw) == pytest.approx(-0.5)
    for bad, field in [(dict(buffer_length=0), "buffer_length"), (dict(buffer_length=30000), "buffer_length"),
                       (dict(penalty_factor=-1.0), "penalty_factor")]:
        with pytest.raises(ValueError, match=field):
            overlong_penalty(response_length=1, **{**kw, **bad})


def test_dynamic_sampling_filter():
    assert group_is_informative([1, 0, 1]) and not group_is_informative([1, 1, 1])
    assert group_is_informative([0.5]) and not group_is_informative([0.5], keep_singletons=False)
    assert not group_is_informative([])
    with pytest.raises(ValueError, match="NaN"):
        group_is_informative([1.0, float("nan")])
    groups = [("a", [1, 1]), ("b", [1, 0]), ("c", [0, 0]), ("d", [0, 1])]
    assert [g[0] for g in keep_informative_groups(groups, values_of=lambda g: g[1])] == ["b", "d"]


def test_dynamic_sampling_accumulator_fills_truncates_and_raises_as_dapo():
    acc = GroupAccumulator(target_num_groups=3, max_num_gen_batches=3)
    acc.add(["b", "d"], num_generated=4)
    assert acc.should_generate_more() and acc.num_groups == 2
    acc.add(["e", "f"], num_generated=4)
    assert acc.is_full and not acc.should_generate_more() and acc.num_gen_batches == 2 and acc.num_seen_groups == 8
    assert acc.take() == ["b", "d", "e"]  # truncated to the target, then reset
    assert acc.num_groups == 0 and acc.num_gen_batches == 0

    starved = GroupAccumulator(target_num_groups=2, max_num_gen_batches=2)
    starved.add([])
    starved.add(["x"])
    assert starved.budget_exhausted and not starved.should_generate_more()
    with pytest.raises(RuntimeError, match="1 of 2 prompts"):
        starved.take()
    unlimited = GroupAccumulator(target_num_groups=1, max_num_gen_batches=0)
    for _ in range(20):
        unlimited.add([])
    assert unlimited.should_generate_more()
    with pytest.raises(ValueError, match="target_num_groups"):
        GroupAccumulator(target_num_groups=0)


def test_dynamic_sampling_exhausted_budget_trains_on_whole_mini_batches():
    # DAPO raises when the budget runs out; on_exhausted="train" keeps whole mini-batches of what it has
    acc = GroupAccumulator(target_num_groups=8, max_num_gen_batches=2)
    acc.add(["a", "b", "c"], num_generated=4)
    acc.add(["d", "e"], num_generated=4)
    assert acc.budget_exhausted and not acc.is_full
    assert acc.take(on_exhausted="train", whole_multiple_of=2) == ["a", "b", "c", "d"]
    assert acc.num_groups == 0 and acc.num_gen_batches == 0 and acc.num_seen_groups == 0
    acc.add(["x"])
    assert acc.take(on_exhausted="train", whole_multiple_of=2) == []   # not one whole mini-batch: no update
    acc.add(list("abcdefghij"))
    assert acc.take(on_exhausted="train", whole_multiple_of=3) == list("abcdefgh")   # full: cut to the target
    with pytest.raises(ValueError, match="on_exhausted"):
        acc.take(on_exhausted="skip")
