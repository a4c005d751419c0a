"""Every distinct rank role of a job, started in a fake process group of the full world size, on the meta device.

    result = dry_run(cfg, hf_config, world_size=32)     # one process, no GPU, no memory for weights

A *role* is a (pipeline stage, tensor rank, context rank) triple: data-parallel replicas repeat roles exactly,
and a rank's virtual-pipeline chunks are built together. For each role the process joins torch's fake
backend (``torch.testing._internal.distributed.fake_pg``: collectives return at once, nothing is sent) as
that role's global rank at the full world size, and runs the start-up the trainer runs:

1. ``parallel.topology.initialize_parallel`` (the layout checks against the model: heads and KV heads by
   TP, layers by PP x VPP, world by TP x PP x CP) and checks that the groups it hands out put the rank in
   the role it was started as;
2. ``models.builder.build_model_chunks`` with the actor's model settings under ``torch.device("meta")``:
   the real GPTModel of that rank (padded vocabulary, layer split, tied-output copy), no memory;
3. the load path (``models.sharding.shard_for_tp`` of every full tensor against the parameter it must fill,
   and Megatron's own ``partition_dim`` on the parameter), the dist-checkpoint path (``sharded_state_dict``
   with its factories applied: every key, global shape and offset), and the export path
   (``weights.export.hf_names_and_shapes``: the HF names and shapes a weight sync sends).

Across roles: the exported names and shapes must be the HF model's state dict exactly
(``weights.export.check_against_hf_state_dict``, the HF model built from its config on the meta device);
every HF tensor must feed a Megatron tensor of the right shape (``ModelMapping.hf_to_megatron``); each
checkpoint key's shards must tile its global tensor; every rank's parameter count must equal the analytic
count the memory plan uses. Each failure is a line in ``DryRun.problems``; a layout error raises
``ValueError`` from the start-up code itself.

The model is built with the local layer spec (Transformer Engine needs CUDA). Its parameters, names and
shards equal TE's (the norms carry TE's names in checkpoints and exports); it is built with
``sequence_parallel=False`` because the local spec's torch RMSNorm rejects sequence parallelism, which
changes activations (planned in ``plan.memory``) but no parameter. The layout with sequence parallelism is
still validated by ``initialize_parallel``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time

import torch
import torch.distributed as dist

from fipo_megatron.config import FipoConfig
from fipo_megatron.log import get_logger

logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """One dist-checkpoint entry of a rank: key, the global tensor's shape, this rank's offset and shape."""

    key: str
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    local_shape: tuple[int, ...]


@dataclasses.dataclass(kw_only=True)
class RoleResult:
    """What one rank role holds."""

    rank: int
    pp_rank: int
    tp_rank: int
    cp_rank: int
    num_chunks: int
    layers: list[tuple[int, int]]                 # (first, last) global layer index per chunk
    num_params: int
    param_bytes: int
    num_param_tensors: int
    param_numels: list[int]                       # per parameter, in model order (DDP's buffer layout)
    has_embedding: bool
    has_output: bool
    shards: list[ShardInfo]
    exported: list[tuple[str, tuple[int, ...]]]   # HF (name, shape) this role's stage sends (tp 0, cp 0 only)


@dataclasses.dataclass(kw_only=True)
class DryRun:
    """The roles and every inconsistency found (empty ``problems``: the layout loads, saves and exports)."""

    roles: list[RoleResult]
    problems: list[str]
    num_hf_tensors: int
    num_checkpoint_keys: int
    seconds: float


def role_rank(*, tp_rank: int, cp_rank: int, pp_rank: int, tp: int, cp: int, dp: int, dp_rank: int = 0) -> int:
    """Global rank of a role in Megatron's default order ``tp-cp-ep-dp-pp`` (tp fastest, ep = 1)."""
    return tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))


def model_overrides(cfg: FipoConfig) -> dict:
    """The ``TransformerConfig`` overrides ``MegatronActor`` builds its model with (kept equal to it)."""
    overrides = dict(calculate_per_token_loss=True, **cfg.actor.recompute_overrides())
    if cfg.parallel.pp > 1:
        overrides.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    return overrides


