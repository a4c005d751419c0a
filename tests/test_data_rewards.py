"""Reward wiring: per-call timeout and error handling, overlong shaping per response, group filter and
GRPO advantages of the batch (checked against a float64 re-computation from docs/algorithm.md §6), batch broadcast
packing."""

from __future__ import annotations

import os
import time

import pytest

from fipo_megatron.batch import TrainBatch
from fipo_megatron.data.dataset import PromptRecord
from fipo_megatron.data.scoring import ScoreRunner, math_verify_score
from fipo_megatron.data.synthetic import synthetic_tokenizer
from fipo_megatron.rollout.base import RolloutOutput
from fipo_megatron.rollout.experience import build_train_batch, keep_group, score_groups


def _verifier(*, response_text, ground_truth, **_):
    if response_text == "hang":
        time.sleep(30)  # a verifier stuck far longer than the timeout
    if response_text == "boom":
        raise RuntimeError("verifier bug")
    if response_text == "float":
        return 0.5
    return {"score": 1.0 if response_text == ground_truth else -1.0, "acc": response_text == ground_truth}


@pytest.mark.parametrize("num_workers", [0, 3])
def test_timeout_and_errors_score_wrong(num_workers):
    """Threads (0) or a process pool (3): hung calls time out, errors are counted, both score wrong."""
    runner = ScoreRunner(score_fn=_verifier, timeout_s=0.5, wrong_score=-1.0, max_workers=4, num_workers=num_workers)
    items = [{"response_text": t, "ground_truth": "7"} for t in ["7", "hang", "3", "boom", "float", "hang", "7"]]
    t0 = time.monotonic()
    results, counts = runner.score(items)
    elapsed = time.monotonic() - t0
    if num_workers:  # the hung workers were killed and replaced; the next batch reuses the set
        assert len(runner._workers) == 3 and all(w.proc.is_alive() for w in runner._workers)
        again, again_counts = runner.score(items[:1] + items[2:3])
        assert [r["score"] for r in again] == [1.0, -1.0] and again_counts == {"num_timeouts": 0, "num_errors": 0}
        runner.close()
    assert counts == {"num_timeouts": 2, "num_errors": 1}
    assert [r["score"] for r in results] == [1.0, -1.0, -1.0, -1.0, 0.5, -1.0, 1.0]
    assert [r["acc"] for r in results] == [True, False, False, False, True, False, True]
    assert all(r["pred"] is None for r in results)
    assert elapsed < 5.0  # the hung calls were abandoned after their timeout, not waited for
    with pytest.raises(ValueError, match="timeout_s"):
        ScoreRunner(score_fn=_verifier, timeout_s=0)


def _spinner(*, response_text, pid_dir, **_):
    if response_text == "nan":
        return float("nan")
    if response_text == "ok":
        return 1.0
    with open(os.path.join(pid_dir, str(os.getpid())), "w"):
        pass
    while True:  # a verifier that spins the CPU and never returns
        pass


def test_spinning_verifiers_are_killed_within_the_batch_deadline(tmp_path):
    """16 spinning calls on 2 workers with a 2 s per-call timeout would take 16 s in rounds; the batch
    deadline (3 s) bounds the whole batch, every spinning process is gone afterwards, and a NaN score
    counts as an error instead of reaching the advantages."""
    runner = ScoreRunner(score_fn=_spinner, timeout_s=2.0, wrong_score=-1.0, num_workers=2, batch_timeout_s=3.0)
    items = [{"response_text": t, "pid_dir": str(tmp_path)} for t in ["ok", "nan"] + ["spin"] * 16]
    t0 = time.monotonic()
    results, counts = runner.score(items)
    elapsed = time.monotonic() - t0
    assert elapsed < 8.0
    assert [r["score"] for r in results] == [1.0] + [-1.0] * 17
    assert counts == {"num_timeouts": 16, "num_errors": 1}
    pids = [int(p) for p in os.listdir(tmp_path)]
    assert pids  # some spinners started ...
    for pid in pids:  # ... and none of them is still running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    runner.close()


def _trainer_with_scorer(queue):
    runner = ScoreRunner(score_fn=_verifier, timeout_s=5.0, num_workers=3)
    runner.score([{"response_text": "7", "ground_truth": "7"}] * 6)
    queue.put([w.proc.pid for w in runner._workers])
    time.sleep(60)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie waiting for its (new) parent
    except FileNotFoundError:
        return True


def test_scoring_processes_exit_when_the_trainer_is_killed():
    """A kill -9 of the trainer must not leave its scoring processes behind (each holds the trainer's
    sockets and memory)."""
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    trainer = ctx.Process(target=_trainer_with_scorer, args=(queue,))
    trainer.start()
    pids = queue.get(timeout=60)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.join()
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids)


def test_math_verify_optional():
    try:
        import math_verify  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="fipo_megatron\\[math-verify\\]"):
            math_verify_score(response_text="x = 2", ground_truth="2")
        return
    assert math_verify_score(response_text="so the answer is $\\frac{1}{2}$", ground_truth="0.5")["acc"]
    assert not math_verify_score(response_text="the answer is $3$", ground_truth="2")["acc"]


def _outputs(groups_tokens):
    outs = []
    for p, group in enumerate(groups_tokens):
        for toks in group:
            outs.append(RolloutOutput(token_ids=toks, log_probs=[-0.5] * len(toks), prompt_index=p,
                                      finish_reason="stop" if toks[-1] == 2 else "length"))
    return outs


