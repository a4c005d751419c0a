"""Megatron (tp=2, pp=2 / tp=2, dp=2) -> HF weight sync on real gloo ranks.

Reference: the Megatron model's own forward pass (stage 0 -> stage 1 over p2p, vocab-sharded logits
all-gathered over TP). After a bucketed sync into the embedded engine on rank 0, the engine's log-probs
of fixed sequences must equal Megatron's; twice in a row (weights changed in between): first with
buckets smaller than most tensors (each travels alone), then with one bucket per stage holding all of
its tensors, small ones included. The names/shapes a server engine would receive are checked against
transformers' own state dict; the per-stage disk export must hold exactly the same tensors as the
in-process sync. Also: pp x vpp and cp layouts against the gathered full state dict, and a failing
engine mid-sync (every rank raises, nobody hangs).
"""

from __future__ import annotations

import os

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.testing.tiny_models import tiny_hf_config

pytestmark = pytest.mark.distributed

SEQS = torch.randint(0, 250, (3, 9), generator=torch.Generator().manual_seed(0))
BUCKET_BYTES = 6000  # embedding (64 KiB) and other matrices > a bucket: they travel alone
STEP_BUCKET_BYTES = (BUCKET_BYTES, 1 << 22)  # 2nd sync: one bucket per stage holding all its (small) tensors


def _perturb(model, *, step, tp_rank, pp_rank):
    # Megatron initialises norms to 1 and biases to 0: randomise every 1-D parameter so a mapping mistake
    # shows. (2-D weights are already random; leaving them keeps the tied embedding copies in sync.)
    # Replicated parameters (norms) must stay equal across TP ranks: their noise depends on pp_rank only.
    from fipo_megatron.models.sharding import partition_dim

    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() == 1:
                sharded = partition_dim(name) is not None
                g = torch.Generator().manual_seed(1000 * step + 100 * pp_rank + 10 * i + (tp_rank if sharded else 0))
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _megatron_logp(model, groups, vocab_size):
    """Per-token log-probs of SEQS from the Megatron pipeline; returned on the last stage's ranks."""
    import torch.distributed as dist

    ids = SEQS
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    pp_ranks = dist.get_process_group_ranks(groups.pp_group)
    with torch.no_grad():
        if not groups.is_first_stage:
            hidden = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
            dist.recv(hidden, src=pp_ranks[groups.pp_rank - 1])
            model.set_input_tensor(hidden)
        out = model(ids, pos, None)
        if not groups.is_last_stage:
            dist.send(out.contiguous(), dst=pp_ranks[groups.pp_rank + 1])
            return None
        parts = [torch.empty_like(out) for _ in range(groups.tp_size)]
        dist.all_gather(parts, out.contiguous(), group=groups.tp_group)
        logits = torch.cat(parts, dim=-1)[..., :vocab_size]  # drop TP vocab padding
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return logp, logits[:, -1].argmax(-1).tolist()


def _sync_worker(rank, world_size, family, tp, pp, disk_dir, overrides):
    from fipo_megatron.models import build_gpt_model
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel
    from fipo_megatron.rollout.embedded import EmbeddedEngine
    from fipo_megatron.weights.export import export_hf_buckets, hf_names_and_shapes
    from fipo_megatron.weights.transport import DiskTransport, sync_weights

    hf = tiny_hf_config(family, **overrides)
    parallel = ParallelConfig(tp=tp, pp=pp)
    groups = initialize_parallel(parallel, hf_config=hf)
    model = build_gpt_model(hf, groups=groups).eval()
    engine = EmbeddedEngine(hf_config=hf, eos_token_ids=[]) if rank == 0 else None
    transport = engine.weight_transport() if engine is not None else None
    result = {"rank": rank, "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank, "dp_rank": groups.dp_rank,
              "megatron": [], "engine": [], "stats": []}
    for step in range(2):  # two syncs in a row, weights changed in between
        _perturb(model, step=step, tp_rank=groups.tp_rank, pp_rank=groups.pp_rank)
        logp_and_next = _megatron_logp(model, groups, hf.vocab_size)
        result["megatron"].append(None if logp_and_next is None else logp_and_next[0])
        result.setdefault("megatron_next", []).append(None if logp_and_next is None else logp_and_next[1])
        result["stats"].append(sync_weights([model], groups=groups, hf_config=hf, transport=transport,
                                            bucket_bytes=STEP_BUCKET_BYTES[step]))
        if engine is not None:
            result["engine"].append(torch.tensor(engine.score(SEQS.tolist()), dtype=torch.float64))
            # greedy next token from the synced engine == argmax of Megatron's (checked in the parent)
            result.setdefault("greedy", []).append(
                [o.token_ids[0] for o in engine.generate(SEQS.tolist(), _greedy_one())])
    result["names_shapes"] = hf_names_and_shapes([model], groups=groups, hf_config=hf)
    # Per-stage export to disk: each stage's exporting rank writes its own files.
    if disk_dir is not None:
        transport = DiskTransport(disk_dir, rank=groups.pp_rank) if groups.tp_rank == 0 and groups.dp_rank == 0 else None
        sync_weights([model], groups=groups, hf_config=hf, transport=transport, bucket_bytes=BUCKET_BYTES,
                     destination="stage")
    result["local_buckets"] = [[(n, t.numel() * t.element_size()) for n, t in bucket] for bucket in
                               export_hf_buckets([model], groups=groups, hf_config=hf, bucket_bytes=BUCKET_BYTES,
                                                 destination="stage")]
    if engine is not None:
        result["engine_state"] = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    return result


