"""Actor weights in and out: HF safetensors -> TP shards, and save/resume (model + Adam + LR schedule)."""

from __future__ import annotations

import os

import megatron.core  # noqa: F401  (forked ranks inherit the import)
import pytest
import torch

from fipo_megatron.models.sharding import canonical_name
from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.testing.tiny_models import tiny_hf_model
from conftest import actor_config as _actor_config, full_megatron_state as _full_state, train_batch as _batch


def _worker(rank, world_size, hf_dir, ckpt_dir, hf_config, batch):
    from fipo_megatron.actor.actor import MegatronActor
    from fipo_megatron.algo.policy_loss import PolicyLossConfig
    from fipo_megatron.models.sharding import gather_full_state_dict
    from fipo_megatron.parallel.topology import ParallelConfig, destroy_parallel

    def make():
        return MegatronActor(hf_config=hf_config, parallel=ParallelConfig(tp=world_size),
                             actor_config=_actor_config(lr_warmup_steps=3), loss_config=PolicyLossConfig())

    def weights(actor):
        return gather_full_state_dict(actor.model_chunks, groups=actor.groups, vocab_size=hf_config.vocab_size)

    actor = make()
    actor.load_hf_weights(hf_dir)
    loaded = weights(actor)
    actor.update(batch)
    actor.save_checkpoint(ckpt_dir)
    continued = actor.update(batch)
    continued_weights = weights(actor)
    destroy_parallel()

    resumed_actor = make()
    extra = resumed_actor.load_checkpoint(ckpt_dir)
    resumed = resumed_actor.update(batch)
    resumed_weights = weights(resumed_actor)
    destroy_parallel()
    return dict(loaded=loaded, continued=continued, continued_weights=continued_weights, resumed=resumed,
                resumed_weights=resumed_weights, extra_keys=sorted(extra)) if rank == 0 else None


@pytest.mark.distributed
def test_hf_load_and_resume(tmp_path):
    model = tiny_hf_model("qwen2", seed=3)
    hf_dir = os.path.join(tmp_path, "hf")
    model.save_pretrained(hf_dir)
    out = run_distributed(_worker, 2, args=(hf_dir, str(tmp_path / "ckpt"), model.config, _batch(seed=1)),
                          timeout=300)[0]
    # HF -> Megatron (tp=2) -> gathered equals the mapping's full tensors exactly.
    full = {canonical_name(k): v for k, v in _full_state(model).items()}
    for name, tensor in out["loaded"].items():
        assert torch.equal(tensor, full[name][:tensor.shape[0]]), name
    # Resume: the update after loading equals the update that continued in memory, bit for bit, which
    # needs the weights, Adam's moments and step count, and the warm-up position all restored.
    assert out["resumed"]["actor/lr"] == out["continued"]["actor/lr"] > 0
    assert out["resumed"]["actor/pg_loss"] == out["continued"]["actor/pg_loss"]
    for name, tensor in out["continued_weights"].items():
        assert torch.equal(out["resumed_weights"][name], tensor), name
    assert "scheduler" in out["extra_keys"]
