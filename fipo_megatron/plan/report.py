"""The plan as a whole: dry run, memory, verdict, the smallest fix, and the printed report.

    plan = make_plan("examples/configs/qwen2.5_32b_fipo.yaml", overrides=[], nnodes=4)
    print(format_plan(plan)); plan.verdict    # "fits" | "does not fit" | "layout error" | "mapping error"
"""

from __future__ import annotations

import dataclasses
import time

from fipo_megatron.config import FipoConfig, load_config
from fipo_megatron.plan.dry_run import DryRun, dry_run
from fipo_megatron.plan.memory import GiB, MemoryPlan, ModelDims, estimate, micro_batch_tokens
from fipo_megatron.plan.recipe import Cluster, default_cluster, hf_state_shapes, load_hf_config

VERDICTS = ("fits", "does not fit", "layout error", "mapping error")


@dataclasses.dataclass(kw_only=True)
class Plan:
    """Everything ``python -m fipo_megatron.plan`` prints."""

    config_path: str | None
    overrides: list[str]
    cfg: FipoConfig | None
    cluster: Cluster | None
    hf_source: str
    dry: DryRun | None
    memory: MemoryPlan | None
    verdict: str
    messages: list[str]               # why the verdict (names the setting)
    suggestions: list[str]            # single changes that make it fit, smallest first
    warnings: list[str]
    seconds: float


# Single changes tried when a plan does not fit, least disruptive first.
def _candidates(cfg: FipoConfig, cluster: Cluster) -> list[tuple[str, list[str]]]:
    p, a = cfg.parallel, cfg.actor
    out = []
    if a.recompute != "full":
        out.append(("actor.recompute=full", ["actor.recompute=full"]))
    if not p.use_distributed_optimizer:
        out.append(("parallel.use_distributed_optimizer=true", ["parallel.use_distributed_optimizer=true"]))
    for factor in (2, 4):
        out.append((f"parallel.cp={p.cp * factor}", [f"parallel.cp={p.cp * factor}"]))
    out.append((f"parallel.pp={p.pp * 2}", [f"parallel.pp={p.pp * 2}"]))
    mb, longest = micro_batch_tokens(cfg)
    if a.max_tokens_per_micro_batch > longest:
        out.append((f"actor.max_tokens_per_micro_batch={longest}", [f"actor.max_tokens_per_micro_batch={longest}"]))
    half = cfg.data.max_response_length // 2
    out.append((f"data.max_response_length={half}", [f"data.max_response_length={half}"]))
    return out


def _memory_only(cfg: FipoConfig, cluster: Cluster, hf_config) -> MemoryPlan | None:
    from fipo_megatron.parallel.topology import validate_layout

    try:
        validate_layout(cfg.parallel, world_size=cluster.world_size, num_attention_heads=hf_config.num_attention_heads,
                        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
                        num_layers=hf_config.num_hidden_layers, on_cpu=False)
    except ValueError:
        return None
    return estimate(cfg, cluster, ModelDims.from_hf(hf_config, tp=cfg.parallel.tp))


def suggest(cfg: FipoConfig, cluster: Cluster, hf_config) -> list[str]:
    """Single setting changes under which the plan fits (each re-validated as a whole config), in order."""
    from fipo_megatron.config import config_from_dict, config_to_dict
    from fipo_megatron.config_loader import merge_nested, parse_overrides

    base = config_to_dict(cfg)
    out = []
    for label, change in _candidates(cfg, cluster):
        try:
            trial = config_from_dict(merge_nested(base, parse_overrides(change)))
        except ValueError:
            continue
        plan = _memory_only(trial, cluster, hf_config)
        if plan is not None and plan.fits:
            out.append(f"{label}: peak {plan.peak / GiB:.1f} GiB, headroom {plan.headroom / GiB:.1f} GiB")
    return out