def _fake_backend():
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as err:  # pragma: no cover - every torch >= 2.2 ships it
        raise RuntimeError(f"torch's fake process group is unavailable ({err}); the plan needs torch >= 2.2") from err
    return FakeStore


def _init_megatron_groups(cfg: FipoConfig) -> None:
    from megatron.core import parallel_state as ps

    p = cfg.parallel
    kwargs = dict(tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp, context_parallel_size=p.cp,
                  virtual_pipeline_model_parallel_size=p.vpp if p.vpp and p.vpp > 1 else None)
    # Gloo side groups would open real sockets; the fake backend cannot back them.
    if "create_gloo_process_groups" in inspect.signature(ps.initialize_model_parallel).parameters:
        kwargs["create_gloo_process_groups"] = False
    ps.initialize_model_parallel(**kwargs)


def _shards(chunks) -> list[ShardInfo]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from fipo_megatron.checkpoint.dist_ckpt import _CONTENT_METADATA
    from fipo_megatron.models.sharding import unwrap_model

    out = []
    for chunk in chunks:
        state = unwrap_model(chunk).sharded_state_dict(metadata=dict(_CONTENT_METADATA))
        apply_factories(state)
        for value in nested_values(state):
            if isinstance(value, ShardedTensor):
                out.append(ShardInfo(key=value.key, global_shape=tuple(value.global_shape),
                                     global_offset=tuple(value.global_offset), local_shape=tuple(value.local_shape)))
    return out


def _check_params(chunks, *, mapping, groups, problems: list[str], check_partition_dim: bool) -> None:
    """The load path: every full tensor sharded by ``shard_for_tp`` must fit the parameter it fills."""
    from fipo_megatron.models.sharding import local_params, partition_dim, shard_for_tp

    for name, (_, param, _) in local_params(chunks).items():
        try:
            full_shape = mapping.expected_shape(name)
        except ValueError as err:
            problems.append(f"rank {groups.rank}: {err}")
            continue
        ours = partition_dim(name)
        theirs = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
        if check_partition_dim and ours != theirs:
            problems.append(f"{name}: Megatron splits it on dim {theirs}, models.sharding on dim {ours}")
        shard = shard_for_tp(name, torch.empty(full_shape, device="meta"), tp_rank=groups.tp_rank,
                             tp_size=groups.tp_size)
        if tuple(shard.shape) != tuple(param.shape):
            problems.append(f"{name}: the full tensor {tuple(full_shape)} shards to {tuple(shard.shape)} on tp rank "
                            f"{groups.tp_rank}, the parameter is {tuple(param.shape)}")


def _check_shard_shapes(shards: list[ShardInfo], *, mapping, problems: list[str]) -> None:
    """A checkpoint key's global shape must be the mapping's full shape (layers stacked on dim 0)."""
    from fipo_megatron.models.sharding import canonical_name

    seen = set()
    for s in shards:
        if s.key in seen:
            continue
        seen.add(s.key)
        if s.key.startswith("decoder.layers."):
            name, shape = f"decoder.layers.0.{s.key[len('decoder.layers.'):]}", s.global_shape[1:]
            if s.global_shape[0] != mapping.num_layers:
                problems.append(f"checkpoint key {s.key}: {s.global_shape[0]} stacked layers, the model has "
                                f"{mapping.num_layers}")
        else:
            name, shape = s.key, s.global_shape
        try:
            want = mapping.expected_shape(canonical_name(name))
        except ValueError as err:
            problems.append(f"checkpoint key {s.key}: {err}")
            continue
        if tuple(shape) != tuple(want):
            problems.append(f"checkpoint key {s.key}: global shape {tuple(shape)}, the mapping expects {tuple(want)}")


