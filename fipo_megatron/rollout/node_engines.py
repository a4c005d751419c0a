"""Colocated engines on every node (``rollout.placement: per_node``): each node's first rank drives an engine
on that node's GPUs, so every GPU of the job samples during the rollout phase, not only rank 0's node.

    rank 0                                      first rank of node k > 0
    NodeEngines(local, group, leaders)          serve_rollouts(local, group)   # until rank 0 ends the phase
      .generate(prompts, sampling)  ── shards ──>  local.generate(shard)
                                    <── outputs ─
      .end_phase()                  ── "done" ──>  return

- Rank 0 keeps the data, the scoring and the filtering; ``generate`` cuts the prompts into contiguous,
  near-equal shards, one per node (all ``n`` samples of a prompt on one node), sends them over a gloo group
  of the node leaders, samples its own shard, and gathers the rest. With a ``seed``, node ``k`` samples
  with ``shard_seed(seed, "node", k)``. A node's failure comes back as an error naming the node; rank 0 raises it.
- Weights: each leader's engine is fed by its own node's model replica (``weights.export`` with
  ``exporting_replica``): the TP all-gathers stay inside the node and nothing crosses nodes. That needs
  a whole replica per node group: ``pp == 1`` and ``tp x cp`` dividing the ranks per node
  (``check_per_node_layout``).
- Every leader releases and resumes its own engine around training (the trainer calls these on every rank
  holding an engine).
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from fipo_megatron.log import get_logger
from fipo_megatron.rollout.base import RolloutEngine, RolloutOutput, SamplingParams, shard_seed
from fipo_megatron.rollout.multi import append_shard, shard_ranges

logger = get_logger(__name__)

_DONE = "done"
_GENERATE = "generate"


def node_leaders(world_size: int, ranks_per_node: int) -> list[int]:
    """The first global rank of each node (torchrun numbers ranks node by node)."""
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise ValueError(f"rollout.placement=per_node needs the world size ({world_size}) to be a multiple of the "
                         f"ranks per node ({ranks_per_node})")
    return list(range(0, world_size, ranks_per_node))


def check_per_node_layout(*, tp: int, pp: int, cp: int, ranks_per_node: int) -> None:
    """ValueError unless every node holds whole model replicas whose first rank is the node's first rank."""
    if pp != 1:
        raise ValueError(f"rollout.placement=per_node needs parallel.pp == 1 (a pipeline spreads one replica over "
                         f"nodes); got pp={pp}. Use placement=rank0 or SGLang servers (engine: sglang_server)")
    if ranks_per_node % (tp * cp):
        raise ValueError(f"rollout.placement=per_node needs tp x cp ({tp} x {cp}) to divide the ranks per node "
                         f"({ranks_per_node}), so that each node holds whole model replicas")


def exports_on_this_node(groups, ranks_per_node: int) -> bool:
    """Whether this rank's replica is the one that feeds its node's engine (its first rank leads the node)."""
    replicas_per_node = ranks_per_node // (groups.tp_size * groups.cp_size)
    return groups.cp_rank == 0 and groups.dp_rank % replicas_per_node == 0


def _generate_shard(engine, prompts, sampling) -> tuple[str | None, list[RolloutOutput]]:
    if not prompts:
        return None, []
    try:
        return None, engine.generate(prompts, sampling)
    except Exception as e:  # noqa: BLE001 - travels to rank 0, which raises it naming the node
        logger.exception("rollout shard failed on this node")
        return f"{type(e).__name__}: {e}", []


def _seeded(sampling: SamplingParams, k: int) -> SamplingParams:
    return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=shard_seed(sampling.seed, "node", k))


