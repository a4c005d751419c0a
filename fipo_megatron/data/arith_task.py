"""A multi-step arithmetic task designed so that writing intermediate results makes the answer reachable.

The problem is the last digit of a sum of ``k`` single digits: the prompt ``"3+5+2+7="`` has the answer
``7`` (3+5+2+7 = 17). A response may rewrite the sum once per step, each time replacing the first two
numbers by the last digit of their sum, then give the answer line::

    ..8+2+7=....0+7=......7=Answer: 7     (every step written; k = 4)
    ..8+2+7=Answer: 7                     (one step written, the rest done "in the head")
    Answer: 7                             (no step written: k - 1 additions in one token)

Every rewritten line is as wide as the problem (``2k`` characters: the consumed numbers become ``.``), so
each character of a line is the character one line above it, or, where the two leading numbers meet, the
last digit of their sum: rules over a fixed distance (``2k`` tokens back). Jumping to "Answer:" after
``j < k - 1`` lines asks for several additions in one token. The design intent: a policy that computes
the lines gains accuracy by writing more of them, so response length is the lever (a full solution is
``(k - 1) * 2k + 9`` characters: 121 for k = 8).

Whether writing lines actually helps depends on the policy computing them: ``tools/arith_measure.py``
samples the model and prints its accuracy per number of written lines. With ``--modulus 2`` (the parity of a bit
string: each line is one XOR) the warm start learns the lines within ~200 batches, and sampled at
temperature 1 it is right about 80% of the time after all 7 lines against 17-44% after 0-5 (chance is
50%): length pays. With ``--modulus 10`` (500 batches) it learns the format and the copy rule but not the
addition (its loss stays at the level of guessing the seven sum digits), so its sampled accuracy is about
0.1 however many lines it writes: on that model, length does not pay (docs/fipo_vs_dapo.md).

The rows are in the DAPO-Math-17k layout (``prompt`` messages, ``reward_model.ground_truth``,
``data_source``, ``ability``, ``extra_info``), the responses are scored by the real DAPO math rule
(``algo/rewards/dapo_math.py``: the text after the last "Answer:", normalised; +1 / -1), and the
character tokenizer is saved next to the model, so a run goes through the same data, tokenizer and
reward path as a real one (``reward.reward_fn: dapo_math``, no synthetic shortcut).

A random model never writes "Answer:" by chance, so the policy starts from a short supervised warm start:
first on solutions that write every line (meant to teach the step rule), then on solutions that write a
uniformly random number of lines ``j in [0, k - 1]`` (always with the right answer), so the model knows
the format, the step rule, and a spread of response lengths; RL then decides how many lines to write.
Prepare the model and the data once (deterministic from ``--seed``)::

    python -m fipo_megatron.data.arith_task --out runs/arith_mod2/base --num-operands 8 --modulus 2 --sft-steps 400

which writes ``OUT/model`` (HF safetensors + ``char_tokenizer.json``), ``OUT/train.jsonl``,
``OUT/val.jsonl`` and ``OUT/warm_start.json`` (the supervised loss and the warm-started model's greedy
answer accuracy after the first ``j`` correct lines: after all ``k - 1`` it is a copy of the last line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

from fipo_megatron.data.tokenizer import CharTokenizer

ARITH_DATA_SOURCE = "arith/sum_mod{modulus}"
ANSWER_PREFIX = "Answer: "
#: every character a prompt or a response of the task uses (the tokenizer's vocabulary after its specials).
ARITH_CHARS = tuple("0123456789+=.: Answer")


def arith_tokenizer() -> CharTokenizer:
    """The task's character tokenizer: digits, ``+ = . :``, space and the letters of "Answer"."""
    return CharTokenizer(chars=list(dict.fromkeys(ARITH_CHARS)))


def running_digits(operands: list[int], *, modulus: int = 10) -> list[int]:
    """Each prefix sum modulo ``modulus`` (10: its last digit): ``[3, 5, 2, 7] -> [3, 8, 0, 7]``."""
    if not 2 <= modulus <= 10:
        raise ValueError(f"modulus must be in [2, 10], got {modulus}")
    out, total = [], 0
    for d in operands:
        if not 0 <= d < modulus:
            raise ValueError(f"operands must be digits below the modulus {modulus}, got {d}")
        total = (total + d) % modulus
        out.append(total)
    return out


def prompt_text(operands: list[int]) -> str:
    """``[3, 5, 2, 7] -> "3+5+2+7="`` (``2k`` characters)."""
    return "+".join(map(str, operands)) + "="


