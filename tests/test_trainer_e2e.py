"""End to end on 2 gloo ranks (tp=2): the real loop (embedded engine, Megatron actor, FIPO, weight sync,
metrics, checkpoints). One reference run serves one test per concern; a kill -9 during training and an
engine failure each resume to the metrics of the uninterrupted run with the same seed."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from fipo_megatron.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")
SMALL = ["data.train_batch_size=4", "data.gen_batch_size=4", "rollout.n=4", "actor.ppo_mini_batch_size=1",
         "data.max_response_length=4", "reward.overlong_buffer.len=1", "trainer.total_training_steps=4",
         "checkpoint.save_interval=2", "trainer.val_interval=0", "trainer.val_before_train=false",
         "logging.tensorboard=false", "logging.progress_bar=false", "algorithm.filter_groups.max_num_gen_batches=4",
         "parallel.tp=2"]


def _train(rank, world_size, run_dir, kill_at_step, fail_at_step=None):
    from fipo_megatron.config import load_config
    from fipo_megatron.trainer import RolloutError, Trainer

    cfg = load_config(CONFIG, overrides=SMALL + [f"trainer.run_dir={run_dir}"])
    trainer = Trainer(cfg)
    train_step = trainer.train_step
    if fail_at_step is not None and rank == 0:  # the engine becomes unreachable at that step
        generate = trainer.parts.engine.generate

        def failing_generate(*args, **kwargs):
            if trainer.step == fail_at_step:
                raise ConnectionError("engine unreachable after 5 retries")
            return generate(*args, **kwargs)

        trainer.parts.engine.generate = failing_generate
    if fail_at_step is not None:
        try:
            trainer.fit()
        except RolloutError as e:
            return {"error": str(e), "step": trainer.step}
        return {"error": None}
    per_step_minibatches = []

    def step_hook():
        if kill_at_step is not None and trainer.step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # every rank dies here, as under a node failure
        out = train_step()
        per_step_minibatches.append(list(trainer.actor.last_mini_batch_metrics))
        return out

    trainer.train_step = step_hook
    trainer.fit()
    # the engine on rank 0 holds the actor's weights after the last sync
    engine_state = None
    if rank == 0:
        engine_state = {k: v.clone() for k, v in trainer.parts.engine.model.state_dict().items()}
    from fipo_megatron.models.sharding import gather_full_state_dict

    full = gather_full_state_dict(trainer.actor.model_chunks, groups=trainer.actor.groups)
    return {"minibatches": per_step_minibatches, "engine": engine_state,
            "embedding": full.get("embedding.word_embeddings.weight") if full else None}


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "perf/", "rollout/tokens_per_s", "actor/timing/"))}
            for r in rows]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted 4-step run (2 ranks, tp=2) that the tests below read: its directory, its
    metrics rows, and rank 0's per-step mini-batch metrics, engine weights and actor embedding."""
    from fipo_megatron.testing.distributed import run_distributed

    # Import the heavy modules once here: the forked ranks inherit them instead of importing each time.
    import fipo_megatron.actor.actor  # noqa: F401
    import fipo_megatron.trainer  # noqa: F401
    import fipo_megatron.weights.export  # noqa: F401
    import fipo_megatron.checkpoint.dist_ckpt  # noqa: F401
    import fipo_megatron.rollout.embedded  # noqa: F401

    ref_dir = str(tmp_path_factory.mktemp("e2e") / "ref")
    ref = run_distributed(_train, 2, args=(ref_dir, None), timeout=240)
    return ref_dir, read_metrics(os.path.join(ref_dir, "metrics.jsonl")), ref[0]


def _assert_same_rows(a, b):
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            va, vb = ra[k], rb[k]
            same = va == vb or (isinstance(va, float) and isinstance(vb, float)
                                and math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-12))
            assert same, (ra["step"], k, va, vb)


@pytest.mark.distributed
def test_every_step_trains_and_logs(reference_run):
    _, rows, _ = reference_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        # one optimizer step per kept prompt (mini-batch = 1 prompt x 4 responses)
        assert r["actor/num_mini_batches"] == r["batch/num_prompts"] >= 1 and r["response_length/max"] <= 4
        assert 0.0 <= r["reward/acc"] <= 1.0 and r["num_gen_batches"] >= 1


@pytest.mark.distributed
def test_weight_sync_engine_matches_actor(reference_run):
    _, rows, rank0 = reference_run
    # on steps 2 and 4 the engine sampled with weights synced after the previous update; its log-probs
    # match the actor's recomputation (fp32 on both sides) to float rounding, logged every step
    assert {2, 4} <= {r["step"] for r in rows if "rollout/logprob_abs_diff_max" in r}
    assert all(r["rollout/logprob_abs_diff_max"] < 1e-4 for r in rows if "rollout/logprob_abs_diff_max" in r)
    # after the last step the engine's embedding equals the actor's
    engine_emb = rank0["engine"]["model.embed_tokens.weight"]
    assert (engine_emb - rank0["embedding"][:engine_emb.shape[0]]).abs().max().item() < 1e-6