class NodeEngines(RolloutEngine):
    """Rank 0's ``RolloutEngine`` over the engines of every node (see the module docstring)."""

    def __init__(self, local_engine, *, group, leaders: list[int]):
        if dist.get_rank() != 0 or leaders[0] != 0:
            raise ValueError("NodeEngines lives on global rank 0, the first leader")
        self.local = local_engine
        self.group = group
        self.leaders = list(leaders)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        ranges = shard_ranges(len(prompt_token_ids), len(self.leaders))
        shards = [prompt_token_ids[a:b] for a, b in ranges]
        dist.broadcast_object_list([(_GENERATE, shards, sampling)], src=0, group=self.group)
        mine = _generate_shard(self.local, shards[0], _seeded(sampling, 0))
        gathered: list = [None] * len(self.leaders)
        dist.gather_object(mine, gathered, dst=0, group=self.group)
        outputs: list[RolloutOutput] = []
        for k, ((start, end), (error, shard)) in enumerate(zip(ranges, gathered)):
            if error is not None:
                raise RuntimeError(f"rollout on node {k} (rank {self.leaders[k]}) failed for prompts "
                                   f"{start}..{end - 1}: {error}")
            append_shard(outputs, shard, start=start, end=end, n=sampling.n, source=f"node {k}")
        return outputs

    def end_phase(self) -> None:
        """Release the other leaders from ``serve_rollouts`` (after the last ``generate`` of a phase)."""
        dist.broadcast_object_list([(_DONE, None, None)], src=0, group=self.group)

    # Weights and memory: rank 0's own engine; the other leaders handle theirs (see the trainer).
    def weight_transport(self):
        return self.local.weight_transport()

    def update_weights(self, named_tensors) -> None:
        self.local.update_weights(named_tensors)

    def finish_weight_update(self) -> None:
        self.local.finish_weight_update()

    def release_memory(self) -> None:
        self.local.release_memory()

    def resume_memory(self) -> None:
        self.local.resume_memory()

    def shutdown(self) -> None:
        self.local.shutdown()


def serve_rollouts(engine, *, group) -> int:
    """On a node leader other than rank 0: sample the shards rank 0 sends until it ends the phase.
    Returns how many requests were served."""
    served = 0
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        kind, shards, sampling = box[0]
        if kind == _DONE:
            return served
        k = dist.get_rank(group)
        dist.gather_object(_generate_shard(engine, shards[k], _seeded(sampling, k)), None, dst=0, group=group)
        served += 1


class RolloutPlacement:
    """``rollout.placement`` wired into the job: which ranks hold an engine, what rank 0 drives, and which
    model replica feeds which engine. Every rank builds one (``per_node`` makes a gloo group of the node
    leaders, a collective call); ``rank0`` needs no process group at all.

    - ``rank0``: the engine (or its replicas) lives on global rank 0 and every replica exports to it.
    - ``per_node``: an engine on each node's first rank; rank 0 drives them all through ``NodeEngines``
      and the others ``serve`` during rank 0's rollout and validation phases; each node's first replica
      feeds its own node's engine.
    """

    def __init__(self, placement: str = "rank0", *, tp: int = 1, pp: int = 1, cp: int = 1):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group, self.ranks_per_node, self.leaders = None, None, [0]
        self.engine_here = self.rank == 0
        if placement == "per_node":
            import os

            self.ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
            check_per_node_layout(tp=tp, pp=pp, cp=cp, ranks_per_node=self.ranks_per_node)
            self.leaders = node_leaders(dist.get_world_size(), self.ranks_per_node)
            self.group = dist.new_group(self.leaders, backend="gloo")  # every rank takes part in new_group
            self.engine_here = self.rank in self.leaders

    def driven_engine(self, engine: RolloutEngine) -> RolloutEngine:
        """What rank 0's rollout drives: its own engine, or (``per_node``) one over every node's engine."""
        if self.group is None or self.rank != 0:
            return engine
        return NodeEngines(engine, group=self.group, leaders=self.leaders)

    def check_replica(self, groups) -> None:
        """RuntimeError unless each engine sits on the first rank of the model replica that feeds it."""
        if self.group is None or not self.engine_here:
            return
        if not (exports_on_this_node(groups, self.ranks_per_node) and groups.tp_rank == 0):
            raise RuntimeError(f"rank {self.rank} leads a node but is not the first rank of a model replica "
                               f"(tp_rank {groups.tp_rank}, cp_rank {groups.cp_rank}, dp_rank {groups.dp_rank})")

    def exporting_replica(self, groups) -> bool | None:
        """``weights.export``'s ``exporting_replica`` for this rank: None (the default choice) under
        ``rank0``; under ``per_node`` whether this rank's replica feeds its node's engine."""
        return None if self.group is None else exports_on_this_node(groups, self.ranks_per_node)

    def serve(self, engine: RolloutEngine | None) -> None:
        """Node leaders other than rank 0 (``per_node``): sample what rank 0 sends until its phase ends.
        A no-op on every other rank and under ``rank0``."""
        if self.group is not None and engine is not None and self.rank != 0:
            serve_rollouts(engine, group=self.group)