def step_lines(operands: list[int], *, modulus: int = 10) -> list[str]:
    """The ``k - 1`` rewritten sums: line ``i`` is ``"." * 2i`` + the sum with its first ``i + 1`` numbers
    replaced by their last digit: ``[3, 5, 2, 7] -> ["..8+2+7=", "....0+7=", "......7="]``."""
    digits = running_digits(operands, modulus=modulus)
    return ["." * (2 * i) + "+".join(map(str, [digits[i], *operands[i + 1:]])) + "=" for i in range(1, len(operands))]


def solution_text(operands: list[int], *, num_steps: int, modulus: int = 10) -> str:
    """A correct response that writes the first ``num_steps`` lines (``0 .. k - 1``), then the answer line."""
    if not 0 <= num_steps <= len(operands) - 1:
        raise ValueError(f"num_steps must be in [0, {len(operands) - 1}], got {num_steps}")
    return "".join(step_lines(operands, modulus=modulus)[:num_steps]) + f"{ANSWER_PREFIX}{sum(operands) % modulus}"


def count_steps(response_text: str) -> int:
    """How many lines a response writes before its answer line (each line ends with ``=``)."""
    return response_text.split("A", 1)[0].count("=")


def make_arith_rows(*, num_rows: int, num_operands: int, seed: int, modulus: int = 10) -> list[dict]:
    """``num_rows`` problems with ``num_operands`` random digits below ``modulus`` each (answer: the sum
    modulo ``modulus``; 2 makes it the parity of a bit string), in the DAPO-Math-17k layout."""
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if num_operands < 2:
        raise ValueError(f"num_operands must be >= 2, got {num_operands}")
    rng = random.Random(seed)
    rows = []
    for index in range(num_rows):
        operands = [rng.randrange(modulus) for _ in range(num_operands)]
        rows.append({"data_source": ARITH_DATA_SOURCE.format(modulus=modulus),
                     "prompt": [{"role": "user", "content": prompt_text(operands)}],
                     "ability": "math",
                     "reward_model": {"style": "rule", "ground_truth": str(sum(operands) % modulus)},
                     "extra_info": {"index": index, "operands": operands}})
    return rows


