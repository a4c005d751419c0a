"""Rollout engines behind one protocol (``base.RolloutEngine``) and their registry, and the rollout phase
of a step (``phase.RolloutPhase``: generate, score with ``experience``, filter, advantages).

``get_engine("auto" | "embedded" | "sglang" | "sglang_server" | "vllm", **kwargs)``; SGLang and vLLM are
imported only when their engine is built. See docs/rollout.md.
"""

from fipo_megatron.rollout.base import (
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    get_engine,
    register_engine,
    registered_engines,
    resolve_engine_name,
)
from fipo_megatron.rollout.mismatch import rollout_mismatch_metrics

__all__ = [
    "RolloutEngine",
    "RolloutOutput",
    "SamplingParams",
    "get_engine",
    "register_engine",
    "registered_engines",
    "resolve_engine_name",
    "rollout_mismatch_metrics",
]
