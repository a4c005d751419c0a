#!/usr/bin/env python
"""What writing intermediate lines buys a policy on the arithmetic task: sample it, score each response by the
DAPO rule, and report the accuracy per number of lines it wrote.

    # the warm-started model that `python -m fipo_megatron.data.arith_task --out runs/arith_mod2/base ...` wrote
    python tools/arith_measure.py --base runs/arith_mod2/base --num-operands 8 --modulus 2
    python tools/arith_measure.py --base runs/arith_mod2/base --num-operands 8 --modulus 2 --temperature 0.7

Samples ``--n`` responses to each of ``--num-prompts`` fresh problems (seeded from ``--seed``, apart from the
training and validation rows) with the embedded engine on CPU, and logs
``{lines written: {"count", "acc"}}`` as JSON. Errors in the sampled lines count: this is what the policy
gains at that temperature, not what a correct line would give (``arith_task.greedy_accuracy_by_steps``).
The task itself is ``fipo_megatron/data/arith_task.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package


def sampled_accuracy_by_steps(model_dir: str, *, num_operands: int, num_prompts: int, n: int, temperature: float,
                              seed: int, modulus: int = 10) -> dict[int, dict[str, float]]:
    """Sample ``n`` responses to each of ``num_prompts`` fresh problems with the embedded engine and score
    them with the DAPO rule; ``{lines written: {"count", "acc"}}``."""
    from fipo_megatron.algo.rewards.dapo_math import dapo_math_reward
    from fipo_megatron.data.arith_task import count_steps, make_arith_rows
    from fipo_megatron.data.tokenizer import load_tokenizer
    from fipo_megatron.rollout.base import SamplingParams
    from fipo_megatron.rollout.embedded import EmbeddedEngine

    tokenizer = load_tokenizer(model_dir)
    engine = EmbeddedEngine(model_path=model_dir, eos_token_ids=[tokenizer.eos_token_id])
    rows = make_arith_rows(num_rows=num_prompts, num_operands=num_operands, seed=seed, modulus=modulus)
    prompts = [tokenizer.encode(r["prompt"][0]["content"]) for r in rows]
    # Room for a full solution: (k - 1) lines of 2k characters, the answer line and the end token.
    sampling = SamplingParams(temperature=temperature, n=n, seed=seed, max_new_tokens=2 * num_operands * num_operands + 16,
                              stop_token_ids=(tokenizer.eos_token_id,))
    stats: dict[int, list[int]] = {}
    for out in engine.generate(prompts, sampling):
        text = tokenizer.decode(out.token_ids)
        truth = rows[out.prompt_index]["reward_model"]["ground_truth"]
        hit = dapo_math_reward(response_text=text, ground_truth=truth)["acc"]
        stats.setdefault(count_steps(text), []).append(int(hit))
    return {j: {"count": len(v), "acc": sum(v) / len(v)} for j, v in sorted(stats.items())}


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python tools/arith_measure.py --base DIR [--num-operands 8 --modulus 2 ...]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True,
                        help="the directory `python -m fipo_megatron.data.arith_task --out` wrote (its model/ is sampled)")
    parser.add_argument("--num-operands", type=int, default=8, help="digits per problem (k), as prepared")
    parser.add_argument("--modulus", type=int, default=10, help="answer = sum modulo this, as prepared")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--num-prompts", type=int, default=64, help="fresh problems")
    parser.add_argument("--n", type=int, default=8, help="responses per problem")
    parser.add_argument("--seed", type=int, default=0, help="the seed the data was prepared with")
    args = parser.parse_args(argv)
    from fipo_megatron.log import get_logger

    # seed + 3: a problem stream of its own (prepare draws train rows from seed, val from seed + 1, its check from seed + 2)
    acc = sampled_accuracy_by_steps(os.path.join(args.base, "model"), num_operands=args.num_operands,
                                    num_prompts=args.num_prompts, n=args.n, temperature=args.temperature,
                                    seed=args.seed + 3, modulus=args.modulus)
    get_logger("fipo_megatron.arith_measure").info(
        "sampled at temperature %g, accuracy per number of written lines: %s", args.temperature, json.dumps(acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