@pytest.mark.distributed
def test_future_kl_acts_from_the_second_mini_batch(reference_run):
    # the first mini-batch of a step has d = 0, so f = 1 exactly; later ones move it (docs/algorithm.md §1)
    mbs = reference_run[2]["minibatches"]
    assert all(s[0]["influence_weights_min"] == 1.0 == s[0]["influence_weights_max"] for s in mbs)
    later = [m for s in mbs for m in s[1:]]
    assert later and any(m["raw_influence_weights_max"] > 1.0 or m["raw_influence_weights_min"] < 1.0 for m in later)


@pytest.mark.distributed
def test_run_dir_holds_config_and_kept_checkpoints(reference_run):
    ref_dir = reference_run[0]
    # checkpoints every 2 steps, keep_last=2, and the latest pointer
    assert sorted(os.listdir(os.path.join(ref_dir, "checkpoints"))) == ["latest", "step_00000002", "step_00000004"]
    assert os.path.isfile(os.path.join(ref_dir, "config.yaml"))


@pytest.mark.distributed
def test_kill_and_resume_matches_uninterrupted(reference_run, tmp_path):
    from fipo_megatron.testing.distributed import run_distributed

    cut_dir = str(tmp_path / "cut")
    with pytest.raises(RuntimeError, match="died|exit"):
        run_distributed(_train, 2, args=(cut_dir, 4), timeout=240)   # killed at the start of step 4
    killed_rows = read_metrics(os.path.join(cut_dir, "metrics.jsonl"))
    assert [r["step"] for r in killed_rows] == [1, 2, 3]             # step 3 was logged after checkpoint 2
    run_distributed(_train, 2, args=(cut_dir, None), timeout=240)     # resume from step 2
    resumed = read_metrics(os.path.join(cut_dir, "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    _assert_same_rows(_comparable(reference_run[1]), _comparable(resumed))


@pytest.mark.distributed
def test_engine_failure_saves_the_last_step_and_resumes(reference_run, tmp_path):
    from fipo_megatron.testing.distributed import run_distributed

    # The engine fails at step 4 (after checkpoint 2): every rank stops with RolloutError after saving
    # step 3, which the failed step started from; a resume from it reproduces the uninterrupted step 4.
    fail_dir = str(tmp_path / "fail")
    failed = run_distributed(_train, 2, args=(fail_dir, None, 4), timeout=240)
    for r in failed:
        assert r["step"] == 4 and "rollout failed on rank 0: ConnectionError: engine unreachable" in r["error"]
    ckpts = sorted(os.listdir(os.path.join(fail_dir, "checkpoints")))
    assert ckpts == ["latest", "step_00000002", "step_00000003"]
    assert [r["step"] for r in read_metrics(os.path.join(fail_dir, "metrics.jsonl"))] == [1, 2, 3]
    run_distributed(_train, 2, args=(fail_dir, None), timeout=240)
    after = _comparable(read_metrics(os.path.join(fail_dir, "metrics.jsonl")))
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    _assert_same_rows(_comparable(reference_run[1])[3:], after[3:])


@pytest.mark.distributed
def test_evaluate_tool_scores_the_run_checkpoint(reference_run, tmp_path):
    # tools/evaluate.py on the run checkpoint (converted to HF on the fly) runs and scores the synthetic task.
    # It runs as its own process, as a user runs it: in-process it would leave the Megatron checkpoint
    # loader's and the scorer's threads in this test process, and later fork-based tests would inherit
    # their locks.
    import subprocess
    import sys

    ref_dir = reference_run[0]
    out = tmp_path / "eval.json"
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--model", os.path.join(ref_dir, "hf_init"),
                    "--megatron-checkpoint", os.path.join(ref_dir, "checkpoints", "step_00000004"),
                    "--synthetic", "copy_digit", "--num-synthetic", "8", "--k", "4", "--max-new-tokens", "3",
                    "--out", str(out)], check=True, timeout=300)
    res = json.loads(out.read_text())
    assert res["overall"]["num_problems"] == 8 and 0.0 <= res["overall"]["avg@4"] <= 1.0


def _train_two_engines(rank, world_size, run_dir):
    from fipo_megatron.config import load_config
    from fipo_megatron.models.sharding import gather_full_state_dict
    from fipo_megatron.trainer import Trainer

    overrides = [o for o in SMALL if not o.startswith(("trainer.total_training_steps", "checkpoint.save_interval"))]
    cfg = load_config(CONFIG, overrides=overrides + [f"trainer.run_dir={run_dir}", "trainer.total_training_steps=2",
                                                     "checkpoint.save_interval=0", "rollout.engine_kwargs.num_engines=2"])
    trainer = Trainer(cfg)
    trainer.fit()
    engines = None
    if rank == 0:
        engines = [{k: v.clone() for k, v in e.model.state_dict().items()} for e in trainer.parts.engine.engines]
    full = gather_full_state_dict(trainer.actor.model_chunks, groups=trainer.actor.groups)
    return {"engines": engines, "embedding": full.get("embedding.word_embeddings.weight") if full else None}


