"""Colocated engines on every node (``rollout.placement: per_node``): each node's first rank drives an engine
on that node's GPUs, so every GPU of the job samples during the rollout phase, not only rank 0's node.

    rank 0                                      first rank of node k > 0
    NodeEngines(local, group, leaders)          serve_rollouts(local, group)   # until rank 0 ends the phase
      .generate(prompts, sampling)  ── shards ──>  local.generate(shard)
                                    <── outputs ─
      .end_phase()                  ── "done" ──>  return

- Rank 0 keeps the data, the scoring and the filtering; ``generate`` splits the prompts by expected cost
  (``rollout.multi.balanced_split`` with rank 0's ``CostModel``; all ``n`` samples of a prompt on one node),
  sends the shards over a gloo group of the node leaders, samples its own shard, and gathers the rest, in
  prompt order. With a ``seed``, node ``k`` samples with ``shard_seed(seed, "node", k)``. A node's failure
  comes back as an error naming the node; rank 0 raises it.
- Weights (``NodeWeightSync``), whatever the layout:
  - ``local``: when every node holds whole model replicas (``pp == 1`` and ``tp x cp`` dividing the ranks
    per node), each leader's engine is fed by its own node's replica (``weights.export`` with
    ``exporting_replica``): the TP all-gathers stay inside the node and no weight crosses nodes.
  - ``broadcast``: otherwise (a pipeline, or a replica spread over nodes), each stage's exporting rank
    broadcasts its buckets to every leader (``weights.export.broadcast_hf_buckets``: one broadcast per
    bucket over a group of the leaders and the stage sources, NCCL on GPUs, every bucket checked on
    arrival); each node receives the whole model once per sync.
- Every leader releases and resumes its own engine around training (the trainer calls these on every rank
  holding an engine).
"""

from __future__ import annotations

import dataclasses
import math

import torch.distributed as dist

from fipo_megatron.log import get_logger
from fipo_megatron.rollout.base import RolloutEngine, RolloutOutput, SamplingParams, shard_seed
from fipo_megatron.rollout.multi import CostModel, balanced_split, gather_slots, place_shard

logger = get_logger(__name__)

_DONE = "done"
_GENERATE = "generate"


def node_leaders(world_size: int, ranks_per_node: int) -> list[int]:
    """The first global rank of each node (torchrun numbers ranks node by node)."""
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise ValueError(f"rollout.placement=per_node needs the world size ({world_size}) to be a multiple of the "
                         f"ranks per node ({ranks_per_node})")
    return list(range(0, world_size, ranks_per_node))


def weights_stay_on_node(*, tp: int, pp: int, cp: int, ranks_per_node: int) -> bool:
    """Whether every node holds whole model replicas whose first rank is the node's first rank, so each
    node's engine can be fed by its own replica (the ``local`` sync); else the ``broadcast`` sync."""
    return pp == 1 and ranks_per_node % (tp * cp) == 0


def exports_on_this_node(groups, ranks_per_node: int) -> bool:
    """Whether this rank's replica is the one that feeds its node's engine (its first rank leads the node)."""
    replicas_per_node = ranks_per_node // (groups.tp_size * groups.cp_size)
    return groups.cp_rank == 0 and groups.dp_rank % replicas_per_node == 0