def _preimport():
    # Forked ranks inherit the parent's imports: paying megatron-core's import once here saves it per rank.
    import fipo_megatron.models.builder  # noqa: F401
    import fipo_megatron.parallel.topology  # noqa: F401


def _greedy_one():
    from fipo_megatron.rollout.base import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=1)


def _check_sync(results, *, family, tp, pp, overrides):
    import transformers

    from fipo_megatron.weights.export import check_against_hf_state_dict

    last = next(r for r in results if r["pp_rank"] == pp - 1 and r["tp_rank"] == 0 and r["dp_rank"] == 0)
    rank0 = results[0]
    for step in range(2):
        ref, got = last["megatron"][step], rank0["engine"][step]
        err = (ref - got).abs().max().item()
        assert err < 1e-5, f"{family} step {step}: max |logp diff| {err}"  # fp32: ~5e-7 seen
    assert not torch.allclose(last["megatron"][0], last["megatron"][1], atol=1e-3), "weights did not change"
    assert rank0["stats"][0]["weights/num_buckets"] > 3 * pp
    assert rank0["stats"][1]["weights/num_buckets"] == pp  # every stage's tensors in one bucket
    # Names/shapes from all stages vs transformers' own state dict of this config.
    hf_model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides))
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    sent = [ns for r in results if r["tp_rank"] == 0 and r["dp_rank"] == 0 for ns in r["names_shapes"]]
    tied = bool(hf_model.config.tie_word_embeddings)
    check_against_hf_state_dict(sent, hf_shapes, tied_word_embeddings=tied)
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\].*unexpected \['model.bogus'\]"):
        check_against_hf_state_dict([s for s in sent if s[0] != "model.norm.weight"] + [("model.bogus", (1,))],
                                    hf_shapes, tied_word_embeddings=tied)
    # Only the replica with dp_rank 0 and its tp_rank 0 yields buckets; every stage has some.
    for r in results:
        assert (len(r["local_buckets"]) > 0) == (r["tp_rank"] == 0 and r["dp_rank"] == 0)
    # A tensor larger than a bucket travels alone; small ones share buckets.
    buckets = [b for r in results for b in r["local_buckets"]]
    assert any(len(b) == 1 and b[0][1] > BUCKET_BYTES for b in buckets)
    assert max(len(b) for b in buckets) >= 3, [len(b) for b in buckets]
    return rank0


@pytest.mark.timeout(240)
def test_sync_tp2_pp2_into_embedded_engine(tmp_path):
    """qwen2 (tied embeddings, QKV bias) on tp=2 x pp=2."""
    from fipo_megatron.weights.transport import read_disk_buckets

    _preimport()
    results = run_distributed(_sync_worker, 4, args=("qwen2", 2, 2, str(tmp_path), {}), timeout=200)
    rank0 = _check_sync(results, family="qwen2", tp=2, pp=2, overrides={})
    last = next(r for r in results if r["pp_rank"] == 1 and r["tp_rank"] == 0)
    # The synced engine's greedy next token is Megatron's argmax after the last position.
    assert rank0["greedy"] == last["megatron_next"]
    # Disk export per stage == the in-process sync, tensor for tensor.
    on_disk = {n: t for bucket in read_disk_buckets(str(tmp_path)) for n, t in bucket}
    assert sorted(os.listdir(tmp_path)) == sorted(f for f in os.listdir(tmp_path) if not f.endswith(".tmp"))
    state = rank0["engine_state"]
    assert set(on_disk) == set(state) - {"lm_head.weight"}
    for name, tensor in on_disk.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)