def _warnings(cfg: FipoConfig, hf_config) -> list[str]:
    out = []
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos and longest > max_pos:
        out.append(f"data.max_prompt_length + max_response_length = {longest} exceeds the model's "
                   f"max_position_embeddings {max_pos}: raise it in the checkpoint's config.json (actor and engine "
                   f"read it from model.path)")
    return out


def make_plan(config_path: str | None, *, overrides: list[str] | tuple[str, ...] = (), nnodes: int | None = None,
              gpus_per_node: int = 8, gpu_memory_gib: float = 79.6, reserve_gib: float = 4.0,
              hf_config_path: str | None = None, mapping=None) -> Plan:
    """Validate, dry-run and plan a recipe; never raises for a bad recipe (the verdict says why)."""
    t0 = time.perf_counter()
    overrides = list(overrides)

    def failed(verdict: str, message: str, **kw) -> Plan:
        fields = dict(config_path=config_path, overrides=overrides, cfg=None, cluster=None, hf_source="", dry=None,
                      memory=None, verdict=verdict, messages=[message], suggestions=[], warnings=[])
        fields.update(kw)
        return Plan(**fields, seconds=time.perf_counter() - t0)

    try:
        cfg = load_config(config_path, overrides=overrides)
        cluster = default_cluster(cfg, nnodes=nnodes, gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gib,
                                  reserve_gib=reserve_gib)
        hf_config, hf_source = load_hf_config(cfg, hf_config_path=hf_config_path)
        ModelDims.from_hf(hf_config, tp=cfg.parallel.tp)  # unsupported architecture: a layout error
    except ValueError as err:
        return failed("layout error", str(err))
    common = dict(cfg=cfg, cluster=cluster, hf_source=hf_source, warnings=_warnings(cfg, hf_config))
    if cfg.rollout.placement == "per_node":
        from fipo_megatron.rollout.node_engines import node_leaders

        try:
            node_leaders(cluster.world_size, cluster.gpus_per_node)  # any layout works; whole nodes needed
        except ValueError as err:
            return failed("layout error", str(err), **common)
    try:
        dry = dry_run(cfg, hf_config, world_size=cluster.world_size, hf_shapes=hf_state_shapes(hf_config),
                      mapping=mapping)
    except ValueError as err:
        return failed("layout error", str(err), **common)
    stage_params = {}
    for role in dry.roles:
        stage_params.setdefault(role.pp_rank, role.param_numels)
    memory = estimate(cfg, cluster, ModelDims.from_hf(hf_config, tp=cfg.parallel.tp), stage_params=stage_params)
    if dry.problems:
        verdict, messages = "mapping error", list(dry.problems)
    elif memory.fits:
        verdict, messages = "fits", []
    else:
        verdict, messages = "does not fit", list(memory.problems)
    suggestions = suggest(cfg, cluster, hf_config) if verdict == "does not fit" else []
    return Plan(config_path=config_path, overrides=overrides, dry=dry, memory=memory, verdict=verdict,
                messages=messages, suggestions=suggestions, seconds=time.perf_counter() - t0, **common)


def _gib(n: int) -> str:
    return f"{n / GiB:7.2f} GiB"