def write_jsonl(rows: list[dict], path: str) -> None:
    """Write rows one JSON object per line (temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- warm start
def _sft_batch(tokenizer: CharTokenizer, rng: random.Random, *, batch_size: int, num_operands: int,
               all_steps: bool, modulus: int):
    """Token ids and a loss mask (response tokens and EOS) of ``batch_size`` solved problems, right-padded.
    ``all_steps``: every solution writes every step; otherwise a uniform number of steps in [0, k]."""
    import torch

    seqs, masks = [], []
    for _ in range(batch_size):
        operands = [rng.randrange(modulus) for _ in range(num_operands)]
        prompt = tokenizer.encode(prompt_text(operands))  # <bos> + prompt, as the trainer encodes it
        response = tokenizer.encode(solution_text(operands, num_steps=num_operands - 1 if all_steps else rng.randint(0, num_operands - 1),
                                                  modulus=modulus),
                                    add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(prompt + response)
        masks.append([0] * len(prompt) + [1] * len(response))
    width = max(len(s) for s in seqs)
    ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.float32)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, mask


def warm_start(*, num_operands: int, num_steps: int, batch_size: int, lr: float, seed: int,
               all_steps_fraction: float = 0.5, modulus: int = 10, model_overrides: dict | None = None, log_every: int = 50, logger=None):
    """Supervised warm start of a tiny random Llama: first on solutions that write every step (the first
    ``all_steps_fraction`` of the batches: that is where the step rule is learned), then on solutions
    with a uniform number of written steps (the spread of lengths RL starts from).

    Returns ``(model, tokenizer, losses)``: plain next-token cross-entropy on response tokens (and EOS),
    AdamW with a cosine decay, ``num_steps`` batches of fresh problems.
    """
    import torch

    from fipo_megatron.testing.tiny_models import tiny_hf_model

    tokenizer = arith_tokenizer()
    overrides = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 1024, **(model_overrides or {})}
    model = tiny_hf_model("llama", seed=seed, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / num_steps, 1.0))))
    rng = random.Random(seed)
    losses = []
    for step in range(num_steps):
        ids, mask = _sft_batch(tokenizer, rng, batch_size=batch_size, num_operands=num_operands,
                               all_steps=step < all_steps_fraction * num_steps, modulus=modulus)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if logger is not None and (step % log_every == 0 or step == num_steps - 1):
            logger.info("warm start step %d/%d: loss %.4f", step + 1, num_steps, losses[-1])
    return model.eval(), tokenizer, losses


def greedy_accuracy_by_steps(model, tokenizer: CharTokenizer, *, num_operands: int, num_problems: int,
                             step_counts: list[int], seed: int, modulus: int = 10) -> dict[int, float]:
    """Accuracy (DAPO rule) of the model's greedy answer when the first ``j`` steps are given, per ``j``.

    Shows what the warm start learned: near 1 when all steps are written, about 0.1 when few are.
    """
    import torch

    from fipo_megatron.algo.rewards.dapo_math import dapo_math_reward

    rng = random.Random(seed)
    problems = [[rng.randrange(modulus) for _ in range(num_operands)] for _ in range(num_problems)]
    out = {}
    with torch.no_grad():
        for j in step_counts:
            prefixes = [tokenizer.encode(prompt_text(ops)) + tokenizer.encode(
                solution_text(ops, num_steps=j, modulus=modulus).split(ANSWER_PREFIX)[0] + ANSWER_PREFIX, add_special_tokens=False)
                for ops in problems]
            ids = torch.tensor(prefixes)  # every prefix has the same length for a given j
            pred = model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
            texts = [ANSWER_PREFIX + tokenizer.decode([p]) for p in pred]
            out[j] = sum(dapo_math_reward(response_text=t, ground_truth=str(sum(ops) % modulus))["acc"]
                         for t, ops in zip(texts, problems)) / num_problems
    return out


def prepare(*, out: str, num_operands: int, num_train: int, num_val: int, sft_steps: int, sft_batch_size: int,
            sft_lr: float, seed: int, all_steps_fraction: float = 0.6, modulus: int = 10, logger=None) -> dict:
    """Write ``out/{model, train.jsonl, val.jsonl, warm_start.json}``; return the warm-start summary."""
    from fipo_megatron.data.synthetic import save_synthetic_tokenizer

    t0 = time.perf_counter()
    write_jsonl(make_arith_rows(num_rows=num_train, num_operands=num_operands, seed=seed, modulus=modulus),
                os.path.join(out, "train.jsonl"))
    write_jsonl(make_arith_rows(num_rows=num_val, num_operands=num_operands, seed=seed + 1, modulus=modulus),
                os.path.join(out, "val.jsonl"))
    model, tokenizer, losses = warm_start(num_operands=num_operands, num_steps=sft_steps, batch_size=sft_batch_size,
                                          lr=sft_lr, seed=seed, all_steps_fraction=all_steps_fraction, modulus=modulus,
                                          logger=logger)
    model_dir = os.path.join(out, "model")
    tmp = f"{model_dir}.tmp"
    model.save_pretrained(tmp)
    save_synthetic_tokenizer(tokenizer, tmp)
    if os.path.exists(model_dir):
        import shutil

        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)
    steps = sorted({0, 1, num_operands // 2, num_operands - 2, num_operands - 1})
    acc = greedy_accuracy_by_steps(model, tokenizer, num_operands=num_operands, num_problems=256, step_counts=steps,
                                   seed=seed + 2, modulus=modulus)
    summary = {"num_operands": num_operands, "modulus": modulus, "sft_steps": sft_steps, "sft_batch_size": sft_batch_size,
               "sft_lr": sft_lr, "all_steps_fraction": all_steps_fraction, "seed": seed, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
               "greedy_acc_by_written_steps": {str(k): v for k, v in acc.items()},
               "wall_s": time.perf_counter() - t0}
    with open(os.path.join(out, "warm_start.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m fipo_megatron.data.arith_task --out DIR [--num-operands 8 ...]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (model/, train.jsonl, val.jsonl)")
    parser.add_argument("--num-operands", type=int, default=8, help="digits per problem (k)")
    parser.add_argument("--modulus", type=int, default=10, help="answer = sum modulo this (2: parity of bits)")
    parser.add_argument("--num-train", type=int, default=4096)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--sft-steps", type=int, default=500, help="warm-start batches")
    parser.add_argument("--sft-batch-size", type=int, default=32)
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--all-steps-fraction", type=float, default=0.6,
                        help="share of warm-start batches whose solutions write every line (the rest: a uniform number)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from fipo_megatron.log import get_logger

    logger = get_logger("fipo_megatron.arith_task")
    summary = prepare(out=args.out, num_operands=args.num_operands, num_train=args.num_train, num_val=args.num_val,
                      sft_steps=args.sft_steps, sft_batch_size=args.sft_batch_size, sft_lr=args.sft_lr, seed=args.seed,
                      all_steps_fraction=args.all_steps_fraction, modulus=args.modulus, logger=logger)
    logger.info("warm start: %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
