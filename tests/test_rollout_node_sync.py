"""Engines on every node for layouts where a node does not hold a whole model replica (pp > 1): after each
sync every node's engine holds the full HF-named model (``NodeWeightSync`` in its ``broadcast`` mode,
``weights.export.broadcast_hf_buckets``), on real gloo ranks.

Reference: the Megatron pipeline's own forward pass (stage 0 -> stage 1 over p2p, vocab-sharded logits
gathered over TP): every node's embedded engine must give the same log-probs on fixed sequences, after
each of two syncs with the weights changed in between. Also checked: the names and shapes the receivers
got equal transformers' own state dict of the config; a bucket that arrives wrong, and an engine failing
on one node, make every rank raise ``WeightSyncError`` without a hang, and the next sync works.
"""

from __future__ import annotations

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.testing.tiny_models import tiny_hf_config

pytestmark = pytest.mark.distributed

SEQS = torch.randint(0, 250, (3, 9), generator=torch.Generator().manual_seed(0))
BUCKET_BYTES = (6000, 1 << 22)  # 1st sync: most matrices travel alone; 2nd: one bucket per stage


def _perturb(model, *, step, tp_rank, pp_rank):
    # Norms start at 1 and biases at 0: randomise every 1-D parameter so a mapping mistake shows; replicated
    # ones identically on every TP rank (and on every DP replica: the seed ignores dp_rank).
    from fipo_megatron.models.sharding import partition_dim

    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator().manual_seed(1000 * step + 100 * pp_rank + 10 * i
                                              + (tp_rank if partition_dim(name) is not None else 0))
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif step and "decoder." in name:  # decoder matrices move too on the 2nd sync (the tied
                p.add_(0.05 * torch.randn(p.shape, generator=g))  # embedding's two copies must stay equal)


def _megatron_logp(model, groups, vocab_size):
    """Per-token log-probs of SEQS from this replica's pipeline, on its last stage (None elsewhere)."""
    import torch.distributed as dist

    pos = torch.arange(SEQS.shape[1])[None].expand_as(SEQS)
    pp_ranks = dist.get_process_group_ranks(groups.pp_group)
    with torch.no_grad():
        if not groups.is_first_stage:
            hidden = torch.empty(SEQS.shape[1], SEQS.shape[0], model.config.hidden_size)
            dist.recv(hidden, src=pp_ranks[groups.pp_rank - 1])
            model.set_input_tensor(hidden)
        out = model(SEQS, pos, None)
        if not groups.is_last_stage:
            dist.send(out.contiguous(), dst=pp_ranks[groups.pp_rank + 1])
            return None
        parts = [torch.empty_like(out) for _ in range(groups.tp_size)]
        dist.all_gather(parts, out.contiguous(), group=groups.tp_group)
        logits = torch.cat(parts, dim=-1)[..., :vocab_size]
    return torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, SEQS[:, 1:, None])[..., 0]


class _Recorder:
    """Transport wrapper: what a node received (names, shapes), then the engine's own update."""

    def __init__(self, inner):
        self.inner, self.received = inner, []

    def send(self, bucket):
        self.received.append([(n, tuple(t.shape)) for n, t in bucket])
        self.inner.send(bucket)

    def finish(self):
        self.inner.finish()


def _node_sync_worker(rank, world_size, tp, pp, ranks_per_node):
    import torch.distributed as dist

    from fipo_megatron.models import build_gpt_model
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel
    from fipo_megatron.rollout.embedded import EmbeddedEngine
    from fipo_megatron.rollout.node_engines import NodeWeightSync, node_leaders

    hf = tiny_hf_config("qwen2")
    parallel = ParallelConfig(tp=tp, pp=pp)
    groups = initialize_parallel(parallel, hf_config=hf)
    model = build_gpt_model(hf, groups=groups).eval()
    leaders = node_leaders(world_size, ranks_per_node)
    nodes = NodeWeightSync(groups, leaders=leaders, ranks_per_node=ranks_per_node)
    engine = EmbeddedEngine(hf_config=hf, eos_token_ids=[]) if rank in leaders else None
    result = {"mode": nodes.mode, "pp_rank": groups.pp_rank, "tp_rank": groups.tp_rank, "dp_rank": groups.dp_rank,
              "megatron": [], "engine": [], "received": [], "stats": []}
    for step in range(2):
        _perturb(model, step=step, tp_rank=groups.tp_rank, pp_rank=groups.pp_rank)
        result["megatron"].append(_megatron_logp(model, groups, hf.vocab_size))
        transport = _Recorder(engine.weight_transport()) if engine is not None else None
        result["stats"].append(nodes.sync([model], hf_config=hf, transport=transport,
                                          bucket_bytes=BUCKET_BYTES[step]))
        if engine is not None:
            result["engine"].append(torch.tensor(engine.score(SEQS.tolist()), dtype=torch.float64))
            result["received"].append(transport.received)
    dist.barrier()
    return result


