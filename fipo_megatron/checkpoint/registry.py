"""Exact-key registry of HF <-> Megatron mappings.

Dispatch is on the exact HF ``architectures[0]`` (e.g. ``Qwen2ForCausalLM``), falling back to the
exact ``model_type`` when a config has no ``architectures``; never on substrings of model names.

    from fipo_megatron.checkpoint.registry import get_mapping
    mapping = get_mapping(hf_config)          # a transformers config or a config.json dict
"""

from __future__ import annotations

from typing import Any, Callable

from fipo_megatron.checkpoint.mappings import llama, qwen2, qwen3
from fipo_megatron.checkpoint.mappings.base import ModelMapping, config_get
from fipo_megatron.registry import Registry

MappingBuilder = Callable[..., ModelMapping]

_BY_ARCHITECTURE: Registry[MappingBuilder] = Registry("model architecture")
_BY_MODEL_TYPE: dict[str, MappingBuilder] = {}  # the fallback for configs without ``architectures``


def register_mapping(*, architecture: str, model_type: str, builder: MappingBuilder) -> None:
    """Register ``builder(hf_config, *, padded_vocab_size=None) -> ModelMapping`` for one HF family."""
    _BY_ARCHITECTURE.register(architecture)(builder)
    _BY_MODEL_TYPE.setdefault(model_type, builder)


def supported_architectures() -> list[str]:
    """The exact HF ``architectures[0]`` values that have a mapping."""
    return _BY_ARCHITECTURE.names()


def get_mapping(hf_config: Any, *, padded_vocab_size: int | None = None) -> ModelMapping:
    """The :class:`ModelMapping` for ``hf_config``; ValueError listing the supported ones when unknown.

    ``padded_vocab_size``: the Megatron embedding's row count when the model pads the vocabulary.
    """
    architectures = config_get(hf_config, "architectures") or []
    model_type = config_get(hf_config, "model_type")
    if architectures:
        builder = _BY_ARCHITECTURE.get(architectures[0]) if architectures[0] in _BY_ARCHITECTURE else None
    else:
        builder = _BY_MODEL_TYPE.get(model_type)
    if builder is None:
        raise ValueError(f"unsupported model: architectures={list(architectures)}, model_type={model_type!r}; "
                         f"supported architectures: {supported_architectures()} "
                         f"(model_type fallback when architectures is empty: {sorted(_BY_MODEL_TYPE)})")
    return builder(hf_config, padded_vocab_size=padded_vocab_size)


for _family in (qwen2, llama, qwen3):
    register_mapping(architecture=_family.ARCHITECTURE, model_type=_family.MODEL_TYPE,
                     builder=_family.mapping_from_config)
