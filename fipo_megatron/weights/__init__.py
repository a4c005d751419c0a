"""Megatron -> HF weight export (bucketed, TP/PP aware), transports to rollout engines, block-FP8 export.

Submodules: ``export`` (``export_hf_buckets``, ``broadcast_hf_buckets`` to many receivers, ``hf_names_and_shapes``,
``check_against_hf_state_dict``),
``transport`` (``sync_weights``, in-process / disk / CUDA IPC transports), ``nccl_transport`` (process-group
broadcast to disaggregated engines), ``fp8`` (block-scaled e4m3 as SGLang loads it). Imported by full name:
this package imports nothing heavy on its own.
"""