class NodeWeightSync:
    """Every node's engine gets the actor's weights after an update (see the module docstring).

    Built on every rank after the model's parallel groups exist (collective: the broadcast sync creates its
    process groups); ``sync`` is called on every rank, with the engine's transport on the node leaders."""

    def __init__(self, groups, *, leaders: list[int], ranks_per_node: int):
        self.groups = groups
        self.leaders = list(leaders)
        self.mode = "local" if weights_stay_on_node(tp=groups.tp_size, pp=groups.pp_size, cp=groups.cp_size,
                                                    ranks_per_node=ranks_per_node) else "broadcast"
        self.route = None
        self.exporting = None
        if self.mode == "local":
            self.exporting = exports_on_this_node(groups, ranks_per_node)
            if groups.rank in self.leaders and not (self.exporting and groups.tp_rank == 0):
                raise RuntimeError(f"rank {groups.rank} leads a node but is not the first rank of a model replica "
                                   f"(tp_rank {groups.tp_rank}, cp_rank {groups.cp_rank}, dp_rank {groups.dp_rank})")
        else:
            from fipo_megatron.weights.export import new_stage_route

            self.route = new_stage_route(groups, self.leaders)
        logger.info("per-node weight sync: %s (%d nodes, tp %d, pp %d, cp %d, dp %d)", self.mode, len(self.leaders),
                    groups.tp_size, groups.pp_size, groups.cp_size, groups.dp_size)

    def sync(self, model_chunks, *, hf_config, transport, bucket_bytes: int, dtype=None,
             fp8: bool = False) -> dict[str, float]:
        """One sync on every rank (``weights.transport.sync_weights``: a failure raises ``WeightSyncError``
        on every rank); ``fp8``: block-FP8 rollout weights, quantised on the receiving leader."""
        from fipo_megatron.weights.transport import sync_weights

        assert (transport is not None) == (self.groups.rank in self.leaders), (self.groups.rank, self.leaders)
        return sync_weights(model_chunks, groups=self.groups, hf_config=hf_config, transport=transport,
                            bucket_bytes=bucket_bytes, dtype=dtype, destination="rank0",
                            exporting_replica=self.exporting, route=self.route, fp8=fp8)


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
        self.cost_model = CostModel()

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        """One shard per node, split by expected cost: sent to the node leaders, rank 0's own sampled here,
        the rest gathered back in prompt order (module docstring). RuntimeError naming a node that failed."""
        parts = balanced_split(self.cost_model.costs(prompt_token_ids), len(self.leaders))
        shards = [[prompt_token_ids[j] for j in indices] for indices in parts]
        dist.broadcast_object_list([(_GENERATE, shards, sampling)], src=0, group=self.group)
        mine = _generate_shard(self.local, shards[0], _seeded(sampling, 0))
        gathered: list = [None] * len(self.leaders)
        dist.gather_object(mine, gathered, dst=0, group=self.group)
        slots: list = [None] * len(prompt_token_ids)
        for k, (indices, (error, shard)) in enumerate(zip(parts, gathered)):
            if error is not None:
                raise RuntimeError(f"rollout on node {k} (rank {self.leaders[k]}) failed for prompts "
                                   f"{indices if len(indices) <= 8 else indices[:8] + ['...']}: {error}")
            place_shard(slots, shard, indices=indices, n=sampling.n, source=f"node {k}")
        outputs = gather_slots(slots)
        self.cost_model.observe(prompt_token_ids, outputs)
        return outputs

    def state_dict(self) -> dict:
        """The split's cost history over the nodes (``CostModel.state_dict``) and rank 0's own engine's state,
        for a resume that splits as before (the other leaders' engines: ``RolloutPlacement.engine_state``)."""
        return {"nodes": self.cost_model.state_dict(), "local": self.local.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s result: the nodes' split history and rank 0's own engine's state."""
        self.cost_model.load_state_dict(state["nodes"])
        self.local.load_state_dict(state["local"])

    def end_phase(self) -> None:
        """Release the other leaders from ``serve_rollouts`` (after the last ``generate`` of a phase)."""
        dist.broadcast_object_list([(_DONE, None, None)], src=0, group=self.group)

    # Weights and memory: rank 0's own engine; the other leaders handle theirs (the trainer calls these on
    # every rank that holds an engine, and NodeWeightSync feeds every node).
    def weight_transport(self):
        """Rank 0's own engine's transport."""
        return self.local.weight_transport()

    def update_weights(self, named_tensors) -> None:
        """Into rank 0's own engine."""
        self.local.update_weights(named_tensors)

    def finish_weight_update(self) -> None:
        """Rank 0's own engine's."""
        self.local.finish_weight_update()

    def release_memory(self) -> None:
        """Rank 0's own engine's."""
        self.local.release_memory()

    def resume_memory(self) -> None:
        """Rank 0's own engine's."""
        self.local.resume_memory()

    def shutdown(self) -> None:
        """Rank 0's own engine's (each leader shuts its own down)."""
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


_LAYER_ORDER = ("input_layernorm.weight", "self_attention.linear_proj.weight", "self_attention.linear_qkv.weight",
                "self_attention.linear_qkv.bias", "self_attention.q_layernorm.weight",
                "self_attention.k_layernorm.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
                "mlp.linear_fc2.weight")  # megatron-core's module order in a transformer layer (local spec)


def sync_volume(mapping, *, tp: int, pp: int, cp: int, world_size: int, ranks_per_node: int, bucket_bytes: int,
                dtype_bytes: int = 2) -> dict:
    """What one per-node sync moves, from the model's shapes alone (no tensor is built): for the docs and the
    start-up log, checked against a real sync in the tests.

    Returns ``mode`` (``local``/``broadcast``), ``model_bytes`` (the HF tensors every node's engine loads),
    ``num_buckets`` per stage, ``bytes_received`` per node (what arrives over the network: the stages a node
    does not export itself in ``broadcast`` mode, nothing in ``local`` mode) and ``collectives``: TP
    all-gathers per exporting replica (one per bucket when tp > 1), stage broadcasts over the leaders' group
    (one per bucket) and object exchanges (the manifests), plus the one all-reduce every sync ends with."""
    from fipo_megatron.models.sharding import partition_dim

    leaders = node_leaders(world_size, ranks_per_node)
    local = weights_stay_on_node(tp=tp, pp=pp, cp=cp, ranks_per_node=ranks_per_node)
    names = mapping.megatron_names(backend="local")
    layers_per_stage = mapping.num_layers // pp
    stages: list[list[str]] = [[] for _ in range(pp)]
    for name in names:
        if name.startswith("decoder.layers."):
            stages[int(name.split(".")[2]) // layers_per_stage].append(name)
        else:
            stages[0 if name.startswith("embedding.") else pp - 1].append(name)
    order = {suffix: i for i, suffix in enumerate(_LAYER_ORDER)}
    for stage in stages:  # stable: layers stay in order, each layer's tensors in module order
        stage.sort(key=lambda n: (int(n.split(".")[2]), order[n.split(".", 3)[3]]) if n.startswith("decoder.layers.")
                   else ((-1, 0) if n.startswith("embedding.") else (1 << 30, 0 if "final" in n else 1)))
    num_buckets, stage_bytes = [], []
    for stage in stages:
        buckets, current, total = 0, 0, 0
        for name in stage:
            full = math.prod(mapping.expected_shape(name)) * dtype_bytes
            total += sum(math.prod(mapping.hf_expected_shape(h)) for h in mapping.hf_sources(name)) * dtype_bytes
            if current and current + full > bucket_bytes:
                buckets, current = buckets + 1, 0
            current += full
        num_buckets.append(buckets + (1 if current else 0))
        stage_bytes.append(total)
    sources = [s * world_size // pp for s in range(pp)]
    if local:
        received = [0 for _ in leaders]
    else:
        received = [sum(b for s, b in enumerate(stage_bytes) if not leader <= sources[s] < leader + ranks_per_node)
                    for leader in leaders]
    return {"mode": "local" if local else "broadcast", "model_bytes": sum(stage_bytes), "num_buckets": num_buckets,
            "bytes_received": received,
            "collectives": {"tp_all_gather": sum(num_buckets) if tp > 1 else 0,
                            "stage_broadcast": 0 if local else sum(num_buckets),
                            "object_all_gather": 0 if local else 1, "all_reduce": 1}}


class RolloutPlacement:
    """``rollout.placement`` wired into the job: which ranks hold an engine, what rank 0 drives, and how the
    actor's weights reach each engine. Every rank builds one (``per_node`` makes a gloo group of the node
    leaders, a collective call); ``rank0`` needs no process group at all.

    - ``rank0``: the engine (or its replicas) lives on global rank 0 and every stage exports to it.
    - ``per_node``: an engine on each node's first rank; rank 0 drives them all through ``NodeEngines``
      and the others ``serve`` during rank 0's rollout and validation phases; ``NodeWeightSync`` feeds
      every node's engine (from its own replica, or by stage broadcasts: any layout).
    """

    def __init__(self, placement: str = "rank0"):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group, self.ranks_per_node, self.leaders = None, None, [0]
        self.engine_here = self.rank == 0
        self.weights: NodeWeightSync | None = None
        if placement == "per_node":
            import os

            self.ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
            self.leaders = node_leaders(dist.get_world_size(), self.ranks_per_node)
            self.group = dist.new_group(self.leaders, backend="gloo")  # every rank takes part in new_group
            self.engine_here = self.rank in self.leaders

    def driven_engine(self, engine: RolloutEngine) -> RolloutEngine:
        """What rank 0's rollout drives: its own engine, or (``per_node``) one over every node's engine."""
        if self.group is None or self.rank != 0:
            return engine
        return NodeEngines(engine, group=self.group, leaders=self.leaders)

    def attach(self, groups) -> None:
        """Once the model's parallel groups exist (every rank; ``per_node`` builds ``NodeWeightSync``, whose
        broadcast form creates process groups)."""
        if self.group is not None:
            self.weights = NodeWeightSync(groups, leaders=self.leaders, ranks_per_node=self.ranks_per_node)

    def sync_weights(self, model_chunks, *, groups, engine: RolloutEngine | None, hf_config,
                     bucket_bytes: int, fp8: bool = False) -> dict[str, float]:
        """One weight sync into every engine of the placement (every rank calls it; ``WeightSyncError`` on
        every rank if it fails anywhere). ``fp8``: block-FP8 rollout weights (``weights/fp8.py``)."""
        transport = engine.weight_transport() if engine is not None else None
        if self.group is None:
            from fipo_megatron.weights.transport import sync_weights

            return sync_weights(model_chunks, groups=groups, hf_config=hf_config, transport=transport,
                                destination="rank0", bucket_bytes=bucket_bytes, fp8=fp8)
        assert self.weights is not None, "RolloutPlacement.attach(groups) first"
        return self.weights.sync(model_chunks, hf_config=hf_config, transport=transport, bucket_bytes=bucket_bytes,
                                 fp8=fp8)

    def engine_state(self, engine: RolloutEngine | None) -> dict | None:
        """Every engine's ``state_dict`` (the split histories a resume needs), on rank 0; None elsewhere.
        Every rank calls it (``per_node``: a gather over the node leaders)."""
        if self.group is None:
            return engine.state_dict() if self.rank == 0 else None
        if engine is None:
            return None
        gathered: list | None = [None] * len(self.leaders) if self.rank == 0 else None
        dist.gather_object(None if self.rank == 0 else engine.state_dict(), gathered, dst=0, group=self.group)
        if self.rank != 0:
            return None
        return {"rank0": engine.state_dict(), "leaders": gathered[1:]}

    def load_engine_state(self, engine: RolloutEngine | None, state: dict | None) -> None:
        """Give this rank's engine its part of ``engine_state``'s result (every rank; no collective: every
        rank reads the checkpoint itself). None or {} (a checkpoint without engine state): nothing."""
        if engine is None or not state:
            return
        if self.group is None:
            engine.load_state_dict(state)
        elif self.rank == 0:
            engine.load_state_dict(state["rank0"])
        else:
            engine.load_state_dict(state["leaders"][self.leaders.index(self.rank) - 1])

    def serve(self, engine: RolloutEngine | None) -> None:
        """Node leaders other than rank 0 (``per_node``): sample what rank 0 sends until its phase ends.
        A no-op on every other rank and under ``rank0``."""
        if self.group is not None and engine is not None and self.rank != 0:
            serve_rollouts(engine, group=self.group)
