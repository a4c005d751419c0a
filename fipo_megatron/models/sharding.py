"""The one definition of how a Megatron GPT parameter is laid out over TP ranks and PP stages.

Full tensors ("full state dict") are the TP=1 Megatron layout with *global* layer indices and the
canonical (Transformer Engine spec / Megatron dist-checkpoint) names, whichever spec the model uses:

    embedding.word_embeddings.weight                       [V, H]     TP: rows (vocab)
    decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight   replicated (input RMSNorm)
    decoder.layers.{i}.self_attention.linear_qkv.weight/bias         TP: rows; per query group g the rows
                                                           are [q_g (np/ng*hn); k_g (hn); v_g (hn)], so a plain
                                                           row split is a split by query groups
    decoder.layers.{i}.self_attention.q_layernorm.weight / k_layernorm.weight   replicated (Qwen3)
    decoder.layers.{i}.self_attention.linear_proj.weight   TP: columns
    decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight    replicated (pre-MLP RMSNorm)
    decoder.layers.{i}.mlp.linear_fc1.weight               [2F, H] = [gate; up]; TP rank r holds [gate_r; up_r]
    decoder.layers.{i}.mlp.linear_fc2.weight               TP: columns
    decoder.final_layernorm.weight                         replicated
    output_layer.weight                                    TP: rows (absent when embeddings are tied)

The local spec names its norms ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``;
:func:`canonical_name` maps them (the same map Megatron's ``sharded_state_dict_keys_map`` uses).
Vocabulary rows beyond the HF vocabulary (TP padding, see ``models.hf_config.padded_vocab_size``) are
zero-filled on load and kept on gather unless ``vocab_size`` is given.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_LAYER_RE = re.compile(r"^(decoder\.layers\.)(\d+)(\..+)$")

# local-spec name suffix -> canonical (TE spec) suffix
_LOCAL_TO_CANONICAL = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")
_ROW_SPLIT_SUFFIXES = (".linear_qkv.weight", ".linear_qkv.bias", ".linear_fc1.bias")  # dim 0 (column-parallel)
_COL_SPLIT_SUFFIXES = (".linear_proj.weight", ".linear_fc2.weight")  # dim 1 (row-parallel)
_GATED = ".linear_fc1.weight"


def canonical_name(name: str) -> str:
    """Map a local-spec parameter name to the canonical (TE spec) name; other names unchanged."""
    for local, canonical in _LOCAL_TO_CANONICAL.items():
        if name.endswith(local):
            return name[: -len(local)] + canonical
    return name


def partition_dim(name: str) -> int | None:
    """TP split dimension of the (canonical or local) parameter ``name``; None if replicated."""
    name = canonical_name(name)
    if name in _VOCAB_PARALLEL or name.endswith(_ROW_SPLIT_SUFFIXES) or name.endswith(_GATED):
        return 0
    if name.endswith(_COL_SPLIT_SUFFIXES):
        return 1
    if name.endswith(("layer_norm_weight", "layernorm.weight")):  # RMSNorm weights: replicated
        return None
    raise ValueError(f"no TP layout rule for parameter {name!r}")


def shard_for_tp(name: str, full: torch.Tensor, *, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of the full tensor ``full`` of parameter ``name`` (a view when possible)."""
    dim = partition_dim(name)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise ValueError(f"{name}: dim {dim} of size {full.shape[dim]} is not divisible by tp = {tp_size}")
    if canonical_name(name).endswith(_GATED):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def gather_tp_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard_for_tp`: the full tensor from every TP rank's shard, in rank order."""
    dim = partition_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if canonical_name(name).endswith(_GATED):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def layer_offset(*, num_layers: int, pp_size: int, pp_rank: int, vpp_size: int = 1, vp_stage: int = 0) -> int:
    """Global index of the first layer of (pp_rank, vp_stage) under Megatron's uniform split.

    Virtual stage v of rank p holds model chunk ``v * pp + p`` of ``pp * vpp`` equal chunks.
    """
    per_chunk, rem = divmod(num_layers, pp_size * vpp_size)
    if rem:
        raise ValueError(f"num_layers {num_layers} is not divisible by pp*vpp = {pp_size * vpp_size}")
    return (vp_stage * pp_size + pp_rank) * per_chunk


def to_global_name(name: str, *, layer_offset: int) -> str:
    """``decoder.layers.{i}.x`` -> ``decoder.layers.{i + layer_offset}.x``; non-layer names unchanged."""
    m = _LAYER_RE.match(name)
    return name if m is None else f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}"


def to_local_name(name: str, *, layer_offset: int) -> str:
    """Inverse of :func:`to_global_name`."""
    return to_global_name(name, layer_offset=-layer_offset)


def chunk_layer_offset(chunk) -> int:
    """Global index of a model chunk's first layer, read from Megatron's own ``layer_number`` (1-based)."""
    decoder = getattr(chunk, "decoder", None)
    layers = getattr(decoder, "layers", None) if decoder is not None else None
    if not layers:
        return 0
    return int(layers[0].layer_number) - 1


def unwrap_model(chunk):
    """The ``GPTModel`` inside Megatron's DDP / Float16Module wrappers (they keep it under ``.module``)."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk



def _shares_embedding(chunk) -> bool:
    return bool(getattr(chunk, "share_embeddings_and_output_weights", False))


def local_params(model_chunks) -> dict[str, tuple[str, torch.nn.Parameter, object]]:
    """``{canonical global name: (local name, parameter, chunk)}`` for this rank's chunks."""
    out = {}
    for chunk in model_chunks:
        chunk = unwrap_model(chunk)
        offset = chunk_layer_offset(chunk)
        for local_name, param in chunk.named_parameters():
            out[canonical_name(to_global_name(local_name, layer_offset=offset))] = (local_name, param, chunk)
    return out


def _tied_output_copy(name: str, chunk) -> bool:
    # The last stage's private copy of the tied word embedding (only exists under PP).
    return name == "output_layer.weight" and _shares_embedding(chunk)


@torch.no_grad()
def load_full_state_dict(model_chunks, full_state_dict: dict[str, torch.Tensor], *, groups,
                         strict: bool = True) -> None:
    """Copy this rank's TP/PP slice of every full (TP=1, global-name) tensor into ``model_chunks``.

    Accepts canonical or local-spec names. The tied output copy on the last stage is loaded from
    ``embedding.word_embeddings.weight``. Vocab rows are zero-padded to the model's padded vocabulary.
    ``strict``: every model parameter must be found (unused full tensors are fine: other stages own them).
    """
    full = {canonical_name(k): v for k, v in full_state_dict.items()}
    missing = []
    for name, (local_name, param, chunk) in local_params(model_chunks).items():
        source = "embedding.word_embeddings.weight" if _tied_output_copy(name, chunk) else name
        if source not in full:
            missing.append(name)
            continue
        tensor = full[source]
        if name in _VOCAB_PARALLEL and tensor.shape[0] < param.shape[0] * groups.tp_size:
            pad = tensor.new_zeros(param.shape[0] * groups.tp_size - tensor.shape[0], *tensor.shape[1:])
            tensor = torch.cat([tensor, pad])
        dim = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
        if dim != partition_dim(name):
            raise AssertionError(f"{name}: Megatron partition_dim {dim} disagrees with the sharding rule "
                                 f"{partition_dim(name)}")
        shard = shard_for_tp(name, tensor, tp_rank=groups.tp_rank, tp_size=groups.tp_size)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: shard shape {tuple(shard.shape)} != parameter shape {tuple(param.shape)} "
                             f"(full {tuple(tensor.shape)}, tp={groups.tp_size})")
        param.copy_(shard)
    if strict and missing:
        raise KeyError(f"full state dict lacks {len(missing)} parameters of this rank, e.g. {missing[:5]}")


@torch.no_grad()
def gather_full_state_dict(model_chunks, *, groups, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The full (TP=1, global-name, canonical) state dict, on every rank; for tests and small models.

    TP shards are all-gathered in the TP group, stages exchanged in the PP group (object all-gather, so
    this is not meant for large models; weight export streams per bucket instead). Tensors are on CPU.
    ``vocab_size``: drop vocab rows beyond it (the TP padding). The tied output copy is not returned.
    """
    stage: dict[str, torch.Tensor] = {}
    for name, (_, param, chunk) in local_params(model_chunks).items():
        if _tied_output_copy(name, chunk):
            continue
        tensor = param.detach()
        if groups.tp_size > 1 and partition_dim(name) is not None:
            parts = [torch.empty_like(tensor) for _ in range(groups.tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=groups.tp_group)
            tensor = gather_tp_shards(name, parts)
        if vocab_size is not None and name in _VOCAB_PARALLEL:
            tensor = tensor[:vocab_size]
        stage[name] = tensor.cpu().clone()
    if groups.pp_size == 1:
        return stage
    stages: list = [None] * groups.pp_size
    dist.all_gather_object(stages, stage, group=groups.pp_group)
    merged: dict[str, torch.Tensor] = {}
    for part in stages:
        merged.update(part)
    return merged
