"""FP8 from the config: actor precision (format, scaling recipe) and block-FP8 rollout weights.

What is checked: field validation names the field; the recipes' FP8 variants load and differ from their
bf16 recipe only in the FP8 keys; the engine override carries exactly the quantization_config the export
layout needs; and on a machine without CUDA (or without Transformer Engine) both are refused with a clear
ValueError before any model is built.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from fipo_megatron.actor.config import ActorConfig
from fipo_megatron.config import RolloutConfig, config_to_dict, load_config
from fipo_megatron.models import builder
from fipo_megatron.weights import fp8

ROOT = os.path.join(os.path.dirname(__file__), "..")
RECIPES = ["qwen2.5_math_7b_fipo", "qwen2.5_32b_fipo"]


@pytest.mark.parametrize("kwargs,field", [
    (dict(precision="fp16"), "precision"),
    (dict(precision="fp8", fp8_format="e5m2"), "fp8_format"),
    (dict(precision="fp8", fp8_recipe="mxfp4"), "fp8_recipe"),
    (dict(precision="fp8", params_dtype="float32"), "params_dtype"),
])
def test_actor_precision_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ActorConfig(**kwargs)


def test_fp8_model_kwargs():
    assert ActorConfig().fp8_model_kwargs() == {}
    cfg = ActorConfig(precision="fp8", fp8_format="e4m3", fp8_recipe="blockwise")
    assert cfg.fp8_model_kwargs() == {"fp8": "e4m3", "fp8_recipe": "blockwise"}
    # every recipe the actor accepts is one the builder accepts
    for recipe in ("delayed", "tensorwise", "blockwise"):
        assert recipe in builder.FP8_RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_fp8_recipe_variants(name):
    base = config_to_dict(load_config(os.path.join(ROOT, "examples", "configs", f"{name}.yaml")))
    var_cfg = load_config(os.path.join(ROOT, "examples", "configs", f"{name}_fp8.yaml"))
    var = config_to_dict(var_cfg)
    assert var_cfg.actor.precision == "fp8" and var_cfg.rollout.weights_fp8
    diffs = {(sec, key) for sec in base for key in set(base[sec]) | set(var[sec])
             if base[sec].get(key) != var[sec].get(key)}
    assert diffs == {("actor", "precision"), ("actor", "fp8_format"), ("actor", "fp8_recipe"),
                     ("rollout", "weights_fp8"), ("rollout", "engine_kwargs"), ("trainer", "experiment_name")}
    extra = dict(var_cfg.rollout.engine_kwargs)
    assert {k: v for k, v in extra.items() if k != "extra"} == base["rollout"]["engine_kwargs"]
    override = json.loads(extra["extra"]["json_model_override_args"])
    assert override == {"quantization_config": fp8.fp8_quantization_config()}


def test_rollout_fp8_refused_for_other_engines():
    for engine in ("embedded", "vllm", "auto"):
        with pytest.raises(ValueError, match="rollout.weights_fp8"):
            RolloutConfig(engine=engine, weights_fp8=True)
    assert RolloutConfig(engine="sglang_server", weights_fp8=True).weights_fp8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_fp8_refused_without_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        builder.require_fp8_training()
    with pytest.raises(ValueError, match="rollout.weights_fp8.*CUDA"):
        fp8.require_fp8_rollout()
    # the actor refuses before initialising anything (no process group exists in this test)
    from fipo_megatron.actor.actor import MegatronActor
    from fipo_megatron.algo.policy_loss import PolicyLossConfig
    from fipo_megatron.parallel.topology import ParallelConfig
    from fipo_megatron.testing.tiny_models import tiny_hf_config

    with pytest.raises(ValueError, match="ActorConfig.precision='fp8' needs a CUDA GPU"):
        MegatronActor(hf_config=tiny_hf_config("qwen2"), parallel=ParallelConfig(),
                      actor_config=ActorConfig(precision="fp8"), loss_config=PolicyLossConfig())


def test_fp8_refused_without_transformer_engine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builder, "te_available", lambda: False)
    with pytest.raises(ValueError, match="needs Transformer Engine"):
        builder.require_fp8_training(field="actor.precision")


def _trainer_fp8_worker(rank, world_size, tmp):
    from fipo_megatron.trainer import Trainer

    cfg = load_config(os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml"),
                      overrides=["rollout.engine=sglang", "rollout.weights_fp8=true", f"trainer.run_dir={tmp}"])
    try:
        Trainer(cfg)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_trainer_refuses_fp8_rollout_without_cuda(tmp_path):
    from fipo_megatron.testing.distributed import run_distributed

    message = run_distributed(_trainer_fp8_worker, world_size=1, args=(str(tmp_path),), timeout=300)[0]
    assert message is not None and "rollout.weights_fp8=true needs a CUDA GPU" in message


@pytest.mark.parametrize("weights_fp8", [False, True])
def test_trainer_sync_sends_fp8_when_configured(monkeypatch, weights_fp8):
    """The trainer's sync passes rollout.weights_fp8 through its placement to the export (quantisation
    itself: test_weights_fp8)."""
    import types

    from fipo_megatron import trainer as trainer_mod
    from fipo_megatron.rollout.node_engines import RolloutPlacement
    from fipo_megatron.weights import transport as transport_mod

    seen = {}
    monkeypatch.setattr(transport_mod, "sync_weights", lambda *args, **kwargs: seen.update(kwargs) or {})
    fake = types.SimpleNamespace(
        cfg=types.SimpleNamespace(rollout=types.SimpleNamespace(weights_fp8=weights_fp8)),
        parts=types.SimpleNamespace(engine=None, hf_config=None, sync_bucket_bytes=1 << 20),
        actor=types.SimpleNamespace(model_chunks=[], groups=None),
        placement=RolloutPlacement("rank0"))
    trainer_mod.Trainer.sync_weights(fake)
    assert seen["fp8"] is weights_fp8