@pytest.mark.distributed
def test_two_rollout_engines_share_the_work_and_the_weights(tmp_path):
    from fipo_megatron.testing.distributed import run_distributed

    run_dir = str(tmp_path / "two")
    out = run_distributed(_train_two_engines, 2, args=(run_dir,), timeout=240)
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    # step 2 sampled (half the prompts on each engine) after the sync of step 1's update: the engines'
    # log-probs equal the actor's recomputation to float rounding
    assert all(r["rollout/logprob_abs_diff_max"] < 1e-4 for r in rows if "rollout/logprob_abs_diff_max" in r)
    assert any("rollout/logprob_abs_diff_max" in r for r in rows if r["step"] == 2)
    first, second = out[0]["engines"]
    emb = out[0]["embedding"]
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert (first["model.embed_tokens.weight"] - emb[:first["model.embed_tokens.weight"].shape[0]]).abs().max() < 1e-6


def _train_validation_fails(rank, world_size, run_dir):
    from fipo_megatron.config import load_config
    from fipo_megatron.trainer import RolloutError, Trainer

    cfg = load_config(CONFIG, overrides=SMALL + [f"trainer.run_dir={run_dir}", "trainer.val_before_train=true"])
    trainer = Trainer(cfg)
    if rank == 0:
        def broken_validate():
            raise TimeoutError("validation engine timed out")

        trainer.validate = broken_validate
    try:
        trainer.fit()
    except RolloutError as e:
        return str(e)
    return None


@pytest.mark.distributed
def test_a_validation_failure_on_rank0_stops_every_rank(tmp_path):
    from fipo_megatron.testing.distributed import run_distributed

    out = run_distributed(_train_validation_fails, 2, args=(str(tmp_path / "val"),), timeout=120)
    assert all(msg and "validation failed on rank 0: TimeoutError: validation engine timed out" in msg for msg in out)


def _train_per_node(rank, world_size, run_dir):
    from fipo_megatron.config import load_config
    from fipo_megatron.models.sharding import gather_full_state_dict
    from fipo_megatron.trainer import Trainer

    overrides = [o for o in SMALL if not o.startswith(("trainer.total_training_steps", "checkpoint.save_interval"))]
    cfg = load_config(CONFIG, overrides=overrides + [f"trainer.run_dir={run_dir}", "trainer.total_training_steps=2",
                                                     "checkpoint.save_interval=0", "rollout.placement=per_node",
                                                     "trainer.val_before_train=true"])
    trainer = Trainer(cfg)
    engine = trainer.parts.engine
    local = getattr(engine, "local", engine)  # rank 0 holds NodeEngines around its own engine
    calls = []
    if local is not None:
        generate = local.generate

        def counted(prompts, sampling):
            calls.append(len(prompts))
            return generate(prompts, sampling)

        local.generate = counted
    trainer.fit()
    state = {k: v.clone() for k, v in local.model.state_dict().items()} if local is not None else None
    full = gather_full_state_dict(trainer.actor.model_chunks, groups=trainer.actor.groups)
    return {"calls": calls, "engine": state, "embedding": full.get("embedding.word_embeddings.weight") if full else None}


@pytest.mark.distributed
def test_per_node_engines_share_rollouts_and_get_weights_from_their_node(tmp_path):
    from fipo_megatron.testing.distributed import run_distributed

    run_dir = str(tmp_path / "nodes")
    # 4 ranks as 2 nodes of 2 (tp=2, so one model replica per node): engines on ranks 0 and 2
    out = run_distributed(_train_per_node, 4, args=(run_dir,), timeout=300, ranks_per_node=2)
    assert out[1]["engine"] is None and out[3]["engine"] is None
    # validation (64 prompts) and 2 training steps: each node sampled its half of every request
    assert out[0]["calls"] and out[0]["calls"] == out[2]["calls"] and out[0]["calls"][0] == 32
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2] and 0.0 <= rows[0]["val/acc"] <= 1.0
    assert all(r["rollout/logprob_abs_diff_max"] < 1e-4 for r in rows if "rollout/logprob_abs_diff_max" in r)
    assert any("rollout/logprob_abs_diff_max" in r for r in rows if r["step"] == 2)
    emb = out[0]["embedding"]
    for name in out[0]["engine"]:
        assert torch.equal(out[0]["engine"][name], out[2]["engine"][name]), name
    engine_emb = out[2]["engine"]["model.embed_tokens.weight"]
    assert (engine_emb - emb[:engine_emb.shape[0]]).abs().max() < 1e-6
