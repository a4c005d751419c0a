"""A synthetic verifiable task that a tiny, randomly initialised model learns by RL in minutes on CPU.

Prompts are a handful of characters, the answer is one digit, and a rule checks it:

- ``copy_digit``: ``"3="`` -> ``"3"``; with ``prompt_digits > 1`` (``"31="``) the answer is the first digit.
- ``add_mod``:    ``"3+4="`` -> ``(3 + 4) % num_digits`` (harder: needs two attention hops).

The vocabulary is tiny on purpose (``CharTokenizer``: 3 special tokens, ``num_digits`` digits, ``+`` and
``=``): a random policy then samples the right digit first with probability about ``1 / vocab_size``
(0.1 for the default 5 digits), so the reward starts low but not at zero, and GRPO has groups with mixed
outcomes from the first step. The same token ids serve the embedded engine's HF model and the Megatron
actor (both are built with ``vocab_size = tokenizer.vocab_size``).

The score is 1 when the first response character is the answer and 0 otherwise; stopping right after it
is not required (the demo's responses are a few tokens long, so FutureKL still sees several tokens).
"""

from __future__ import annotations

import json
import os
import random

from fipo_megatron.algo.rewards.base import register_reward
from fipo_megatron.data.tokenizer import CHAR_TOKENIZER_FILE, CharTokenizer

SYNTHETIC_DATA_SOURCE = "synthetic"


def synthetic_tokenizer(*, num_digits: int) -> CharTokenizer:
    """The character tokenizer of the synthetic task: digits ``0..num_digits-1``, ``+`` and ``=``."""
    return CharTokenizer(chars=[str(d) for d in range(num_digits)] + ["+", "="])


def make_synthetic_rows(*, task: str, num_rows: int, num_digits: int, prompt_digits: int, seed: int) -> list[dict]:
    """Rows in the verl / DAPO layout (``prompt`` messages, ``reward_model.ground_truth``, ``data_source``)."""
    if task not in ("copy_digit", "add_mod"):
        raise ValueError(f"task must be 'copy_digit' or 'add_mod', got {task!r}")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        digits = [rng.randrange(num_digits) for _ in range(prompt_digits)]
        if task == "copy_digit":
            text, answer = "".join(map(str, digits)) + "=", digits[0]
        else:
            text, answer = "+".join(map(str, digits)) + "=", sum(digits) % num_digits
        rows.append({"prompt": [{"role": "user", "content": text}],
                     "reward_model": {"ground_truth": str(answer), "style": "rule"},
                     "data_source": f"{SYNTHETIC_DATA_SOURCE}/{task}"})
    return rows


@register_reward("synthetic", failure_score=0.0)  # a 0 / 1 task: a failed call scores as wrong, 0
def synthetic_score(*, response_text: str, ground_truth: str, **_) -> dict:
    """1.0 if the response's first character is the answer digit, else 0.0 (``acc`` alike)."""
    correct = response_text[:1] == str(ground_truth)
    return {"score": 1.0 if correct else 0.0, "acc": correct, "pred": response_text[:1]}


def save_synthetic_tokenizer(tokenizer: CharTokenizer, directory: str) -> str:
    """Write the tokenizer next to a model so tools (evaluate) can reload it; return the file path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHAR_TOKENIZER_FILE)
    with open(path, "w") as f:
        json.dump(tokenizer.to_dict(), f)
    return path