def _scored():
    """Three prompts of the synthetic task, 4 responses each (mixed, all wrong, all right), scored with
    overlong shaping: (records, response tokens, groups, counts)."""
    tok = synthetic_tokenizer(num_digits=5)
    d = {str(i): tok.encode(str(i), add_special_tokens=False)[0] for i in range(5)}
    records = [PromptRecord(index=i, prompt_ids=[1, d[a], d[a]], ground_truth=a, data_source="s")
               for i, a in enumerate(["3", "1", "4"])]
    groups_tokens = [
        [[d["3"], 2], [d["0"], d["1"], d["2"], d["4"]], [d["3"], d["3"], d["3"], d["3"]], [2]],   # mixed
        [[d["0"], 2], [d["2"], 2], [d["3"], 2], [d["4"], d["4"], 2]],                               # all wrong
        [[d["4"], 2], [d["4"], d["0"], d["0"], d["0"]], [d["4"], 2], [d["4"], d["1"], 2]],          # all right
    ]
    from fipo_megatron.algo.rewards import overlong_penalty
    from fipo_megatron.data.synthetic import synthetic_score

    runner = ScoreRunner(score_fn=synthetic_score, timeout_s=5, wrong_score=0.0)
    pen = lambda n: overlong_penalty(response_length=n, max_response_length=4, buffer_length=2, penalty_factor=0.5)  # noqa: E731
    groups, counts = score_groups(records, _outputs(groups_tokens), n=4, tokenizer=tok, runner=runner, overlong_penalty=pen)
    return records, groups_tokens, groups, counts


def test_scores_and_overlong_shaping():
    _, _, groups, counts = _scored()
    assert counts["num_timeouts"] == 0 and counts["num_errors"] == 0
    assert groups[0].scores == [1.0, 0.0, 1.0, 0.0] and groups[0].accs == [True, False, True, False]
    # overlong: length 4 of L_max 4, buffer 2 -> -(4 - 2) / 2 * 0.5 = -0.5; length 3 -> -0.25; <= 2 -> 0
    assert groups[0].rewards == [1.0, -0.5, 0.5, 0.0]
    assert groups[1].rewards == [0.0, 0.0, 0.0, -0.25]


def test_filter_keeps_groups_whose_metric_disagrees():
    groups = _scored()[2]
    assert [keep_group(g, "acc") for g in groups] == [True, False, False]
    assert [keep_group(g, "seq_reward") for g in groups] == [True, True, True]  # shaping makes them differ
    with pytest.raises(ValueError, match="filter metric"):
        keep_group(groups[0], "loss")


def test_batch_carries_grpo_advantages():
    records, groups_tokens, groups, _ = _scored()
    batch = build_train_batch([groups[0], groups[1]], n=4, temperature=0.7)
    assert len(batch.samples) == 8 and batch.num_responses_per_prompt == 4 and batch.temperature == 0.7
    for gid, g in enumerate(groups[:2]):
        r = g.rewards
        mean = sum(r) / 4
        std = (sum((x - mean) ** 2 for x in r) / 3) ** 0.5   # unbiased, docs/algorithm.md §6
        for i in range(4):
            s = batch.samples[gid * 4 + i]
            assert s.group_id == gid and s.reward == r[i]
            assert s.advantage == pytest.approx((r[i] - mean) / (std + 1e-6), abs=1e-12)
            assert s.response_ids == groups_tokens[gid][i] and s.prompt_ids == records[gid].prompt_ids
    no_std = build_train_batch([groups[0]], n=4, temperature=1.0, norm_adv_by_std=False)
    assert [s.advantage for s in no_std.samples] == pytest.approx([x - 0.25 for x in groups[0].rewards])


def test_wire_form_keeps_everything_but_the_engine_log_probs():
    groups = _scored()[2]
    batch = build_train_batch([groups[0], groups[1]], n=4, temperature=0.7)
    back = TrainBatch.from_wire(batch.to_wire())  # what the other ranks receive
    assert [(s.prompt_ids, s.response_ids, s.advantage, s.group_id, s.reward, s.finish_reason) for s in back.samples] == \
        [(s.prompt_ids, s.response_ids, s.advantage, s.group_id, s.reward, s.finish_reason) for s in batch.samples]
    assert back.num_responses_per_prompt == 4 and back.temperature == 0.7
    assert all(s.rollout_log_probs is None for s in back.samples)
    assert all(s.rollout_log_probs is not None for s in batch.samples)  # rank 0's own copy keeps them


def test_every_reward_is_registered_with_its_failure_score():
    import fipo_megatron.data  # noqa: F401  (registers the package's own rewards)
    from fipo_megatron.algo.rewards import get_reward, registered_rewards, reward_failure_score
    from fipo_megatron.data.synthetic import synthetic_score

    assert {"dapo_math", "math_verify", "synthetic"} <= set(registered_rewards())
    assert get_reward("synthetic") is synthetic_score and get_reward("math_verify") is math_verify_score
    # a failed call scores as "wrong": 0 on the 0 / 1 synthetic task, -1 under DAPO's +1 / -1 rule
    assert reward_failure_score("synthetic") == 0.0
    assert reward_failure_score("math_verify") == -1.0 == reward_failure_score("dapo_math")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        reward_failure_score("nope")
