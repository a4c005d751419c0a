"""Engine data parallelism: several rollout engines behind one ``RolloutEngine``.

    engine = get_engine("sglang", model_path=p, tp_size=4, num_engines=2)   # GPUs 0-3 and 4-7 of rank 0's node
    engine = get_engine("sglang_server", base_urls=[url_a, url_b],   # two servers (SGLangServerPool)
                        weight_sync={"master_port": 29600, "engine_world_size": 4})
    outs = engine.generate(prompts, sampling)      # prompts split across engines, run concurrently

- ``generate``: the prompts are split by expected cost (``balanced_split``, costs from ``CostModel``: a
  prompt's previous mean response length when it was sampled before, else its length plus the mean response
  length seen so far). All ``n`` samples of a prompt stay on one engine (its prefix cache serves them); the
  engines run concurrently in threads (their work happens in their own processes or servers), and the
  outputs come back in prompt order with global ``prompt_index``. With a ``seed``, engine ``i`` samples
  with ``shard_seed(seed, "engine", i)`` (engine 0 with ``seed`` itself). The split, hence which stream a
  prompt draws from, is a pure function of the request and the cost history: reproducible for a fixed
  engine count and history (``state_dict``/``load_state_dict`` carry the history across a resume), not
  across engine counts (an engine samples its whole shard from one stream).
- Weights: ``weight_transport()`` fans every bucket out to each engine's own transport
  (``weights.transport.FanOutTransport``): in-process copies for colocated engines. Several SGLang
  servers are a ``rollout.sglang_engine.SGLangServerPool`` instead (this class plus one weight group
  spanning all servers, so one broadcast per tensor reaches every server).
- Memory release/resume, cache flushes and shutdown go to every engine; shutdown stops all of them even if
  one fails, then raises the first failure.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from fipo_megatron.log import get_logger
from fipo_megatron.rollout.base import RolloutEngine, RolloutOutput, SamplingParams, shard_seed

logger = get_logger(__name__)


def balanced_split(costs: list[float], num_parts: int) -> list[list[int]]:
    """Indices of ``costs`` in ``num_parts`` parts of near-equal total cost, each part in increasing order.

    Longest-processing-time first: items by decreasing cost (ties: lower index first), each to the part with
    the smallest total so far (ties: lower part). The most expensive items land on different parts, and the
    largest part total is at most 4/3 of the best possible. Deterministic; a part may be empty."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    heap = [(0.0, part) for part in range(num_parts)]  # (total, part): heapq breaks ties by part
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        total, part = heapq.heappop(heap)
        parts[part].append(i)
        heapq.heappush(heap, (total + costs[i], part))
    return [sorted(p) for p in parts]


def _prompt_key(prompt: list[int]) -> str:
    return hashlib.blake2b(repr(list(prompt)).encode(), digest_size=8).hexdigest()