def _preimport():
    # Forked ranks inherit the parent's imports: megatron-core's import is paid once here.
    import fipo_megatron.models.builder  # noqa: F401
    import fipo_megatron.parallel.topology  # noqa: F401
    import fipo_megatron.rollout.embedded  # noqa: F401


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world,tp,pp,ranks_per_node", [
    (4, 2, 2, 2), (4, 2, 2, 1), pytest.param(8, 2, 2, 4, marks=pytest.mark.slow)],
    ids=["tp2_pp2_2nodes", "tp2_pp2_4nodes", "tp2_pp2_dp2_2nodes"])
def test_every_node_engine_equals_the_pipeline_after_each_sync(world, tp, pp, ranks_per_node):
    """4 ranks as 2 nodes of 2 (each node holds one pipeline stage; the stage sources lead the nodes) and as
    4 nodes of 1 (the leaders of nodes 1 and 3 are a TP rank > 0 of a stage: their receiving is interleaved
    with their part of the stage's all-gathers); 8 ranks as 2 nodes of 4 (tp 2 x pp 2 x dp 2: the DP replica
    on each node exports nothing)."""
    import transformers

    from fipo_megatron.weights.export import check_against_hf_state_dict

    _preimport()
    results = run_distributed(_node_sync_worker, world, args=(tp, pp, ranks_per_node), timeout=500,
                              ranks_per_node=ranks_per_node)
    assert {r["mode"] for r in results} == {"broadcast"}
    leaders = list(range(0, world, ranks_per_node))
    last = next(r for r in results if r["pp_rank"] == pp - 1 and r["tp_rank"] == 0 and r["dp_rank"] == 0)
    hf_model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config("qwen2"))
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    for step in range(2):
        ref = last["megatron"][step]
        for rank in leaders:
            err = (results[rank]["engine"][step] - ref).abs().max().item()
            assert err < 1e-4, f"node of rank {rank}, sync {step}: max |logp diff| {err}"
            received = [ns for bucket in results[rank]["received"][step] for ns in bucket]
            check_against_hf_state_dict(received, hf_shapes, tied_word_embeddings=True)
        for rank in range(world):
            assert (results[rank]["engine"] == []) == (rank not in leaders)
    assert not torch.allclose(last["megatron"][0], last["megatron"][1], atol=1e-3), "weights did not change"
    # 2nd sync: one bucket per stage, each node received both
    assert all(results[r]["stats"][1]["weights/num_buckets"] == pp for r in leaders)
    assert all(results[r]["stats"][0]["weights/num_buckets"] > 3 * pp for r in leaders)
    # the docs' arithmetic (sync_volume, from shapes alone) agrees with what the syncs moved
    from fipo_megatron.checkpoint.registry import get_mapping
    from fipo_megatron.models.hf_config import padded_vocab_size
    from fipo_megatron.rollout.node_engines import sync_volume

    hf = tiny_hf_config("qwen2")
    mapping = get_mapping(hf, padded_vocab_size=padded_vocab_size(hf, tp=tp))
    for step in range(2):
        volume = sync_volume(mapping, tp=tp, pp=pp, cp=1, world_size=world, ranks_per_node=ranks_per_node,
                             bucket_bytes=BUCKET_BYTES[step], dtype_bytes=4)
        assert volume["mode"] == "broadcast"
        for r in leaders:
            assert results[r]["stats"][step]["weights/num_buckets"] == sum(volume["num_buckets"])
            assert results[r]["stats"][step]["weights/num_bytes"] == volume["model_bytes"]
        assert volume["collectives"]["stage_broadcast"] == sum(volume["num_buckets"])
    # over the network: a node holding a stage's source gets only the other stage, the
    # others the whole model
    received = dict(zip(leaders, volume["bytes_received"]))
    sources = {0, world // pp}
    source_nodes = [r for r in leaders if sources & set(range(r, r + ranks_per_node))]
    assert sum(received[r] for r in source_nodes) == volume["model_bytes"]
    assert all(received[r] == volume["model_bytes"] for r in leaders if r not in source_nodes)


def _failing_node_sync_worker(rank, world_size):
    import torch.distributed as dist

    from fipo_megatron.models import build_gpt_model
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel
    from fipo_megatron.rollout.embedded import EmbeddedEngine
    from fipo_megatron.rollout.node_engines import NodeWeightSync, node_leaders
    from fipo_megatron.weights import export
    from fipo_megatron.weights.transport import WeightSyncError

    hf = tiny_hf_config("qwen2")
    parallel = ParallelConfig(tp=2, pp=2)
    groups = initialize_parallel(parallel, hf_config=hf)
    model = build_gpt_model(hf, groups=groups).eval()
    leaders = node_leaders(world_size, 2)
    nodes = NodeWeightSync(groups, leaders=leaders, ranks_per_node=2)
    engine = EmbeddedEngine(hf_config=hf, eos_token_ids=[]) if rank in leaders else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Crashing:  # node 1's engine dies at its 3rd bucket
        def __init__(self):
            self.num = 0

        def send(self, bucket):
            self.num += 1
            if self.num == 3:
                raise ConnectionError("engine on node 1 crashed")

        def finish(self):
            raise AssertionError("finish must not run after a failed bucket")

    real_broadcast, real_specs = export.dist.broadcast, export._hf_specs
    calls = {"n": 0}

    def truncating_broadcast(tensor, src, group=None, **kw):  # rank 2 gets stage 0's 3rd bucket cut short
        out = real_broadcast(tensor, src=src, group=group, **kw)
        calls["n"] += 1
        if calls["n"] == 3 and rank == 2:
            tensor[-64:] = 0  # the trailer fence as a broadcast cut short leaves it
        return out

    def renaming_specs(entry, **kw):  # stage 1's source announces a tensor it does not send
        specs = real_specs(entry, **kw)
        return [("model.layers.9.bogus" if i == 0 and ".layers.1." in n else n, s, d) for i, (n, s, d)
                in enumerate(specs)]

    outcomes = []
    for scenario in ("engine", "truncated", "manifest", "clean"):
        transport = engine.weight_transport() if engine is not None else None
        if scenario == "engine" and rank == 2:
            transport = Crashing()
        export.dist.broadcast = truncating_broadcast if scenario == "truncated" else real_broadcast
        export._hf_specs = renaming_specs if scenario == "manifest" and rank == 2 else real_specs
        calls["n"] = 0
        try:
            nodes.sync([model], hf_config=hf, transport=transport, bucket_bytes=6000)
            outcomes.append("ok")
        except WeightSyncError as e:
            outcomes.append(str(e))
    export.dist.broadcast, export._hf_specs = real_broadcast, real_specs
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    ref = _megatron_logp(model, groups, hf.vocab_size)
    logp = torch.tensor(engine.score(SEQS.tolist()), dtype=torch.float64) if engine is not None else None
    dist.barrier()
    return {"outcomes": outcomes, "unchanged": unchanged, "megatron": ref, "engine": logp,
            "last_stage": groups.is_last_stage and groups.tp_rank == 0}


@pytest.mark.timeout(300)
def test_a_failed_or_corrupted_bucket_stops_every_rank_and_the_next_sync_works():
    """pp=2 on 2 nodes: node 1's engine crashing mid-sync, a bucket arriving truncated on rank 2 (the
    trailer fence no longer matches), and a stage source whose manifest names a tensor it does not send:
    each time every rank raises ``WeightSyncError`` (the failing rank with the cause) and nobody hangs; the
    actor is untouched and a clean sync afterwards leaves both nodes' engines equal to the pipeline."""
    _preimport()
    results = run_distributed(_failing_node_sync_worker, 4, timeout=240, ranks_per_node=2)
    engine, truncated, manifest, clean = zip(*[r["outcomes"] for r in results])
    assert "engine on node 1 crashed" in engine[2] and all("another rank" in engine[r] for r in (0, 1, 3))
    assert "stage 0 bucket 2 from rank 0: fences" in truncated[2]
    assert all("another rank" in truncated[r] for r in (0, 1, 3))
    for r in (0, 2):  # every receiver refuses the manifests before any tensor arrives
        assert "unexpected ['model.layers.9.bogus']" in manifest[r] and "missing ['model.layers.1." in manifest[r]
    assert all("another rank" in manifest[r] for r in (1, 3))
    assert clean == ("ok",) * 4 and all(r["unchanged"] for r in results)
    ref = next(r["megatron"] for r in results if r["last_stage"])
    for r in (0, 2):
        assert (results[r]["engine"] - ref).abs().max().item() < 1e-4
