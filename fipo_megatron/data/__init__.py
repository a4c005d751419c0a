"""Prompt data, tokenizers and scoring.

- ``dataset``: verl / DAPO-Math-17k layout readers (parquet, jsonl), bad-row accounting, resumable sampler.
- ``tokenizer``: HF tokenizers and the synthetic task's ``CharTokenizer``; prompt encoding.
- ``synthetic``: the CPU demo's verifiable task.
- ``scoring``: reward calls under a timeout (threads or a process pool).
"""

from fipo_megatron.algo.rewards.base import register_reward
from fipo_megatron.data import synthetic  # noqa: F401  (registers the "synthetic" reward)
from fipo_megatron.data.scoring import math_verify_score

# HF math-verify's rule, registered beside the package's other rewards (the import of math_verify itself
# stays lazy, inside the function).
register_reward("math_verify", failure_score=-1.0)(math_verify_score)
