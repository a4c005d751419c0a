"""The arithmetic task: its generator, its solutions, and grading through the real DAPO math reward path.

Answers are checked against Python's own evaluation of the prompt's expression (not the module's running
digits), and grading goes through the reward registry and the dataset loader the trainer uses.
"""

from __future__ import annotations

import json
import random

import pytest

from fipo_megatron.algo.rewards import get_reward
from fipo_megatron.data.arith_task import (ANSWER_PREFIX, arith_tokenizer, count_steps, make_arith_rows, prepare,
                                           prompt_text, solution_text, step_lines, write_jsonl)
from fipo_megatron.data.dataset import load_prompt_dataset
from fipo_megatron.data.tokenizer import load_tokenizer


def _eval_sum(expr: str, modulus: int = 10) -> int:
    """``"3+5+2="`` modulo ``modulus`` by Python's arithmetic (digits only: safe to evaluate by hand)."""
    body = expr.rstrip("=").lstrip(".")
    assert set(body) <= set("0123456789+"), body
    return sum(int(x) for x in body.split("+")) % modulus


def test_rows_are_in_the_dapo_layout_with_python_checked_answers():
    rows = make_arith_rows(num_rows=50, num_operands=7, seed=3)
    assert rows == make_arith_rows(num_rows=50, num_operands=7, seed=3)
    assert rows != make_arith_rows(num_rows=50, num_operands=7, seed=4)
    for row in rows:
        assert set(row) >= {"prompt", "reward_model", "data_source", "ability", "extra_info"}
        (msg,) = row["prompt"]
        assert msg["role"] == "user" and len(msg["content"]) == 14 and msg["content"].endswith("=")
        assert row["reward_model"]["ground_truth"] == str(_eval_sum(msg["content"]))
    with pytest.raises(ValueError, match="num_operands"):
        make_arith_rows(num_rows=1, num_operands=1, seed=0)
    bits = make_arith_rows(num_rows=50, num_operands=9, seed=3, modulus=2)
    assert all(set(r["prompt"][0]["content"][:-1]) <= {"0", "1", "+"} for r in bits)
    assert all(r["reward_model"]["ground_truth"] == str(_eval_sum(r["prompt"][0]["content"], 2)) for r in bits)
    assert {r["reward_model"]["ground_truth"] for r in bits} == {"0", "1"}


@pytest.mark.parametrize("modulus", [2, 10])
def test_every_step_line_keeps_the_sum_and_the_width(modulus):
    rng = random.Random(0)
    for k in (2, 3, 8, 12):
        ops = [rng.randrange(modulus) for _ in range(k)]
        want = _eval_sum(prompt_text(ops), modulus)
        lines = step_lines(ops, modulus=modulus)
        assert len(lines) == k - 1
        for i, line in enumerate(lines, start=1):
            assert len(line) == 2 * k and line.startswith("." * 2 * i) and line.endswith("=")
            assert _eval_sum(line, modulus) == want  # rewriting the two leading numbers by their sum's last digit keeps it
        assert lines[-1] == "." * (2 * k - 2) + f"{want}="


@pytest.mark.parametrize("k,modulus", [(2, 10), (5, 10), (8, 10), (8, 2)])
def test_solutions_graded_by_the_dapo_rule(k, modulus):
    reward = get_reward("dapo_math")
    rng = random.Random(k)
    for _ in range(20):
        ops = [rng.randrange(modulus) for _ in range(k)]
        answer = _eval_sum(prompt_text(ops), modulus)
        for j in range(k):
            text = solution_text(ops, num_steps=j, modulus=modulus)
            assert count_steps(text) == j
            out = reward(response_text=text, ground_truth=str(answer))
            assert out["score"] == 1.0 and out["acc"] and out["pred"] == str(answer)
            wrong = text[:-1] + str((answer + 1) % modulus)
            assert reward(response_text=wrong, ground_truth=str(answer))["score"] == -1.0
        # No answer line, or an answer line cut short: wrong.
        assert reward(response_text="".join(step_lines(ops, modulus=modulus)), ground_truth=str(answer))["score"] == -1.0
        assert reward(response_text=ANSWER_PREFIX, ground_truth=str(answer))["score"] == -1.0
    with pytest.raises(ValueError, match="num_steps"):
        solution_text([1, 2], num_steps=2)


def test_tokenizer_round_trip_and_dataset_loader(tmp_path):
    tok = arith_tokenizer()
    ops = [9, 9, 9, 9, 1]
    text = solution_text(ops, num_steps=4)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text
    rows = make_arith_rows(num_rows=12, num_operands=5, seed=0)
    write_jsonl(rows, str(tmp_path / "train.jsonl"))
    data = load_prompt_dataset(files=[str(tmp_path / "train.jsonl")], tokenizer=tok, max_prompt_length=11)
    assert len(data) == 12 and data.stats["num_malformed"] == 0
    first = data[0]
    assert first.prompt_ids == [tok.bos_token_id] + tok.encode(rows[0]["prompt"][0]["content"], add_special_tokens=False)
    assert first.ground_truth == rows[0]["reward_model"]["ground_truth"]
    # One token too many for the limit: every row is counted as overlong, and none is truncated.
    with pytest.raises(ValueError, match="no usable prompts"):
        load_prompt_dataset(files=[str(tmp_path / "train.jsonl")], tokenizer=tok, max_prompt_length=10)


def test_prepare_writes_a_loadable_model_tokenizer_and_data(tmp_path):
    import transformers

    summary = prepare(out=str(tmp_path), num_operands=3, num_train=16, num_val=4, sft_steps=8, sft_batch_size=8,
                      sft_lr=3e-3, seed=0)
    tok = load_tokenizer(str(tmp_path / "model"))
    assert tok.chars == arith_tokenizer().chars
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    assert model.config.vocab_size == tok.vocab_size and model.config.eos_token_id == tok.eos_token_id
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and len((tmp_path / "val.jsonl").read_text().splitlines()) == 4
    assert set(summary["greedy_acc_by_written_steps"]) == {"0", "1", "2"}
    assert json.loads((tmp_path / "warm_start.json").read_text())["num_operands"] == 3
