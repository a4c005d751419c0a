"""Per-family HF <-> Megatron mappings, one small module each; the registry is ``checkpoint.registry``."""

from fipo_megatron.checkpoint.mappings.base import ModelMapping

__all__ = ["ModelMapping"]
