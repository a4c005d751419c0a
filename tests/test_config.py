"""Run config: YAML + dotted overrides, errors that name the full dotted field, resolved-config round trip,
and every shipped example config loads."""

from __future__ import annotations

import glob
import os

import pytest

from fipo_megatron.config import FipoConfig, config_to_dict, load_config, save_config
from fipo_megatron.config_loader import parse_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = """
data: {synthetic: {enable: true}, train_batch_size: 8, max_prompt_length: 16, max_response_length: 6}
model: {path: "tiny:llama"}
rollout: {n: 4, temperature: 1.0, engine: embedded}
reward: {overlong_buffer: {enable: true, len: 2, penalty_factor: 0.5}}
actor: {ppo_mini_batch_size: 2, lr: 1e-3, clip_ratio_c: 10.0, decay_rate: 32, loss_agg_mode: token-mean}
algorithm: {filter_groups: {enable: true, max_num_gen_batches: 3}}
"""


@pytest.fixture()
def base(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return str(path)


def test_yaml_and_overrides(base):
    cfg = load_config(base, overrides=["actor.ppo_mini_batch_size=4", "rollout.top_p=0.7", "actor.lr=2e-6",
                                       "algorithm.filter_groups.enable=false", "actor.future_kl_clip_high_only=false",
                                       "parallel.tp=2", "data.synthetic.num_val=3"])
    assert isinstance(cfg, FipoConfig)
    assert cfg.actor.ppo_mini_batch_size == 4 and cfg.actor.lr == 2e-6
    assert cfg.sampling.top_p == 0.7 and cfg.sampling.n == 4 and cfg.sampling.max_new_tokens == 6
    assert cfg.policy_loss.decay_rate == 32.0 and isinstance(cfg.policy_loss.decay_rate, float)
    assert cfg.policy_loss.future_kl_clip_high_only is False
    assert cfg.algorithm.filter_groups.enable is False and cfg.algorithm.filter_groups.max_num_gen_batches == 3
    assert cfg.data.synthetic.num_val == 3 and cfg.parallel.tp == 2
    assert cfg.rollout.engine == "embedded" and cfg.reward.overlong_buffer.len == 2
    assert parse_overrides(["a.b.c=1e-6", "a.d=true", "a.e=", "x=hello"]) == \
        {"a": {"b": {"c": 1e-6}, "d": True, "e": ""}, "x": "hello"}


@pytest.mark.parametrize("override, field", [
    ("actor.ppo_mini_batch_sise=4", "actor.ppo_mini_batch_sise"),          # unknown key (typo)
    ("rollout.nn=4", "rollout.nn"),                                        # unknown key in a shared section
    ("algorithm.filter_groups.metrc=acc", "algorithm.filter_groups.metrc"),  # unknown nested key
    ("bogus.x=1", "bogus"),                                                # unknown section
    ("actor.ppo_mini_batch_size=four", "actor.ppo_mini_batch_size"),       # wrong type: str for int
    ("actor.ppo_mini_batch_size=2.5", "actor.ppo_mini_batch_size"),        # wrong type: float for int
    ("data.shuffle=3", "data.shuffle"),                                    # wrong type: int for bool
    ("actor.lr=fast", "actor.lr"),                                         # wrong type: str for float
    ("algorithm.filter_groups.metric=loss", "algorithm.filter_groups.metric"),  # not a Literal choice
    ("actor.clip_ratio_c=0.5", "actor.clip_ratio_c"),                      # bad value (PolicyLossConfig)
    ("actor.lr=-1", "actor.lr"),                                           # bad value (ActorConfig)
    ("rollout.top_p=1.5", "rollout.top_p"),                                # bad value (SamplingParams)
    ("parallel.tp=0", "parallel.tp"),                                      # bad value (ParallelConfig)
    ("data.train_batch_size=0", "data.train_batch_size"),                  # bad value (DataConfig)
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),                    # bad value (CheckpointConfig)
    ("data.train_files=[a.jsonl]", "data.train_files"),                    # files and synthetic together
    ("rollout.max_new_tokens=5", "data.max_response_length"),              # derived key
    ("actor.use_distributed_optimizer=true", "parallel.use_distributed_optimizer"),  # moved key
    ("data.train_batch_size=7", "actor.ppo_mini_batch_size"),              # cross-field: not a multiple
    ("reward.overlong_buffer.len=6", "reward.overlong_buffer.len"),        # cross-field: buffer >= max length
    ("rollout.placement=everywhere", "rollout.placement"),                 # not a placement
])
def test_errors_name_the_field(base, override, field):
    with pytest.raises(ValueError) as info:
        load_config(base, overrides=override.split(" "))
    assert field in str(info.value), str(info.value)


