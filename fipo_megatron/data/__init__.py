"""Prompt data, tokenizers, scoring and the step's experience.

- ``dataset``: verl / DAPO-Math-17k layout readers (parquet, jsonl), bad-row accounting, resumable sampler.
- ``tokenizer``: HF tokenizers and the synthetic task's ``CharTokenizer``; prompt encoding.
- ``synthetic``: the CPU demo's verifiable task.
- ``scoring``: reward calls under a timeout (threads or a process pool).
- ``experience``: engine outputs -> scored groups -> dynamic-sampling filter -> ``TrainBatch``.
- ``setup``: builds all of the above (and the engine) from a ``FipoConfig``.
"""
