"""Checkpoints: HF <-> Megatron mappings and conversion, Megatron dist checkpoints, the run manager.

- ``registry.get_mapping(hf_config)``: the per-family :class:`~.mappings.base.ModelMapping` (exact
  ``architectures[0]`` key), shared by conversion and the rollout weight sync;
- ``hf_io``: tensor-by-tensor safetensors reading and streamed, sharded writing;
- ``dist_ckpt``: layout-free, atomic ``save_megatron_checkpoint`` / ``load_megatron_checkpoint``;
- ``convert``: ``load_hf_into_model`` (trainer) and the offline converters behind ``tools/convert_*.py``;
- ``manager``: the training run's checkpoint rotation and resume.

Submodules are imported on use: importing this package loads neither megatron-core nor transformers.
"""
