"""Prompt data, tokenizers and scoring.

- ``dataset``: verl / DAPO-Math-17k layout readers (parquet, jsonl), bad-row accounting, resumable sampler.
- ``tokenizer``: HF tokenizers and the synthetic task's ``CharTokenizer``; prompt encoding.
- ``synthetic``: the CPU demo's verifiable task.
- ``scoring``: reward calls under a timeout (threads or a process pool).
"""

# Importing these registers the package's own rewards: "synthetic" and "math_verify".
from fipo_megatron.data import scoring, synthetic  # noqa: F401
