"""The Megatron actor: packing, chunked vocab-parallel log-probs, the FIPO update.

    from fipo_megatron.actor import ActorConfig, MegatronActor
"""

from fipo_megatron.actor.actor import MegatronActor
from fipo_megatron.actor.config import ActorConfig

__all__ = ["ActorConfig", "MegatronActor"]
