"""GPU variant of the actor check (CUDA, bf16 parameters). Skipped without CUDA.

One rank on one GPU (NCCL): the bf16 actor (with full activation recomputation) against the fp32 one
built from the same weights.
"""

from __future__ import annotations

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.testing.tiny_models import tiny_hf_model

pytestmark = pytest.mark.gpu


def _worker(rank, world_size, hf_config, full, batch):
    from fipo_megatron.actor.actor import MegatronActor
    from fipo_megatron.algo.policy_loss import PolicyLossConfig
    from fipo_megatron.parallel.topology import ParallelConfig, destroy_parallel
    from test_actor_update import _actor_config

    out = {}
    for dtype, recompute in (("float32", "none"), ("bfloat16", "full")):
        actor = MegatronActor(hf_config=hf_config, parallel=ParallelConfig(),
                              actor_config=_actor_config(params_dtype=dtype, recompute=recompute),
                              loss_config=PolicyLossConfig())
        actor.load_full_state_dict(full)
        out[dtype] = dict(logp=actor.compute_log_probs(batch), metrics=actor.update(batch))
        destroy_parallel()
    return out


def test_bf16_actor_close_to_fp32_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from test_actor_update import _batch, _full_state

    model = tiny_hf_model("qwen2", seed=0)
    # NCCL (one rank, one GPU): Megatron's DDP reduces its CUDA grad buckets even at dp=1, which gloo refuses
    out = run_distributed(_worker, 1, args=(model.config, _full_state(model), _batch()), timeout=300,
                          backend="nccl")[0]
    for a, b in zip(out["float32"]["logp"], out["bfloat16"]["logp"]):
        torch.testing.assert_close(b, a, atol=0.1, rtol=0.05)
    m = out["bfloat16"]["metrics"]
    assert m["actor/num_skipped_steps"] == 0 and m["actor/grad_norm"] == pytest.approx(
        out["float32"]["metrics"]["actor/grad_norm"], rel=0.1)


def _dist_opt_worker(rank, world_size, hf_config, full, batch, ckpt_dir):
    from fipo_megatron.actor.actor import MegatronActor
    from fipo_megatron.algo.policy_loss import PolicyLossConfig
    from fipo_megatron.models.sharding import gather_full_state_dict
    from fipo_megatron.parallel.topology import ParallelConfig, destroy_parallel
    from test_actor_update import _actor_config

    out = {}
    for dist_opt in (False, True):
        actor = MegatronActor(hf_config=hf_config, parallel=ParallelConfig(use_distributed_optimizer=dist_opt),
                              actor_config=_actor_config(params_dtype="bfloat16"),
                              loss_config=PolicyLossConfig())
        actor.load_full_state_dict(full)
        metrics = actor.update(batch)
        params = {k: v.float().cpu() for k, v in gather_full_state_dict(actor.model_chunks, groups=actor.groups).items()}
        out[dist_opt] = dict(metrics=metrics, params=params)
        if dist_opt:  # the distributed optimizer's checkpoint: save, reload into a fresh actor, one more update each
            actor.save_checkpoint(ckpt_dir)
            again = actor.update(batch)
            destroy_parallel()
            fresh = MegatronActor(hf_config=hf_config, parallel=ParallelConfig(use_distributed_optimizer=True),
                                  actor_config=_actor_config(params_dtype="bfloat16"),
                                  loss_config=PolicyLossConfig())
            fresh.load_checkpoint(ckpt_dir)
            out["resumed"] = dict(first=again, second=fresh.update(batch))
        destroy_parallel()
    return out


def test_distributed_optimizer_matches_plain_and_checkpoints(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from test_actor_update import _batch, _full_state

    model = tiny_hf_model("qwen2", seed=0)
    out = run_distributed(_dist_opt_worker, 1, args=(model.config, _full_state(model), _batch(), str(tmp_path / "ck")),
                          timeout=300, backend="nccl")[0]
    plain, dist_opt = out[False], out[True]
    assert dist_opt["metrics"]["actor/num_skipped_steps"] == 0
    assert dist_opt["metrics"]["actor/grad_norm"] == pytest.approx(plain["metrics"]["actor/grad_norm"], rel=1e-3)
    for name, p in plain["params"].items():  # same Adam math on the same fp32 main params
        torch.testing.assert_close(dist_opt["params"][name], p, atol=1e-2, rtol=0)
    # reloaded weights + optimizer state give the same next update as the actor that saved them
    first, second = out["resumed"]["first"], out["resumed"]["second"]
    assert second["actor/grad_norm"] == pytest.approx(first["actor/grad_norm"], rel=1e-3)
    assert second["actor/pg_loss"] == pytest.approx(first["actor/pg_loss"], rel=1e-3, abs=1e-6)