def format_plan(plan: Plan, *, shard_keys: bool = False) -> str:
    """The report, as the CLI prints it. ``shard_keys``: list every rank role's checkpoint shards."""
    out = []
    title = plan.config_path or "(no config file)"
    if plan.overrides:
        title += " " + " ".join(plan.overrides)
    out.append(f"plan: {title}")
    cfg, c = plan.cfg, plan.cluster
    if cfg is not None and c is not None:
        p = cfg.parallel
        dp = c.world_size // p.model_parallel_size if c.world_size % p.model_parallel_size == 0 else "-"
        out.append(f"cluster: {c.nnodes} node(s) x {c.gpus_per_node} GPUs = {c.world_size}, {c.gpu_memory_gib:g} GiB "
                   f"each ({c.reserve_gib:g} GiB reserved)")
        out.append(f"model: {plan.hf_source}")
        out.append(f"layout: tp {p.tp} x pp {p.pp} (vpp {p.num_virtual_stages}) x cp {p.cp} x dp {dp}; sequence "
                   f"parallel {p.sequence_parallel}, distributed optimizer {p.use_distributed_optimizer}, recompute "
                   f"{cfg.actor.recompute}, {cfg.actor.params_dtype}")
    d = plan.dry
    if d is not None:
        out.append("")
        out.append(f"dry run: {len(d.roles)} rank roles started in a fake group of {c.world_size} ranks, "
                   f"GPTModel built on meta ({d.seconds:.1f} s)")
        out.append("  rank  pp tp cp  layers      params      embed/out  ckpt shards  exported HF tensors")
        for r in d.roles:
            layers = ",".join(f"{a}-{b}" for a, b in r.layers)
            eo = ("E" if r.has_embedding else "-") + ("O" if r.has_output else "-")
            out.append(f"  {r.rank:4d}  {r.pp_rank:2d} {r.tp_rank:2d} {r.cp_rank:2d}  {layers:10s}  "
                       f"{r.num_params:>13,d}  {eo:^9s}  {len(r.shards):11d}  {len(r.exported) or '':>19}")
        out.append(f"  HF model: {d.num_hf_tensors} tensors; checkpoint: {d.num_checkpoint_keys} keys; mapping, export, "
                   f"load and checkpoint shards: {'all consistent' if not d.problems else f'{len(d.problems)} problem(s)'}")
        keys: dict[str, tuple] = {}
        for r in d.roles:
            for sh in r.shards:
                keys.setdefault(sh.key, sh.global_shape)
        out.append("  checkpoint keys (global shapes; every rank's shards tile them; --shard-keys lists each rank's):")
        for key, shape in keys.items():
            out.append(f"    {key} {tuple(shape)}")
        if shard_keys:
            for r in d.roles:
                out.append(f"  rank {r.rank} (pp {r.pp_rank}, tp {r.tp_rank}, cp {r.cp_rank}) checkpoint shards:")
                for s in r.shards:
                    out.append(f"    {s.key} global {s.global_shape} offset {s.global_offset} local {s.local_shape}")
    m = plan.memory
    if m is not None:
        out.append("")
        out.append(f"memory per GPU, training (worst rank: pipeline stage {m.train_stage}; micro-batch of "
                   f"{m.tokens_per_micro_batch} tokens, {m.tokens_per_gpu} per GPU after CP; "
                   f"{m.num_micro_batches} micro-batches per mini-batch and DP rank):")
        for line in m.train:
            out.append(f"  {line.label:30s} {_gib(line.nbytes)}   {line.note}")
        out.append(f"  {'total':30s} {_gib(m.train_total)}")
        out.append("memory per GPU, rollout (engine GPUs):")
        for line in m.rollout:
            out.append(f"  {line.label:30s} {_gib(line.nbytes)}   {line.note}")
        out.append(f"  {'total':30s} {_gib(m.rollout_total)}")
        e = m.engine
        if e.get("gpus"):
            where = "every node" if e["per_node"] else "node 0"
            out.append(f"  engine: {e['num_engines']} x {e['kind']} (TP {e['tp']}) on {where}, {e['gpus']} GPU(s) in all")
        out.append(f"usable {_gib(m.capacity).strip()}, peak {_gib(m.peak).strip()}, headroom {_gib(m.headroom).strip()}")
    for w in plan.warnings:
        out.append(f"warning: {w}")
    out.append("")
    out.append(f"verdict: {plan.verdict.upper()}")
    for msg in plan.messages:
        out.append(f"  - {msg}")
    if plan.suggestions:
        out.append("smallest change that fits: " + plan.suggestions[0])
        for s in plan.suggestions[1:]:
            out.append(f"  also fits: {s}")
    elif plan.verdict == "does not fit":
        out.append("no single change of recompute, CP, PP, distributed optimizer or token budget fits: add nodes")
    out.append(f"({plan.seconds:.1f} s)")
    return "\n".join(out)
