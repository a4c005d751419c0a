"""The rollout protocol: what the trainer asks of any generation engine, and the engine registry.

Every engine (SGLang, vLLM, the embedded transformers engine) implements ``RolloutEngine``. The trainer
only ever calls these methods, so engines swap behind one small surface:

    engine = get_engine("auto", hf_config=cfg)          # sglang on CUDA if importable, else vllm, else embedded
    engine = get_engine("sglang", model_path=p, tp_size=4, num_engines=2)   # two replicas (rollout/multi.py)
    outs = engine.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_new_tokens=64))
    for bucket in export_buckets(...):                   # weights/export.py
        engine.update_weights(bucket)
    engine.finish_weight_update()

Log-prob convention (all engines): ``RolloutOutput.log_probs[t]`` is the log-probability of the sampled
token ``token_ids[t]`` under ``log_softmax(logits / temperature)``: temperature applied, *before* top-k /
top-p truncation (the truncation is a sampling device, not part of the policy). That is exactly what the
actor computes (``TrainBatch.temperature``), so the train/rollout mismatch metric compares like with like.
With temperature 0 (greedy) the log-probs are of ``log_softmax(logits)``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch

from fipo_megatron.log import get_logger
from fipo_megatron.registry import Registry, UnknownNameError

logger = get_logger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one batch of responses.

    ``temperature``: 0 means greedy (argmax); otherwise logits are divided by it. ``top_p`` in (0, 1]
    (1 = off), ``top_k`` a positive count or -1 (off). ``max_new_tokens``: response length limit.
    ``n``: responses per prompt (outputs are grouped: the n responses of prompt 0 first).
    ``stop_token_ids``: extra ids that end a response (EOS always does); the stop token is kept in
    ``token_ids``. ``seed``: makes sampling reproducible on engines that support it (None = random).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0.0):
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        # Accept any iterable of ints (yaml gives lists) but store a tuple so the dataclass stays hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids must be non-negative, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        """Temperature 0: the argmax token at every position."""
        return self.temperature == 0.0


@dataclass(kw_only=True)
class RolloutOutput:
    """One response. ``log_probs[t]`` belongs to ``token_ids[t]`` (see the module docstring for which
    distribution). ``finish_reason`` is "stop" (EOS or a stop id, included as the last token) or
    "length" (``max_new_tokens`` reached). ``prompt_index`` is the index of its prompt in the request."""

    token_ids: list[int]
    log_probs: list[float]
    finish_reason: FinishReason
    prompt_index: int = 0

    def __post_init__(self):
        if len(self.token_ids) != len(self.log_probs):
            raise ValueError(f"RolloutOutput.log_probs has {len(self.log_probs)} entries for "
                             f"{len(self.token_ids)} token_ids")
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"RolloutOutput.finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")


def shard_seed(seed: int, kind: str, index: int) -> int:
    """The sampling seed of shard ``index`` (an engine replica, a node) of a request seeded ``seed``.

    Shard 0 keeps ``seed`` (one engine samples exactly as before); the others get a hash of
    ``(seed, kind, index)``, so no two shards, nor a shard and the next generation batch (whose seeds the
    trainer derives by counting), share a random stream."""
    if index == 0:
        return seed
    import hashlib

    digest = hashlib.blake2b(f"{seed}/{kind}/{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation engine the trainer drives. Weight sync is bucketed: ``update_weights`` is called once
    per bucket of HF-named *full* (unsharded) tensors, then ``finish_weight_update`` once.

    Required: ``generate``, ``update_weights``, ``finish_weight_update``, ``release_memory``,
    ``resume_memory``. Optional, with the defaults below: ``weight_transport``, ``connect_weight_sync``,
    ``end_phase``, ``shutdown``, ``state_dict``, ``load_state_dict``. Engines subclass this protocol
    explicitly, so they inherit those defaults and callers never need to ask whether an engine has one.

    The trainer's order of calls: ``connect_weight_sync`` once after the engine is built; per step
    ``generate`` (one or more calls, then ``end_phase``), ``release_memory`` while the actor trains,
    ``resume_memory``, one sync (``weight_transport().send`` per bucket, then ``finish``: by default
    ``update_weights`` per bucket and ``finish_weight_update``); ``state_dict`` whenever the trainer
    records a resumable state, ``load_state_dict`` on resume; ``shutdown`` at the end."""

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        """Sample ``sampling.n`` responses to each prompt (a list of token ids, at least one token).

        Returns ``len(prompt_token_ids) * sampling.n`` outputs grouped by prompt, in prompt order (the
        ``n`` responses of prompt 0 first), each with ``prompt_index`` its prompt's index in this call and
        log-probs by the module docstring's convention. With ``sampling.seed`` set, an engine that supports
        seeding samples reproducibly. Raises what the engine raises; a server engine that cannot be reached
        raises ``EngineUnavailableError`` (``rollout/http_client.py``), leaving the trainer's state untouched.
        """
        ...

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of ``(HF name, full tensor)`` pairs into the engine's model.

        Callers end the sync with ``finish_weight_update`` before the next ``generate``. A name or shape the
        model does not have raises (``WeightSyncError``, or ValueError naming the tensor). Engines that receive
        over a process group raise NotImplementedError and take buckets through ``weight_transport``."""
        ...

    def finish_weight_update(self) -> None:
        """End a sync after its last bucket: flush the prefix/KV caches computed with the old weights and
        post-process the new ones. Raises ``WeightSyncError`` when the engine cannot (a stale cache would
        keep sampling from the old policy)."""
        ...

    def release_memory(self) -> None:
        """Free the engine's GPU memory (weights and KV cache) while the trainer trains; ``resume_memory``
        comes before the next sync or ``generate``. A no-op where there is nothing to free (CPU)."""
        ...

    def resume_memory(self) -> None:
        """Take back what ``release_memory`` freed, before the next weight sync (the trainer resumes the
        engine first, then syncs, then generates). A no-op when nothing was released."""
        ...

    def weight_transport(self):
        """How weight buckets reach this engine: a ``weights.transport.WeightTransport`` for one sync.
        Default: buckets handed to ``update_weights`` in this process; server engines that receive over a
        process group override it."""
        from fipo_megatron.weights.transport import InProcessTransport

        return InProcessTransport(self)

    def connect_weight_sync(self) -> None:
        """Join the engine's weight-sync group once, right after it is built, so a server that cannot join
        fails the start-up rather than the first sync (disaggregated servers). Default: nothing to join."""

    def end_phase(self) -> None:
        """The trainer's rollout (or validation) phase is over: release helpers that serve it (per-node
        engines). Called on rank 0 after each phase, even one that failed. Default: nothing to release."""

    def shutdown(self) -> None:
        """Stop the engine and everything it started (never a server it only connects to). Default:
        nothing was started."""

    def state_dict(self) -> dict:
        """What a resumed run needs to sample as an uninterrupted one would (JSON-serialisable; several
        engines: the cost history their split follows). Default: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s result. Default: nothing to restore."""


EngineFactory = Callable[..., RolloutEngine]
# metadata: the engine's replica_kwargs (see register_engine), or None
_ENGINES: Registry[EngineFactory] = Registry("rollout engine")


def register_engine(name: str, *, replica_kwargs: Callable[[dict, int], dict] | None = None
                    ) -> Callable[[EngineFactory], EngineFactory]:
    """Decorator: register ``factory(**kwargs) -> RolloutEngine`` under ``name``.

    ``replica_kwargs(kwargs, i)``: the keyword arguments of replica ``i`` when ``get_engine(...,
    num_engines=k)`` builds several (e.g. a GPU offset); engines registered without it refuse k > 1."""

    return _ENGINES.register(name, metadata=replica_kwargs)


def _ensure_builtin_engines() -> None:
    # Importing the modules registers their factories; the heavy deps (sglang, vllm) stay lazy inside them.
    from fipo_megatron.rollout import embedded, sglang_engine, vllm_engine  # noqa: F401


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_engine_name(name: str) -> str:
    """Map "auto" to a concrete engine: sglang if importable and CUDA, else vllm (same), else embedded."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        for candidate in ("sglang", "vllm"):
            if _importable(candidate):
                return candidate
    return "embedded"