def test_missing_required_and_bad_override(tmp_path):
    with pytest.raises(ValueError, match="model.path"):
        load_config(overrides=["data.synthetic.enable=true"])
    with pytest.raises(ValueError, match="data.train_files"):
        load_config(overrides=["model.path=/x"])
    with pytest.raises(ValueError, match="dotted.key=value"):
        parse_overrides(["actor.lr"])


def test_resolved_config_round_trip(base, tmp_path):
    cfg = load_config(base, overrides=["actor.clip_ratio_high=0.3", "rollout.stop_token_ids=[5, 6]"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(out))
    again = load_config(str(out))
    assert again == cfg
    assert config_to_dict(again)["actor"]["clip_ratio_high"] == 0.3
    assert "max_new_tokens" not in config_to_dict(again)["rollout"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "examples", "configs", "*.yaml"))))
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.data.train_batch_size % cfg.actor.ppo_mini_batch_size == 0


def test_cli_rejects_bad_override_before_starting(base):
    from fipo_megatron.cli import main

    with pytest.raises(ValueError, match="actor.ppo_mini_batch_size"):
        main(["--config", base, "actor.ppo_mini_batch_size=x"])
    import torch.distributed as dist

    assert not dist.is_initialized()  # validation happens before any process group exists


def test_cli_resume_flags(base, monkeypatch):
    import fipo_megatron.cli as cli
    import fipo_megatron.config as config_mod

    seen = []

    def fake_load(path, *, overrides=()):
        seen.append(list(overrides))
        raise ValueError("stop here")

    monkeypatch.setattr(config_mod, "load_config", fake_load)
    for argv, want in ((["--resume"], "checkpoint.resume=auto"), (["--resume", "/ck/step_00000010"],
                        "checkpoint.resume=/ck/step_00000010"), (["--no-resume"], "checkpoint.resume=never")):
        with pytest.raises(ValueError, match="stop here"):
            cli.main(["--config", base, "actor.lr=1e-5", *argv])
        assert seen[-1] == ["actor.lr=1e-5", want]


def test_per_node_layout_checks():
    from fipo_megatron.config import load_config
    from fipo_megatron.rollout.node_engines import node_leaders, weights_stay_on_node

    assert node_leaders(16, 8) == [0, 8] and node_leaders(4, 4) == [0]
    with pytest.raises(ValueError, match="multiple of the ranks per node"):
        node_leaders(12, 8)
    # whole replicas on every node: each feeds its own node's engine; any other layout: stage broadcasts
    assert weights_stay_on_node(tp=4, pp=1, cp=2, ranks_per_node=8)
    assert not weights_stay_on_node(tp=4, pp=1, cp=4, ranks_per_node=8)
    assert not weights_stay_on_node(tp=8, pp=2, cp=1, ranks_per_node=8)
    cfg = load_config(os.path.join(REPO, "examples", "configs", "qwen2.5_32b_fipo.yaml"))  # pp 2, per node
    assert cfg.rollout.placement == "per_node" and cfg.parallel.pp == 2
    with pytest.raises(ValueError, match="placement=per_node places colocated engines"):
        from fipo_megatron.config import RolloutConfig

        RolloutConfig(engine="sglang_server", placement="per_node")


def test_optional_nested_config_error_names_the_nested_field():
    import dataclasses
    import typing

    from fipo_megatron.config_loader import coerce_value

    @dataclasses.dataclass
    class Inner:
        x: int = 1

    with pytest.raises(ValueError, match=r"^a\.b\.x: expected an int, got str 'abc'"):
        coerce_value(typing.Optional[Inner], {"x": "abc"}, "a.b")
