"""Hugging Face safetensors -> this rank's Megatron shards, one parameter at a time.

Uses the checkpoint mapping (HF names -> full Megatron tensor) and ``models.sharding`` (full tensor ->
this rank's TP/PP slice); nothing re-derives a layout. Only the tensors this rank's stage owns are read,
one at a time, so host memory stays at about one full parameter.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def load_hf_weights(model_chunks, *, hf_dir: str, hf_config, groups) -> None:
    """Load ``hf_dir`` into ``model_chunks`` (collective only in the sense that every rank loads its part)."""
    from fipo_megatron.checkpoint.hf_io import HFCheckpointReader
    from fipo_megatron.checkpoint.registry import get_mapping
    from fipo_megatron.models.sharding import load_full_state_dict, local_params

    mapping = get_mapping(hf_config)
    reader = HFCheckpointReader(hf_dir)
    try:
        for name, (_, _, chunk) in local_params(model_chunks).items():
            tied_copy = name == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False)
            source = "embedding.word_embeddings.weight" if tied_copy else name
            full = mapping.hf_to_megatron(source, {h: reader.get(h) for h in mapping.hf_sources(source)})
            load_full_state_dict(model_chunks, {source: full}, groups=groups, strict=False)
    finally:
        reader.close()