def get_engine(name: str = "auto", *, num_engines: int = 1, **kwargs: Any) -> RolloutEngine:
    """Build the engine registered as ``name`` ("auto" picks, see ``resolve_engine_name``).

    ``num_engines > 1``: that many replicas behind one ``rollout.multi.MultiEngine`` (engine data
    parallelism), each built with the engine's ``replica_kwargs`` (see ``register_engine``)."""
    _ensure_builtin_engines()
    resolved = resolve_engine_name(name)
    if resolved not in _ENGINES:
        raise UnknownNameError(f"unknown rollout engine {name!r}; registered: {_ENGINES.names()} (or 'auto')")
    if isinstance(num_engines, bool) or not isinstance(num_engines, int) or num_engines < 1:
        raise ValueError(f"num_engines must be an integer >= 1, got {num_engines!r}")
    if resolved != name:
        logger.info("rollout engine 'auto' resolved to %r", resolved)
    factory = _ENGINES.get(resolved)
    if num_engines == 1:
        return factory(**kwargs)
    replica_kwargs = _ENGINES.metadata(resolved)
    if replica_kwargs is None:
        raise ValueError(f"rollout engine {resolved!r} does not support num_engines > 1 (got {num_engines})")
    from fipo_megatron.rollout.multi import MultiEngine

    engines: list = []
    try:
        for i in range(num_engines):
            engines.append(factory(**replica_kwargs(dict(kwargs), i)))
    except BaseException:
        for engine in engines:  # do not leak the replicas already started
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                logger.exception("shutting down rollout engine replica after a failed start")
        raise
    logger.info("rollout: %d %s engines (engine data parallelism)", num_engines, resolved)
    return MultiEngine(engines)


def registered_engines() -> list[str]:
    """Names of all registered engines."""
    _ensure_builtin_engines()
    return _ENGINES.names()
