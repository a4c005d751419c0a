"""Training with an engine on every node when a node holds only part of the model (pp = 2 over 2 nodes):
the run trains as the single-engine run (``rollout.placement: rank0``) with the same layout does.

Both runs: 4 gloo ranks as 2 nodes of 2 (tp = 2, pp = 2: node 0 holds stage 0, node 1 stage 1), the real
loop (embedded engines, Megatron actor, FIPO, weight sync) for 2 steps; the per-node run with two engine
replicas on each node. To make the two runs' samples
comparable, each engine samples every prompt as its own request with a seed drawn from the prompt and the
sampling settings (a wrapper below), so a response does not depend on which node drew its prompt, only on
the weights the engine holds. Then equal metrics and equal final weights mean: both nodes' engines held
exactly the actor's weights at every step (else their samples would differ), the outputs came back in
prompt order, and training saw the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest
import torch

from fipo_megatron.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")
OVERRIDES = ["data.train_batch_size=4", "data.gen_batch_size=4", "rollout.n=4", "actor.ppo_mini_batch_size=2",
             "data.max_response_length=4", "reward.overlong_buffer.len=1", "trainer.total_training_steps=2",
             "checkpoint.save_interval=0", "checkpoint.save_at_end=false", "trainer.val_interval=0",
             "trainer.val_before_train=false", "logging.tensorboard=false", "logging.progress_bar=false",
             "algorithm.filter_groups.max_num_gen_batches=4", "parallel.tp=2", "parallel.pp=2"]


def _per_prompt(engine):
    """Make ``engine.generate`` sample each prompt alone, seeded by (prompt, sampling settings)."""
    generate = engine.generate

    def per_prompt(prompts, sampling):
        outputs = []
        for prompt in prompts:
            key = repr((list(prompt), dataclasses.replace(sampling, seed=None))).encode()
            seed = int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") & 0x7FFFFFFF
            for out in generate([prompt], dataclasses.replace(sampling, seed=seed)):
                out.prompt_index = len(outputs) // sampling.n
                outputs.append(out)
        return outputs

    engine.generate = per_prompt


def _train(rank, world_size, run_dir, placement, extra=()):
    from fipo_megatron.config import load_config
    from fipo_megatron.models.sharding import gather_full_state_dict
    from fipo_megatron.trainer import Trainer

    cfg = load_config(CONFIG, overrides=OVERRIDES + [f"trainer.run_dir={run_dir}", f"rollout.placement={placement}",
                                                     *extra])
    trainer = Trainer(cfg)
    engine = trainer.parts.engine
    local = getattr(engine, "local", engine)  # rank 0 of per_node holds NodeEngines around its own engine
    calls = []
    if local is not None:
        _per_prompt(local)
        inner = local.generate

        def counted(prompts, sampling):
            calls.append(len(prompts))
            return inner(prompts, sampling)

        local.generate = counted
    trainer.fit()
    replicas = getattr(local, "engines", [local])  # the last replica: fed through the fan-out
    state = {k: v.clone() for k, v in replicas[-1].model.state_dict().items()} if local is not None else None
    hf_config = trainer.parts.hf_config
    full = gather_full_state_dict(trainer.actor.model_chunks, groups=trainer.actor.groups,
                                  vocab_size=hf_config.vocab_size)
    as_hf = None
    if full:  # the actor's weights under HF names (the checkpoint mapping, as a conversion would write them)
        from fipo_megatron.checkpoint.registry import get_mapping

        mapping = get_mapping(hf_config)
        as_hf = {hf: t.clone() for name, tensor in full.items() for hf, t in mapping.megatron_to_hf(name, tensor)}
    return {"calls": calls, "engine": state, "actor": full, "actor_hf": as_hf,
            "mode": getattr(trainer.placement.weights, "mode", None)}


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/", "rollout/tokens_per_s",
                                                              "actor/timing/", "weights/"))} for r in rows]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_pp2_engines_on_both_nodes_train_as_one_engine(tmp_path):
    from fipo_megatron.testing.distributed import run_distributed

    import fipo_megatron.actor.actor  # noqa: F401  (forked ranks inherit the imports)
    import fipo_megatron.rollout.embedded  # noqa: F401
    import fipo_megatron.trainer  # noqa: F401

    one = run_distributed(_train, 4, args=(str(tmp_path / "one"), "rank0"), timeout=420, ranks_per_node=2)
    # per node: two engine replicas each (rollout.engine_kwargs.num_engines), fed by fan-out
    nodes = run_distributed(_train, 4, args=(str(tmp_path / "nodes"), "per_node", [
        "checkpoint.save_at_end=true", "rollout.engine_kwargs={num_engines: 2}"]), timeout=420, ranks_per_node=2)
    assert nodes[0]["mode"] == "broadcast" and one[0]["mode"] is None
    # engines on ranks 0 and 2 only; both sampled a share of every request
    assert [r["engine"] is not None for r in nodes] == [True, False, True, False]
    assert nodes[0]["calls"] and len(nodes[0]["calls"]) == len(nodes[2]["calls"])
    assert [a + b for a, b in zip(nodes[0]["calls"], nodes[2]["calls"])] == one[0]["calls"]
    assert all(c > 0 for c in nodes[0]["calls"] + nodes[2]["calls"])
    rows_one = read_metrics(os.path.join(tmp_path, "one", "metrics.jsonl"))
    rows_nodes = read_metrics(os.path.join(tmp_path, "nodes", "metrics.jsonl"))
    assert [r["step"] for r in rows_nodes] == [1, 2] and rows_nodes[1]["actor/num_mini_batches"] >= 1
    for a, b in zip(_comparable(rows_one), _comparable(rows_nodes)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    # both nodes' engines sampled with the actor's weights: rollout log-probs = actor's (step 2 after a sync)
    assert all(r["rollout/logprob_abs_diff_max"] < 1e-4 for r in rows_nodes)
    # the same final weights in both runs, and both engines hold them
    actor = next(r["actor"] for r in nodes if r["actor"])
    reference = next(r["actor"] for r in one if r["actor"])
    assert actor.keys() == reference.keys()
    for name in actor:
        torch.testing.assert_close(actor[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)
    expected = next(r["actor_hf"] for r in nodes if r["actor_hf"])
    for rank in (0, 2):
        engine = nodes[rank]["engine"]
        for name, tensor in expected.items():
            torch.testing.assert_close(engine[name], tensor, rtol=0, atol=0, msg=f"rank {rank} {name}")
    # the checkpoint keeps the split histories (response lengths of every prompt sampled) of rank 0's split
    # over the nodes and of each node's split over its two replicas, for a resume
    with open(os.path.join(tmp_path, "nodes", "checkpoints", "step_00000002", "trainer_state.json")) as f:
        history = json.load(f)["rollout"]
    assert history["rank0"]["nodes"]["num_responses"] == 4 * sum(one[0]["calls"])
    node_histories = [history["rank0"]["local"]] + history["leaders"]
    assert [h["num_responses"] for h in node_histories] == [4 * sum(nodes[r]["calls"]) for r in (0, 2)]
