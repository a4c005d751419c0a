"""tools/evaluate.py: pass@k against brute-force enumeration of k-subsets, majority vote, and the CLI on
a tiny model with the embedded engine (its avg@k equals a direct re-scoring of the same samples)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("fipo_evaluate", os.path.join(REPO, "tools", "evaluate.py"))
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_pass_at_k_is_the_subset_probability(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert evaluate.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError):
        evaluate.pass_at_k(3, 4, 1)


def test_majority_vote_and_summary():
    assert evaluate.majority_correct(["4", "5", "4", None], [True, False, True, False])
    assert not evaluate.majority_correct(["5", "4", "5"], [False, True, False])
    assert evaluate.majority_correct(["4", "5"], [True, False])       # tie: the first seen wins
    assert not evaluate.majority_correct([None, None], [False, False])
    problems = [{"accs": [True, False, False, False], "preds": ["1", "2", "2", "3"]},
                {"accs": [True, True, True, False], "preds": ["7", "7", "7", "8"]}]
    s = evaluate.summarise(problems, k=4)
    assert s["avg@4"] == pytest.approx((0.25 + 0.75) / 2)
    assert s["pass@1"] == pytest.approx(s["avg@4"])  # pass@1 is the mean accuracy
    assert s["pass@4"] == 1.0 and s["cons@4"] == 0.5 and s["num_problems"] == 2
    assert s["pass@2"] == pytest.approx(((1 - 3 / 6) + 1.0) / 2)


def test_cli_on_tiny_model(tmp_path):
    from fipo_megatron.data.synthetic import save_synthetic_tokenizer, synthetic_tokenizer
    from fipo_megatron.testing.tiny_models import tiny_hf_model

    tok = synthetic_tokenizer(num_digits=5)
    model = tiny_hf_model("llama", seed=3, vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path / "m")
    save_synthetic_tokenizer(tok, str(tmp_path / "m"))
    rows = [{"prompt": [{"role": "user", "content": f"{d}="}], "reward_model": {"ground_truth": str(d)},
             "data_source": "a" if d < 3 else "b"} for d in range(5)]
    data = tmp_path / "bench.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "res.json"
    rc = evaluate.main(["--model", str(tmp_path / "m"), "--data", str(data), "--reward", "synthetic", "--k", "8",
                        "--max-new-tokens", "3", "--top-p", "1.0", "--out", str(out), "--seed", "5"])
    assert rc == 0
    res = json.loads(out.read_text())
    overall = res["overall"]
    assert overall["num_problems"] == 5 and set(res["by_data_source"]) == {"a", "b"}
    assert 0.0 <= overall["avg@8"] <= overall["pass@8"] <= 1.0
    assert overall["pass@1"] == pytest.approx(overall["avg@8"])
    # re-score the same samples directly (same seed, same engine): avg@8 must agree
    from fipo_megatron.data.synthetic import synthetic_score
    from fipo_megatron.rollout.base import SamplingParams
    from fipo_megatron.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine(model_path=str(tmp_path / "m"))
    outs = engine.generate([tok.encode(r["prompt"][0]["content"]) for r in rows],
                           SamplingParams(n=8, temperature=1.0, top_p=1.0, max_new_tokens=3,
                                          stop_token_ids=(tok.eos_token_id,), seed=5))
    accs = [synthetic_score(response_text=tok.decode(o.token_ids), ground_truth=rows[o.prompt_index]
                            ["reward_model"]["ground_truth"])["acc"] for o in outs]
    assert overall["avg@8"] == pytest.approx(sum(accs) / len(accs))
