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
