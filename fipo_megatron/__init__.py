"""fipo_megatron: FIPO (Future-KL Influenced Policy Optimization) RL training on Megatron-core."""

__version__ = "0.1.0"