def _check_tiling(shards: list[ShardInfo], problems: list[str]) -> int:
    """Each key's distinct shards must cover its global tensor exactly; returns the number of keys."""
    by_key: dict[str, dict[tuple, int]] = {}
    shapes: dict[str, tuple] = {}
    for s in shards:
        by_key.setdefault(s.key, {})[s.global_offset] = math.prod(s.local_shape)
        shapes[s.key] = s.global_shape
    for key, parts in by_key.items():
        covered, total = sum(parts.values()), math.prod(shapes[key])
        if covered != total:
            problems.append(f"checkpoint key {key}: the ranks' shards cover {covered} of {total} elements")
    return len(by_key)


def _check_hf_coverage(exported, hf_shapes, *, mapping, problems: list[str]) -> None:
    """Both directions against the HF model itself: what an export sends, and what a load consumes."""
    from fipo_megatron.weights.export import check_against_hf_state_dict

    try:
        check_against_hf_state_dict(exported, hf_shapes, tied_word_embeddings=mapping.tie_word_embeddings)
    except ValueError as err:
        problems.append(str(err))
    expected = {k for k in hf_shapes if not (mapping.tie_word_embeddings and k == "lm_head.weight")}
    try:
        consumed = set(mapping.hf_names())
    except ValueError as err:
        problems.append(f"mapping: {err}")
        return
    if expected - consumed:
        problems.append(f"HF tensors no Megatron parameter is loaded from: {sorted(expected - consumed)}")
    if consumed - set(hf_shapes):
        problems.append(f"the mapping reads HF tensors the model does not have: {sorted(consumed - set(hf_shapes))}")
    metas = {k: torch.empty(v, device="meta") for k, v in hf_shapes.items()}
    for name in mapping.megatron_names(backend="te"):
        sources = mapping.hf_sources(name)
        if any(s not in metas for s in sources):
            continue  # reported above
        try:
            built = mapping.hf_to_megatron(name, {s: metas[s] for s in sources})
        except ValueError as err:
            problems.append(f"loading {name}: {err}")
            continue
        if tuple(built.shape) != tuple(mapping.expected_shape(name)):
            problems.append(f"loading {name}: built {tuple(built.shape)} from HF, expected {mapping.expected_shape(name)}")