class CostModel:
    """Expected cost of sampling a prompt, in tokens: its length plus its expected response length.

    The expected response length is the prompt's mean response length the last time it was sampled (long
    chains of thought are a property of the problem, so they recur), else the mean response length of
    everything sampled so far (0 before the first request: the prompt's length alone). The history keeps
    the ``max_prompts`` most recently sampled prompts. ``state_dict`` is JSON-serialisable."""

    def __init__(self, *, max_prompts: int = 1 << 20):
        self.max_prompts = max_prompts
        self._last: OrderedDict[str, float] = OrderedDict()  # prompt key -> mean response length
        self._num_responses = 0
        self._num_response_tokens = 0

    def costs(self, prompts: list[list[int]]) -> list[float]:
        """Expected cost of each prompt, in tokens (see the class docstring)."""
        default = self._num_response_tokens / self._num_responses if self._num_responses else 0.0
        return [len(p) + self._last.get(_prompt_key(p), default) for p in prompts]

    def observe(self, prompts: list[list[int]], outputs: list[RolloutOutput]) -> None:
        """Record the response lengths of ``outputs`` (``prompt_index`` into ``prompts``)."""
        totals: dict[int, list[int]] = {}
        for out in outputs:
            entry = totals.setdefault(out.prompt_index, [0, 0])
            entry[0] += len(out.token_ids)
            entry[1] += 1
        for i, (num_tokens, count) in totals.items():
            key = _prompt_key(prompts[i])
            self._last.pop(key, None)
            self._last[key] = num_tokens / count
            self._num_response_tokens += num_tokens
            self._num_responses += count
        while len(self._last) > self.max_prompts:
            self._last.popitem(last=False)

    def state_dict(self) -> dict:
        """The history as JSON-serialisable values (prompt key -> mean response length, and the totals)."""
        return {"last": dict(self._last), "num_responses": self._num_responses,
                "num_response_tokens": self._num_response_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` result (keys and values as JSON gave them back)."""
        self._last = OrderedDict((str(k), float(v)) for k, v in state["last"].items())
        self._num_responses = int(state["num_responses"])
        self._num_response_tokens = int(state["num_response_tokens"])


def place_shard(slots: list[list[RolloutOutput] | None], shard: list[RolloutOutput], *, indices: list[int],
                n: int, source: str) -> None:
    """Put the outputs of the prompts ``indices`` (sampled as their own request, in that order) into
    ``slots`` (one list of ``n`` outputs per prompt of the whole request), with ``prompt_index`` made global;
    RuntimeError naming ``source`` if the count or the grouping is not ``n`` per prompt."""
    if len(shard) != len(indices) * n:
        raise RuntimeError(f"{source} returned {len(shard)} responses for {len(indices)} prompts x n={n} "
                           f"(expected {len(indices) * n})")
    for k, i in enumerate(indices):
        group = shard[k * n:(k + 1) * n]
        if any(out.prompt_index != k for out in group):
            raise RuntimeError(f"{source} returned responses out of prompt order (prompt {k} of its shard)")
        for out in group:
            out.prompt_index = i
        slots[i] = group


def gather_slots(slots: list[list[RolloutOutput] | None]) -> list[RolloutOutput]:
    """The outputs of every prompt, in prompt order (every slot must have been filled)."""
    missing = [i for i, group in enumerate(slots) if group is None]
    assert not missing, f"prompts without responses: {missing}"
    return [out for group in slots for out in group]


class MultiEngine(RolloutEngine):
    """``RolloutEngine`` over ``engines`` (at least one), each a ``RolloutEngine`` holding the same weights."""

    def __init__(self, engines: list):
        if not engines:
            raise ValueError("MultiEngine needs at least one engine")
        self.engines = list(engines)
        self._pool = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="rollout-engine")
        self.cost_model = CostModel()

    def __len__(self) -> int:
        return len(self.engines)

    def _on_all(self, method: str, *args) -> list:
        """Call ``engine.method(*args)`` on every engine concurrently; raise the first failure (naming the
        engine) after all have returned."""
        futures = [self._pool.submit(getattr(e, method), *args) for e in self.engines]
        results, first_error = [], None
        for i, future in enumerate(futures):
            try:
                results.append(future.result())
            except Exception as e:  # noqa: BLE001 - re-raised below with the engine's index
                results.append(None)
                if first_error is None:
                    first_error = (i, e)
        if first_error is not None:
            i, e = first_error
            raise RuntimeError(f"rollout engine {i} of {len(self.engines)} failed in {method}: {e!r}") from e
        return results

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        """One shard per engine, split by expected cost and sampled concurrently (module docstring); the
        outputs in prompt order with global ``prompt_index``. RuntimeError naming the engine that failed."""
        parts = balanced_split(self.cost_model.costs(prompt_token_ids), len(self.engines))
        futures = {}
        for i, indices in enumerate(parts):
            if indices:
                shard_sampling = sampling if sampling.seed is None else _with_seed(
                    sampling, shard_seed(sampling.seed, "engine", i))
                futures[i] = self._pool.submit(self.engines[i].generate, [prompt_token_ids[j] for j in indices],
                                               shard_sampling)
        slots: list = [None] * len(prompt_token_ids)
        for i, future in futures.items():
            try:
                shard = future.result()
            except Exception as e:  # noqa: BLE001
                for other in futures.values():
                    other.cancel()
                raise RuntimeError(f"rollout engine {i} of {len(self.engines)} failed to generate prompts "
                                   f"{_describe(parts[i])}: {e!r}") from e
            place_shard(slots, shard, indices=parts[i], n=sampling.n, source=f"rollout engine {i}")
        outputs = gather_slots(slots)
        self.cost_model.observe(prompt_token_ids, outputs)
        return outputs

    def state_dict(self) -> dict:
        """The split's cost history (``CostModel.state_dict``), for a resume that splits as before."""
        return self.cost_model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the split's cost history."""
        self.cost_model.load_state_dict(state)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Hand the bucket to every engine in turn: in-process engines copy from the same tensors."""
        for engine in self.engines:
            engine.update_weights(named_tensors)

    def finish_weight_update(self) -> None:
        """Finish the sync on every engine concurrently; RuntimeError naming the first that failed."""
        self._on_all("finish_weight_update")

    def weight_transport(self):
        """A ``FanOutTransport`` over every engine's own transport."""
        from fipo_megatron.weights.transport import FanOutTransport

        return FanOutTransport([e.weight_transport() for e in self.engines])

    def connect_weight_sync(self) -> None:
        """Each engine joins its own weight-sync group, one after the other: each binds its own port."""
        for engine in self.engines:
            engine.connect_weight_sync()

    def release_memory(self) -> None:
        """``release_memory`` on every engine concurrently; RuntimeError naming the first that failed."""
        self._on_all("release_memory")

    def resume_memory(self) -> None:
        """``resume_memory`` on every engine concurrently; RuntimeError naming the first that failed."""
        self._on_all("resume_memory")

    def shutdown(self) -> None:
        """Shut every engine down, even if one fails (the first failure is raised), then the thread pool."""
        try:
            self._on_all("shutdown")
        finally:
            self._pool.shutdown(wait=False)


def _describe(indices: list[int]) -> str:
    """'3..7' for a contiguous run, else the list (shortened)."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return str(indices if len(indices) <= 8 else indices[:8] + ["..."])


def _with_seed(sampling: SamplingParams, seed: int) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(sampling, seed=seed)
