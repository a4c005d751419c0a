#!/usr/bin/env python
"""Evaluate an HF model on a parquet/jsonl benchmark: avg@k, pass@k (unbiased) and cons@k (majority vote).

    # AIME24, 32 samples per problem, validation sampling of the FIPO recipe (top-p 0.7), on SGLang
    python tools/evaluate.py --model /ckpt/qwen2.5-32b-fipo-hf --data data/aime24.parquet \
        --engine sglang --k 32 --temperature 1.0 --top-p 0.7 --max-new-tokens 20480 --out aime24.json
    # the CPU demo's model and task (runs in seconds)
    python tools/evaluate.py --model runs/tiny_cpu/hf_init --synthetic copy_digit --k 8 --max-new-tokens 4

    # a run checkpoint of the trainer: --model is then the HF reference (config, tokenizer) it started from
    python tools/evaluate.py --model runs/tiny_cpu/hf_init --megatron-checkpoint runs/tiny_cpu/checkpoints/step_00000040 \
        --synthetic copy_digit --k 8 --max-new-tokens 4

A Megatron checkpoint is converted to a temporary HF directory first (``checkpoint.convert``). The data
layout is the training one (``prompt`` messages, ``reward_model.ground_truth``, ``data_source``); the
reward is a registered rule (``--reward dapo_math`` by default, ``math_verify``, ``synthetic``), each call
under ``--timeout``. Metrics, overall and per ``data_source``:

- ``avg@k``: mean accuracy over all k samples of every problem;
- ``pass@j`` for j = 1, 2, 4, ..., k: the unbiased estimator ``1 - C(n-c, j) / C(n, j)`` (n samples, c correct);
- ``cons@k``: accuracy of the majority answer (the most frequent extracted ``pred``; ties: first seen).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a problem with ``c`` correct among ``n`` samples (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i): the ratio C(n-c, k)/C(n, k) without big binomials
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_correct(preds: list, accs: list[bool]) -> bool:
    """cons@k of one problem: is the most frequent extracted answer a correct one? (None never wins)."""
    votes = Counter(p for p in preds if p is not None)
    if not votes:
        return False
    best = max(votes.values())
    winner = next(p for p in preds if p is not None and votes[p] == best)  # ties: the first seen
    return any(a for p, a in zip(preds, accs) if p == winner)


def summarise(problems: list[dict], *, k: int) -> dict[str, float]:
    """``problems``: [{"accs": [...k bools], "preds": [...]}] -> avg@k, pass@j, cons@k."""
    out = {f"avg@{k}": sum(sum(p["accs"]) / len(p["accs"]) for p in problems) / len(problems)}
    j = 1
    while j <= k:
        out[f"pass@{j}"] = sum(pass_at_k(len(p["accs"]), sum(p["accs"]), j) for p in problems) / len(problems)
        j *= 2
    if f"pass@{k}" not in out:
        out[f"pass@{k}"] = sum(pass_at_k(len(p["accs"]), sum(p["accs"]), k) for p in problems) / len(problems)
    out[f"cons@{k}"] = sum(majority_correct(p["preds"], p["accs"]) for p in problems) / len(problems)
    out["num_problems"] = float(len(problems))
    return out


def evaluate(*, engine, dataset, tokenizer, runner, k: int, sampling) -> dict:
    """Generate k samples per problem with ``engine``, score them, return overall and per-source metrics."""
    from fipo_megatron.rollout.experience import score_groups

    records = list(dataset.records)
    outputs = engine.generate([r.prompt_ids for r in records], sampling)
    groups, counts = score_groups(records, outputs, n=k, tokenizer=tokenizer, runner=runner, overlong_penalty=None)
    by_source: dict[str, list[dict]] = defaultdict(list)
    problems = []
    for g in groups:
        p = {"accs": g.accs, "preds": g.preds}
        problems.append(p)
        by_source[g.record.data_source].append(p)
    result = {"overall": summarise(problems, k=k), "num_timeouts": counts["num_timeouts"],
              "num_errors": counts["num_errors"],
              "mean_response_length": sum(len(o.token_ids) for o in outputs) / max(len(outputs), 1)}
    if len(by_source) > 1:
        result["by_data_source"] = {src: summarise(ps, k=k) for src, ps in sorted(by_source.items())}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (the reference dir with --megatron-checkpoint)")
    ap.add_argument("--megatron-checkpoint", default=None,
                    help="a Megatron dist checkpoint (a run's checkpoints/step_N or its model/ dir) to evaluate")
    ap.add_argument("--data", nargs="*", default=[], help="parquet/jsonl benchmark file(s)")
    ap.add_argument("--synthetic", choices=["copy_digit", "add_mod"], help="evaluate on the synthetic task instead")
    ap.add_argument("--num-synthetic", type=int, default=64)
    ap.add_argument("--engine", default="embedded", help="embedded | sglang | vllm | auto")
    ap.add_argument("--engine-kwargs", default="{}", help="JSON dict passed to the engine factory")
    ap.add_argument("--reward", default=None, help="dapo_math (default) | math_verify | synthetic | a registered name")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=20480)
    ap.add_argument("--max-prompt-length", type=int, default=2048)
    ap.add_argument("--no-chat-template", action="store_true", help="use --raw-template instead of the chat template")
    ap.add_argument("--raw-template", default="{content}")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per reward call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    args = ap.parse_args(argv)
    if not args.data and not args.synthetic:
        ap.error("give --data FILE(s) or --synthetic TASK")

    from fipo_megatron.data.dataset import load_prompt_dataset
    from fipo_megatron.algo.rewards import get_reward, reward_failure_score
    from fipo_megatron.data.scoring import ScoreRunner
    from fipo_megatron.data.synthetic import make_synthetic_rows
    from fipo_megatron.data.tokenizer import load_tokenizer
    from fipo_megatron.rollout.base import SamplingParams, get_engine

    tmp_dir = None
    if args.megatron_checkpoint:
        import tempfile

        from fipo_megatron.checkpoint.convert import convert_megatron_to_hf

        ckpt = args.megatron_checkpoint
        if os.path.isdir(os.path.join(ckpt, "model")):
            ckpt = os.path.join(ckpt, "model")
        tmp_dir = tempfile.mkdtemp(prefix="fipo_eval_")
        args.model = str(convert_megatron_to_hf(ckpt_dir=ckpt, hf_ref_dir=args.model, out_dir=os.path.join(tmp_dir, "hf")))
    tokenizer = load_tokenizer(args.model)
    rows = None
    reward = args.reward or ("synthetic" if args.synthetic else "dapo_math")
    if args.synthetic:
        num_digits = len([c for c in tokenizer.chars if c.isdigit()])
        rows = make_synthetic_rows(task=args.synthetic, num_rows=args.num_synthetic, num_digits=num_digits,
                                   prompt_digits=2 if args.synthetic == "add_mod" else 1, seed=args.seed + 12345)
    dataset = load_prompt_dataset(files=args.data, rows=rows, tokenizer=tokenizer, max_prompt_length=args.max_prompt_length,
                                  chat_template=not args.no_chat_template, raw_template=args.raw_template)
    runner = ScoreRunner(score_fn=get_reward(reward), timeout_s=args.timeout, wrong_score=reward_failure_score(reward))
    engine = get_engine(args.engine, model_path=args.model, **json.loads(args.engine_kwargs))
    stop = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    sampling = SamplingParams(n=args.k, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, stop_token_ids=tuple(stop), seed=args.seed)
    try:
        result = evaluate(engine=engine, dataset=dataset, tokenizer=tokenizer, runner=runner, k=args.k, sampling=sampling)
    finally:
        engine.shutdown()
        if tmp_dir is not None:
            import shutil

            shutil.rmtree(tmp_dir, ignore_errors=True)
    result.update({"model": args.megatron_checkpoint or args.model, "data": args.data or f"synthetic:{args.synthetic}", "k": args.k,
                   "temperature": args.temperature, "top_p": args.top_p, "data_stats": dataset.stats})
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