def _run_role(cfg: FipoConfig, hf_config, *, world_size: int, tp_rank: int, cp_rank: int, pp_rank: int,
              mapping, problems: list[str], export: bool, same_as: RoleResult | None = None) -> RoleResult:
    from megatron.core import parallel_state as ps

    from fipo_megatron.actor.forward import install_hidden_states_output
    from fipo_megatron.models.builder import build_model_chunks
    from fipo_megatron.models.sharding import chunk_layer_offset, local_params, unwrap_model
    from fipo_megatron.parallel.topology import destroy_parallel, initialize_parallel
    from fipo_megatron.weights.export import hf_names_and_shapes

    p = cfg.parallel
    dp = world_size // p.model_parallel_size
    rank = role_rank(tp_rank=tp_rank, cp_rank=cp_rank, pp_rank=pp_rank, tp=p.tp, cp=p.cp, dp=dp)
    dist.init_process_group("fake", store=_fake_backend()(), rank=rank, world_size=world_size)
    try:
        if world_size % p.model_parallel_size == 0:
            _init_megatron_groups(cfg)
        groups = initialize_parallel(p, hf_config=hf_config, seed=cfg.actor.seed, on_cpu=False)
        got = (groups.pp_rank, groups.tp_rank, groups.cp_rank, groups.dp_rank)
        assert got == (pp_rank, tp_rank, cp_rank, 0), f"rank {rank}: Megatron placed it at {got}"
        if same_as is not None:
            return dataclasses.replace(same_as, rank=rank, cp_rank=cp_rank, exported=[])
        # Megatron sets a parameter's TP attributes while initialising it (an affine init through a full
        # master weight: half a second per 32B stage even on meta); one role per stage pays for it.
        overrides = dict(model_overrides(cfg), perform_initialization=export, sequence_parallel=False)
        with torch.device("meta"):
            chunks = build_model_chunks(hf_config, groups=groups, params_dtype=cfg.actor.torch_params_dtype, seed=None,
                                        backend="local", config_overrides=overrides)
        for chunk in chunks:
            install_hidden_states_output(chunk)
        _check_params(chunks, mapping=mapping, groups=groups, problems=problems, check_partition_dim=export)
        shards = _shards(chunks)
        _check_shard_shapes(shards, mapping=mapping, problems=problems)
        exported = hf_names_and_shapes(chunks, groups=groups, mapping=mapping) if export else []
        params = [param for _, param, _ in local_params(chunks).values()]
        layers = []
        for chunk in chunks:
            n = len(unwrap_model(chunk).decoder.layers)
            first = chunk_layer_offset(chunk)
            layers.append((first, first + n - 1))
        return RoleResult(
            rank=rank, pp_rank=pp_rank, tp_rank=tp_rank, cp_rank=cp_rank, num_chunks=len(chunks), layers=layers,
            num_params=sum(q.numel() for q in params), param_bytes=sum(q.numel() * q.element_size() for q in params),
            num_param_tensors=len(params), param_numels=[q.numel() for q in params],
            has_embedding=any(getattr(unwrap_model(c), "pre_process", False) for c in chunks),
            has_output=any(getattr(unwrap_model(c), "post_process", False) for c in chunks),
            shards=shards, exported=exported)
    finally:
        destroy_parallel()
        if ps.model_parallel_is_initialized():  # pragma: no cover - destroy_parallel failed half-way
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def dry_run(cfg: FipoConfig, hf_config, *, world_size: int, hf_shapes: dict[str, tuple[int, ...]],
            mapping=None) -> DryRun:
    """Start every distinct rank role of ``cfg`` at ``world_size`` on the meta device; see the module doc.

    ``hf_shapes``: the HF model's state-dict shapes (``plan.recipe.hf_state_shapes``). ``mapping``: the
    HF <-> Megatron mapping (default: the registry's, with the padded vocabulary). Raises ``ValueError``
    from the start-up code for a layout that cannot start.
    """
    from fipo_megatron.checkpoint.registry import get_mapping
    from fipo_megatron.models.hf_config import padded_vocab_size

    if dist.is_initialized():
        raise RuntimeError("dry_run needs a process without torch.distributed (it starts fake groups itself)")
    t0 = time.perf_counter()
    p = cfg.parallel
    if mapping is None:
        mapping = get_mapping(hf_config, padded_vocab_size=padded_vocab_size(hf_config, tp=p.tp))
    problems: list[str] = []
    roles = []
    built: dict[tuple[int, int], RoleResult] = {}
    for pp_rank in range(p.pp):
        for cp_rank in range(p.cp):
            for tp_rank in range(p.tp):
                # CP splits activations, never parameters: a CP rank starts up (its groups are checked) and
                # holds the model of CP rank 0 with the same (pp, tp), which is not built twice.
                role = _run_role(cfg, hf_config, world_size=world_size, tp_rank=tp_rank, cp_rank=cp_rank,
                                 pp_rank=pp_rank, mapping=mapping, problems=problems,
                                 export=tp_rank == 0 and cp_rank == 0, same_as=built.get((pp_rank, tp_rank)))
                built.setdefault((pp_rank, tp_rank), role)
                roles.append(role)
    exported = [item for r in roles for item in r.exported]
    _check_hf_coverage(exported, hf_shapes, mapping=mapping, problems=problems)
    num_keys = _check_tiling([s for r in roles for s in r.shards], problems)
    from fipo_megatron.plan.memory import ModelDims, stage_param_count

    dims = ModelDims.from_hf(hf_config, tp=p.tp)
    for r in roles:
        want = stage_param_count(dims, parallel=p, pp_rank=r.pp_rank)
        if want != r.num_params:
            problems.append(f"rank {r.rank}: the model holds {r.num_params} parameters, the plan counts {want}")
    # A problem found on every tensor rank is one problem.
    problems = list(dict.fromkeys(problems))
    return DryRun(roles=roles, problems=problems, num_hf_tensors=len(hf_shapes), num_checkpoint_keys=num_keys,
                  seconds=time.perf_counter() - t0)
