"""The run configuration: one typed, frozen dataclass per component, composed in ``FipoConfig``.

    cfg = load_config("examples/configs/tiny_cpu.yaml", overrides=["actor.ppo_mini_batch_size=4"])
    save_config(cfg, "runs/x/config.yaml")          # the resolved config; load_config reads it back

Components that own a config keep it (one source of truth): ``PolicyLossConfig`` (algo/),
``ParallelConfig`` (parallel/), ``ActorConfig`` (actor/), ``SamplingParams`` (rollout/). The YAML keeps
the released FIPO/verl recipe's names, so two YAML sections feed two dataclasses each:

- ``actor:`` holds ``ActorConfig`` fields (``ppo_mini_batch_size``, ``lr`` ...) *and* ``PolicyLossConfig``
  fields (``clip_ratio_low/high/c``, ``loss_agg_mode``, ``decay_rate``, ``future_kl_clip_ratio`` ...),
  as verl's ``actor_rollout_ref.actor``; they land in ``cfg.actor`` and ``cfg.policy_loss``.
- ``rollout:`` holds ``RolloutConfig`` fields (``engine`` ...) and ``SamplingParams`` fields (``n``,
  ``temperature``, ``top_p`` ...); they land in ``cfg.rollout`` and ``cfg.sampling``.
  ``max_new_tokens`` is not settable there: it is ``data.max_response_length``.

Every error (unknown key, wrong type, bad value) is a ``ValueError`` naming the full dotted key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from fipo_megatron.actor.config import ActorConfig
from fipo_megatron.algo.policy_loss import PolicyLossConfig
from fipo_megatron.config_loader import build_dataclass, merge_nested, parse_overrides, to_plain
from fipo_megatron.parallel.topology import ParallelConfig
from fipo_megatron.rollout.base import SamplingParams


@dataclass(frozen=True, kw_only=True)
class SyntheticTaskConfig:
    """The synthetic verifiable task of the CPU demo (``data/synthetic.py``); used when ``enable``.

    ``num_train`` / ``num_val``: rows generated for training and validation (``num_val`` 0: no validation).
    """

    enable: bool = False
    task: Literal["copy_digit", "add_mod"] = "copy_digit"
    num_digits: int = 5        # answer alphabet size: sets the random model's hit rate (~1/vocab)
    prompt_digits: int = 1     # digits shown in the prompt
    num_train: int = 4096
    num_val: int = 64

    def __post_init__(self):
        if not 2 <= self.num_digits <= 10:
            raise ValueError(f"num_digits must be in [2, 10], got {self.num_digits}")
        if self.prompt_digits < 1:
            raise ValueError(f"prompt_digits must be >= 1, got {self.prompt_digits}")
        if self.task == "add_mod" and self.prompt_digits < 2:
            raise ValueError("prompt_digits must be >= 2 for task add_mod")
        if self.num_train < 1 or self.num_val < 0:
            raise ValueError(f"num_train must be >= 1 and num_val >= 0, got {self.num_train}, {self.num_val}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Prompt data (verl / DAPO-Math-17k layout) and the batch geometry of a step.

    ``train_batch_size`` prompts per step (each sampled ``rollout.n`` times); ``gen_batch_size`` prompts
    per generation batch when dynamic sampling needs several (defaults to ``train_batch_size``).
    Prompts longer than ``max_prompt_length`` tokens are counted and skipped, never truncated.
    ``chat_template``: apply the tokenizer's chat template; otherwise ``raw_template`` formats the last
    message's content (``{content}``).

    ``train_files`` / ``val_files``: parquet or jsonl paths (no ``val_files``: no validation, unless the
    synthetic task makes its own). ``prompt_key``, ``ground_truth_key`` (dotted into nested fields) and
    ``data_source_key``: where a row keeps its messages, answer and source. ``shuffle``: a new prompt order
    every epoch; ``seed``: that order's seed (and the synthetic rows': ``seed`` train, ``seed + 1`` val).
    """

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    ground_truth_key: str = "reward_model.ground_truth"
    data_source_key: str = "data_source"
    chat_template: bool = True
    raw_template: str = "{content}"
    train_batch_size: int = 512
    gen_batch_size: int | None = None
    max_prompt_length: int = 2048
    max_response_length: int = 20480
    shuffle: bool = True
    seed: int = 1
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)

    def __post_init__(self):
        for name in ("train_batch_size", "max_prompt_length", "max_response_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gen_batch_size is not None and self.gen_batch_size < 1:
            raise ValueError(f"gen_batch_size must be >= 1, got {self.gen_batch_size}")
        if not self.synthetic.enable and not self.train_files:
            raise ValueError("train_files is empty (give parquet/jsonl paths, or enable data.synthetic)")
        if self.synthetic.enable and (self.train_files or self.val_files):
            raise ValueError("train_files/val_files must be empty when data.synthetic.enable is true")
        if "{content}" not in self.raw_template:
            raise ValueError(f"raw_template must contain '{{content}}', got {self.raw_template!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The policy: an HF checkpoint directory, or ``tiny:<family>`` (a random tiny model of
    ``testing.tiny_models``, for the CPU demo and tests; ``tiny_overrides`` go to its config).
    ``tokenizer_path``: the tokenizer's directory when it is not ``path``'s; ``trust_remote_code`` is passed
    to transformers when it loads the config and the tokenizer."""

    path: str = ""
    tokenizer_path: str | None = None
    tiny_overrides: dict = field(default_factory=dict)
    trust_remote_code: bool = False

    def __post_init__(self):
        if not self.path:
            raise ValueError("path is empty (an HF model directory or tiny:<qwen2|llama|qwen3>)")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Which engine generates (``engine_kwargs`` go to its factory, e.g. SGLang's ``tp_size``; ``num_engines``
    there builds several replicas, ``base_urls`` + ``weight_sync`` point at several SGLang servers: see
    docs/rollout.md), where colocated engines run (``placement``: ``rank0``, one engine driven by global
    rank 0; ``per_node``, one on every node, for any parallel layout), the weight-sync bucket
    size, and validation sampling (``val_n`` responses per prompt, scored as avg@``val_n``, at
    ``val_temperature`` and ``val_top_p``). Training sampling (``n``, ``temperature``, ``top_p``, ``top_k``,
    ``seed``) is ``SamplingParams``, in the same YAML section."""

    engine: str = "auto"
    engine_kwargs: dict = field(default_factory=dict)
    placement: str = "rank0"
    # Weight-sync bucket (MiB). Peak extra memory on an exporting rank, measured on CPU/gloo at tp=2: 2.5x the
    # largest bucket (this, or the largest single tensor if larger) in live bytes, 2.5-5.0x in RSS under
    # glibc's default malloc (tools/benchmarks/bench_sync_memory.py; docs/benchmarks.md).
    sync_bucket_mb: int = 512
    # Send decoder projection weights block-FP8 (e4m3 + float32 ``weight_scale_inv`` per 128x128 block,
    # weights/fp8.py) to an SGLang engine serving a block-FP8 model; needs CUDA.
    weights_fp8: bool = False
    val_n: int = 1
    val_temperature: float = 1.0
    val_top_p: float = 0.7

    def __post_init__(self):
        if self.val_n < 1:
            raise ValueError(f"val_n must be >= 1, got {self.val_n}")
        if self.sync_bucket_mb < 1:
            raise ValueError(f"sync_bucket_mb must be >= 1, got {self.sync_bucket_mb}")
        if not 0.0 < self.val_top_p <= 1.0:
            raise ValueError(f"val_top_p must be in (0, 1], got {self.val_top_p}")
        if self.placement not in ("rank0", "per_node"):
            raise ValueError(f"placement must be 'rank0' or 'per_node', got {self.placement!r}")
        if self.weights_fp8:
            from fipo_megatron.weights.fp8 import check_fp8_rollout_engine

            check_fp8_rollout_engine(self.engine, field="rollout.weights_fp8")
        if self.placement == "per_node" and self.engine == "sglang_server":
            raise ValueError("placement=per_node places colocated engines; SGLang servers run where they were "
                             "launched (list them in engine_kwargs.base_urls, placement=rank0)")


@dataclass(frozen=True, kw_only=True)
class OverlongBufferConfig:
    """DAPO overlong shaping (docs/algorithm.md §6): penalty ``min(-(len - (L - len_buf)) / len_buf * factor, 0)``."""

    enable: bool = True
    len: int = 4096
    penalty_factor: float = 1.0

    def __post_init__(self):
        if self.len < 1:
            raise ValueError(f"len must be >= 1, got {self.len}")
        if self.penalty_factor < 0:
            raise ValueError(f"penalty_factor must be >= 0, got {self.penalty_factor}")


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """``reward_fn``: a registered reward ("dapo_math", "math_verify", "synthetic"); "auto" picks
    "synthetic" for the synthetic task and "dapo_math" otherwise. Each call runs under ``timeout_s``
    (a hung verifier scores as wrong and is counted), and the whole batch under ``batch_timeout_s``, in
    ``num_workers`` processes that are killed when a call overruns (0: threads, only for trusted rules that
    cannot hang: a spinning thread cannot be killed) (``data.scoring.ScoreRunner``)."""

    reward_fn: str = "auto"
    timeout_s: float = 10.0
    num_workers: int = 4       # > 0: scoring processes (killed on timeout); 0: threads in the trainer process
    batch_timeout_s: float = 300.0  # deadline for scoring one generation batch; unfinished calls score wrong
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not self.batch_timeout_s > 0:
            raise ValueError(f"batch_timeout_s must be > 0, got {self.batch_timeout_s}")
        if self.reward_fn != "auto":
            import fipo_megatron.data  # noqa: F401  (registers the package's own rewards)
            from fipo_megatron.algo.rewards import get_reward

            try:
                get_reward(self.reward_fn)
            except (KeyError, ValueError) as exc:
                raise ValueError(f"reward_fn {self.reward_fn!r} is not registered ({exc})") from None


@dataclass(frozen=True, kw_only=True)
class FilterGroupsConfig:
    """DAPO dynamic sampling: drop groups whose ``metric`` is identical for all responses.

    ``on_exhausted``: what a step does when ``max_num_gen_batches`` generation batches still leave the prompt
    batch short: ``train`` on the whole mini-batches it has (logged as ``batch/num_prompts``), or ``raise``
    as DAPO's reference trainer does (the run stops after checkpointing the previous step)."""

    enable: bool = True
    metric: Literal["acc", "score", "seq_reward"] = "acc"
    max_num_gen_batches: int = 10
    on_exhausted: Literal["train", "raise"] = "train"

    def __post_init__(self):
        if self.max_num_gen_batches < 0:
            raise ValueError(f"max_num_gen_batches must be >= 0 (0 = unlimited), got {self.max_num_gen_batches}")


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    """Advantage estimator and dynamic sampling (the loss itself is ``actor.*`` / PolicyLossConfig).

    ``adv_estimator``: a registered estimator (``algo.advantages``: "grpo", "grpo_no_std");
    ``norm_adv_by_std_in_grpo: false`` makes "grpo" skip the division by the group's std (docs/algorithm.md §6).
    """

    adv_estimator: str = "grpo"
    norm_adv_by_std_in_grpo: bool = True
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)

    def __post_init__(self):
        from fipo_megatron.algo.advantages import get_advantage

        try:
            get_advantage(self.adv_estimator)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"adv_estimator {self.adv_estimator!r} is not registered ({exc})") from None


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Run checkpoints under ``<run_dir>/checkpoints``: every ``save_interval`` steps (0: no periodic saves)
    and, with ``save_at_end``, after the last step; the last ``keep_last`` kept. ``resume``: "auto" (latest
    if any), "never", or a path."""

    save_interval: int = 50
    keep_last: int = 2
    resume: str = "auto"
    save_at_end: bool = True

    def __post_init__(self):
        if self.save_interval < 0:
            raise ValueError(f"save_interval must be >= 0, got {self.save_interval}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Metrics go to ``<run_dir>/metrics.jsonl`` always; TensorBoard and wandb when enabled. The
    train/rollout mismatch (``rollout/logprob_*``) is logged every step: it compares the engine's log-probs
    with the old log-probs the actor recomputes anyway.
    ``token_records_interval``: every N steps write per-token records of ``token_records_samples`` responses
    of the last mini-batch to ``<run_dir>/token_records.jsonl`` (``token_records.py``; 0 = never, the
    default: each record holds ~10 numbers per token). ``progress_bar``: a progress bar on rank 0."""

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "fipo_megatron"
    wandb_run_name: str | None = None
    progress_bar: bool = True
    token_records_interval: int = 0   # per-token records every N steps (0 = never)
    token_records_samples: int = 4    # responses per recorded step

    def __post_init__(self):
        if self.token_records_interval < 0:
            raise ValueError(f"token_records_interval must be >= 0 (0 = never), got {self.token_records_interval}")
        if self.token_records_samples < 1:
            raise ValueError(f"token_records_samples must be >= 1, got {self.token_records_samples}")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Run length and bookkeeping. ``run_dir`` "" means ``runs/<experiment_name>``. The run length is
    ``total_training_steps`` (the prompt sampler wraps into new epochs as needed). ``seed``: the sampling
    seeds' base when ``rollout.seed`` is unset, the tiny model's initialisation and the choice of token
    records. ``val_interval``: validate every N steps (0: never); ``val_before_train``: also before the first
    step of a fresh run."""

    total_training_steps: int = 100
    seed: int = 1
    run_dir: str = ""
    experiment_name: str = "fipo"
    val_interval: int = 0
    val_before_train: bool = False
    # Stop (exit code 3) after this many steps in a row without progress: every optimizer step skipped for a
    # non-finite loss/gradient, a non-finite reward, or no update at all. 0 = no limit.
    max_consecutive_skipped_steps: int = 10
    # A checkpoint whose weights' norm grew more than this many times since the last passing checkpoint (or
    # the run's start) is saved but marked as not passing, so rotation keeps the older good one. 0 = off.
    max_weight_norm_growth: float = 10.0
    # After SIGTERM: save at the next step boundary and exit (code 143); exit anyway after this many seconds.
    sigterm_grace_s: float = 25.0
    # A fresh run (nothing to resume) refuses a run_dir holding an earlier run's files unless this is set;
    # then those files (checkpoints, metrics, config) are removed first.
    overwrite: bool = False

    def __post_init__(self):
        if self.total_training_steps < 1:
            raise ValueError(f"total_training_steps must be >= 1, got {self.total_training_steps}")
        if self.max_consecutive_skipped_steps < 0:
            raise ValueError(f"max_consecutive_skipped_steps must be >= 0, got {self.max_consecutive_skipped_steps}")
        if not self.sigterm_grace_s > 0:
            raise ValueError(f"sigterm_grace_s must be > 0, got {self.sigterm_grace_s}")
        if not self.max_weight_norm_growth >= 0:
            raise ValueError(f"max_weight_norm_growth must be >= 0 (0 = off), got {self.max_weight_norm_growth}")
        if self.val_interval < 0:
            raise ValueError(f"val_interval must be >= 0, got {self.val_interval}")


# YAML section -> (FipoConfig attribute, dataclass) pairs that share it.
_SECTIONS: dict[str, tuple[tuple[str, type], ...]] = {
    "data": (("data", DataConfig),),
    "model": (("model", ModelConfig),),
    "rollout": (("rollout", RolloutConfig), ("sampling", SamplingParams)),
    "reward": (("reward", RewardConfig),),
    "algorithm": (("algorithm", AlgorithmConfig),),
    "actor": (("actor", ActorConfig), ("policy_loss", PolicyLossConfig)),
    "parallel": (("parallel", ParallelConfig),),
    "checkpoint": (("checkpoint", CheckpointConfig),),
    "logging": (("logging", LoggingConfig),),
    "trainer": (("trainer", TrainerConfig),),
}
# Keys another section determines: the user sets the source, never the copy.
_DERIVED = {("rollout", "max_new_tokens"): "data.max_response_length"}
# Keys that moved to another section: an old config names the new place in its error.
_MOVED = {("actor", "use_distributed_optimizer"): "parallel.use_distributed_optimizer"}


@dataclass(frozen=True, kw_only=True)
class FipoConfig:
    """Everything one run needs; built by :func:`load_config` and validated across components."""

    data: DataConfig
    model: ModelConfig
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        d, a = self.data, self.actor
        if self.sampling.max_new_tokens != d.max_response_length:
            raise ValueError(f"rollout.max_new_tokens ({self.sampling.max_new_tokens}) must equal "
                             f"data.max_response_length ({d.max_response_length})")
        if d.train_batch_size % a.ppo_mini_batch_size:
            raise ValueError(f"data.train_batch_size ({d.train_batch_size}) must be a multiple of "
                             f"actor.ppo_mini_batch_size ({a.ppo_mini_batch_size})")
        if self.reward.overlong_buffer.enable and self.reward.overlong_buffer.len >= d.max_response_length:
            raise ValueError(f"reward.overlong_buffer.len ({self.reward.overlong_buffer.len}) must be < "
                             f"data.max_response_length ({d.max_response_length})")
        if self.algorithm.filter_groups.enable and self.sampling.n < 2:
            raise ValueError("algorithm.filter_groups.enable needs rollout.n >= 2 (groups of one always agree)")
        if self.sampling.temperature == 0 and self.sampling.n > 1:
            raise ValueError(f"rollout.temperature=0 with rollout.n={self.sampling.n}: greedy decoding makes every "
                             "response of a group identical, so no group has an advantage and no update happens; "
                             "use a temperature > 0 or n=1")

    @property
    def run_dir(self) -> str:
        """``trainer.run_dir``, or ``runs/<trainer.experiment_name>``."""
        return self.trainer.run_dir or os.path.join("runs", self.trainer.experiment_name)

    @property
    def gen_batch_size(self) -> int:
        """Prompts per generation batch: ``data.gen_batch_size``, or ``data.train_batch_size`` when unset."""
        return self.data.gen_batch_size or self.data.train_batch_size


def config_from_dict(raw: dict) -> FipoConfig:
    """Build and validate a ``FipoConfig`` from a nested dict (YAML layout, see the module docstring)."""
    if not isinstance(raw, dict):
        raise ValueError(f"config must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s): {unknown}; valid: {sorted(_SECTIONS)}")
    kwargs: dict[str, Any] = {}
    for section, owners in _SECTIONS.items():
        if not isinstance(raw.get(section) or {}, dict):
            raise ValueError(f"{section}: expected a mapping, got {type(raw[section]).__name__}")
        values = dict(raw.get(section) or {})
        for (sec, key), source in _DERIVED.items():
            if sec == section and key in values:
                raise ValueError(f"{section}.{key} is derived from {source}; set that instead")
        for (sec, key), target in _MOVED.items():
            if sec == section and key in values:
                raise ValueError(f"{section}.{key} has moved to {target}; set it there instead")
        if section == "rollout":
            values["max_new_tokens"] = (raw.get("data") or {}).get("max_response_length", DataConfig.max_response_length)
        # A key goes to every owner that declares it, so a field both declare stays consistent.
        declared = set().union(*({f.name for f in dataclasses.fields(cls) if f.init} for _, cls in owners))
        unknown = sorted(set(values) - declared)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(f'{section}.{k}' for k in unknown)}; "
                             f"valid keys of {section}: {sorted(declared - {'max_new_tokens'})}")
        for attr, cls in owners:
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            kwargs[attr] = build_dataclass(cls, {k: v for k, v in values.items() if k in names}, prefix=section)
    try:
        return FipoConfig(**kwargs)
    except ValueError:
        raise
    except TypeError as exc:  # pragma: no cover - a missing required section
        raise ValueError(str(exc)) from exc


def load_config(path: str | None = None, *, overrides: list[str] | tuple[str, ...] = ()) -> FipoConfig:
    """Read YAML ``path`` (or start empty), apply dotted ``overrides`` (``a.b=value``), validate."""
    raw: dict = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    return config_from_dict(merge_nested(raw, parse_overrides(list(overrides))))


def config_to_dict(cfg: FipoConfig) -> dict:
    """The YAML layout of ``cfg`` (shared sections merged back); ``config_from_dict`` inverts it."""
    out: dict[str, dict] = {}
    for section, owners in _SECTIONS.items():
        merged: dict = {}
        for attr, _ in owners:
            for k, v in to_plain(getattr(cfg, attr)).items():
                merged.setdefault(k, v)
        for (sec, key) in _DERIVED:
            if sec == section:
                merged.pop(key, None)
        out[section] = merged
    return out


def save_config(cfg: FipoConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically: temp file then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from fipo_megatron.checkpoint.fs import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=False)

    atomic_write(path, write)