@pytest.mark.timeout(240)
def test_sync_tp2_dp2_llama():
    """llama (untied output layer) on tp=2 x dp=2, vocabulary 251 padded to 252 for TP: one replica
    exports, the padding rows are dropped, the result is the same."""
    _preimport()
    results = run_distributed(_sync_worker, 4, args=("llama", 2, 1, None, {"vocab_size": 251}), timeout=200)
    _check_sync(results, family="llama", tp=2, pp=1, overrides={"vocab_size": 251})


def _layout_worker(rank, world_size, layout):
    from fipo_megatron.models import build_model_chunks, gather_full_state_dict
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel
    from fipo_megatron.weights.export import export_hf_buckets

    hf = tiny_hf_config("qwen3", num_hidden_layers=4)
    parallel = ParallelConfig(**layout)
    groups = initialize_parallel(parallel, hf_config=hf)
    chunks = build_model_chunks(hf, groups=groups)
    for i, chunk in enumerate(chunks):
        _perturb(chunk, step=i, tp_rank=0, pp_rank=groups.pp_rank)
    exported = [n for bucket in export_hf_buckets(chunks, groups=groups, hf_config=hf, bucket_bytes=BUCKET_BYTES)
                for n in bucket]
    full = gather_full_state_dict(chunks, groups=groups, vocab_size=hf.vocab_size)
    return exported, full


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", [{"pp": 2, "vpp": 2}, {"cp": 2}], ids=["pp2_vpp2", "cp2"])
def test_export_with_virtual_stages_and_context_parallel(layout):
    """pp=2 x vpp=2 (qwen3, 4 layers: rank 0 holds layers 0 and 2) and cp=2 (rank 1 is a CP replica and
    exports nothing): rank 0 receives every HF tensor once, equal to the mapping applied to the gathered
    full state dict (models.sharding)."""
    from fipo_megatron.checkpoint.registry import get_mapping

    _preimport()
    (exported, full), (nothing, _) = run_distributed(_layout_worker, 2, args=(layout,), timeout=200)
    assert nothing == []
    names = [n for n, _ in exported]
    assert len(names) == len(set(names))
    mapping = get_mapping(tiny_hf_config("qwen3", num_hidden_layers=4))
    expected = {hf: t for name, tensor in full.items() for hf, t in mapping.megatron_to_hf(name, tensor)}
    assert set(names) == set(expected) and any(".layers.3." in n for n in names)
    for name, tensor in exported:
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def _failing_sync_worker(rank, world_size):
    from fipo_megatron.models import build_gpt_model
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel
    from fipo_megatron.weights.transport import WeightSyncError, sync_weights

    class Flaky:
        def __init__(self):
            self.num_sent = 0

        def send(self, bucket):
            if self.num_sent == 2:
                raise ConnectionError("engine crashed")
            self.num_sent += 1

        def finish(self):
            raise AssertionError("finish must not run after a failed bucket")

    hf = tiny_hf_config("llama")
    parallel = ParallelConfig(pp=2)
    groups = initialize_parallel(parallel, hf_config=hf)
    model = build_gpt_model(hf, groups=groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    transport = Flaky() if rank == 0 else None
    try:
        sync_weights([model], groups=groups, hf_config=hf, transport=transport, bucket_bytes=BUCKET_BYTES)
        outcome = "no error"
    except WeightSyncError as e:
        outcome = str(e)
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The group still works afterwards: nobody is stuck in a half-finished export.
    ok = sync_weights([model], groups=groups, hf_config=hf, transport=None if rank else _Sink(), bucket_bytes=BUCKET_BYTES)
    return outcome, unchanged, ok


class _Sink:
    def send(self, bucket):
        pass

    def finish(self):
        pass


@pytest.mark.timeout(240)
def test_failed_sync_raises_on_every_rank_without_hanging():
    _preimport()
    results = run_distributed(_failing_sync_worker, 2, timeout=200)
    assert "engine crashed" in results[0][0] and "another rank" in results[1][0]
    assert all(unchanged for _, unchanged, _ in results)
    assert results[0][2]["weights/num_buckets"] > 3  # stage 1's buckets still arrive at rank 0
