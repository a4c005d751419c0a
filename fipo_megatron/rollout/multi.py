"""Engine data parallelism: several rollout engines behind one ``RolloutEngine``.

    engine = get_engine("sglang", model_path=p, tp_size=4, num_engines=2)   # GPUs 0-3 and 4-7 of rank 0's node
    engine = get_engine("sglang_server", base_urls=[url_a, url_b],   # two servers (SGLangServerPool)
                        weight_sync={"master_port": 29600, "engine_world_size": 4})
    outs = engine.generate(prompts, sampling)      # prompts split across engines, run concurrently

- ``generate``: the prompts are cut into contiguous, near-equal shards (all ``n`` samples of a prompt stay
  on one engine, so its prefix cache serves them), the engines run concurrently in threads (their work
  happens in their own processes or servers), and the outputs come back in prompt order with global
  ``prompt_index``. With a ``seed``, engine ``i`` samples with ``shard_seed(seed, "engine", i)`` (engine 0
  with ``seed`` itself), so a run is reproducible for a fixed engine count (not across counts).
- Weights: ``weight_transport()`` fans every bucket out to each engine's own transport
  (``weights.transport.FanOutTransport``): in-process copies for colocated engines. Several SGLang
  servers are a ``rollout.sglang_engine.SGLangServerPool`` instead (this class plus one weight group
  spanning all servers, so one broadcast per tensor reaches every server).
- Memory release/resume, cache flushes and shutdown go to every engine; shutdown stops all of them even if
  one fails, then raises the first failure.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from fipo_megatron.log import get_logger
from fipo_megatron.rollout.base import RolloutEngine, RolloutOutput, SamplingParams, shard_seed

logger = get_logger(__name__)


def shard_ranges(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """``num_parts`` contiguous ``[start, end)`` ranges covering ``range(num_items)`` in order, sizes differing
    by at most one (trailing ones empty when there are fewer items than parts)."""
    base, extra = divmod(num_items, num_parts)
    ranges, start = [], 0
    for i in range(num_parts):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def append_shard(outputs: list[RolloutOutput], shard: list[RolloutOutput], *, start: int, end: int, n: int,
                 source: str) -> None:
    """Append the outputs of prompts ``[start, end)`` (sampled as their own request) to ``outputs``, with
    ``prompt_index`` made global; RuntimeError naming ``source`` if the count is not ``(end - start) * n``."""
    if len(shard) != (end - start) * n:
        raise RuntimeError(f"{source} returned {len(shard)} responses for {end - start} prompts x n={n} "
                           f"(expected {(end - start) * n})")
    for out in shard:
        out.prompt_index += start
    outputs.extend(shard)


def split_evenly(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """``shard_ranges`` without the empty ranges."""
    return [(a, b) for a, b in shard_ranges(num_items, num_parts) if b > a]


class MultiEngine(RolloutEngine):
    """``RolloutEngine`` over ``engines`` (at least one), each a ``RolloutEngine`` holding the same weights."""

    def __init__(self, engines: list):
        if not engines:
            raise ValueError("MultiEngine needs at least one engine")
        self.engines = list(engines)
        self._pool = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="rollout-engine")

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
        shards = split_evenly(len(prompt_token_ids), len(self.engines))
        futures = []
        for i, (start, end) in enumerate(shards):
            shard_sampling = sampling if sampling.seed is None else _with_seed(
                sampling, shard_seed(sampling.seed, "engine", i))
            futures.append(self._pool.submit(self.engines[i].generate, prompt_token_ids[start:end], shard_sampling))
        outputs: list[RolloutOutput] = []
        for i, ((start, end), future) in enumerate(zip(shards, futures)):
            try:
                shard = future.result()
            except Exception as e:  # noqa: BLE001
                for other in futures:
                    other.cancel()
                raise RuntimeError(f"rollout engine {i} of {len(self.engines)} failed to generate prompts "
                                   f"{start}..{end - 1}: {e!r}") from e
            append_shard(outputs, shard, start=start, end=end, n=sampling.n, source=f"rollout engine {i}")
        return outputs

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        for engine in self.engines:  # in order: in-process engines copy from the same tensors
            engine.update_weights(named_tensors)

    def finish_weight_update(self) -> None:
        self._on_all("finish_weight_update")

    def weight_transport(self):
        from fipo_megatron.weights.transport import FanOutTransport

        return FanOutTransport([e.weight_transport() for e in self.engines])

    def connect_weight_sync(self) -> None:
        for engine in self.engines:  # one rendezvous at a time: each binds its own port
            engine.connect_weight_sync()

    def release_memory(self) -> None:
        self._on_all("release_memory")

    def resume_memory(self) -> None:
        self._on_all("resume_memory")

    def shutdown(self) -> None:
        try:
            self._on_all("shutdown")
        finally:
            self._pool.shutdown(wait=False)


def _with_seed(sampling: SamplingParams, seed: int) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(sampling, seed=seed)
