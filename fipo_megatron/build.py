"""Every object a run is made of, built from a ``FipoConfig``: start here to see what a run consists of.

``build_run_parts(cfg, rank=, run_dir=)`` runs on every rank and returns ``RunParts``: tokenizer, model
directory and HF config everywhere; prompt data, sampler, rollout engine, scorer and the overlong penalty
on rank 0 (``None`` elsewhere; an engine also on node leaders under ``rollout.placement=per_node``). The
Megatron actor comes from ``build_actor``.

``model.path: tiny:<family>`` makes a random tiny HF model sized to the tokenizer (rank 0 writes it to
``<run_dir>/hf_init`` once; a resumed run reuses it), so the embedded engine and the Megatron actor start
from the same weights and token ids.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from fipo_megatron.algo.rewards import get_reward, reward_failure_score
from fipo_megatron.config import FipoConfig
from fipo_megatron.data.dataset import PromptDataset, PromptSampler, load_prompt_dataset
from fipo_megatron.data.scoring import ScoreRunner
from fipo_megatron.data.synthetic import make_synthetic_rows, save_synthetic_tokenizer, synthetic_tokenizer
from fipo_megatron.data.tokenizer import load_tokenizer
from fipo_megatron.log import get_logger
from fipo_megatron.rollout.base import RolloutEngine, SamplingParams, get_engine
from fipo_megatron.rollout.node_engines import RolloutPlacement
from fipo_megatron.rollout.phase import RolloutPhase

logger = get_logger(__name__)

TINY_PREFIX = "tiny:"


@dataclass(kw_only=True)
class RunParts:
    """Everything the loop needs besides the actor. ``engine``: on every rank that holds one (rank 0, and
    node leaders under ``per_node``), else None. ``rollout``: rank 0's rollout phase, which owns the prompt
    data, the sampler and the scorer (None elsewhere)."""

    tokenizer: Any
    hf_dir: str
    hf_config: Any
    sampling: SamplingParams
    engine: RolloutEngine | None = None
    rollout: RolloutPhase | None = None
    sync_bucket_bytes: int = 512 << 20


def build_tokenizer(cfg: FipoConfig):
    """The synthetic task's character tokenizer, or the model's (``model.tokenizer_path`` or ``model.path``)."""
    if cfg.data.synthetic.enable:
        return synthetic_tokenizer(num_digits=cfg.data.synthetic.num_digits)
    if cfg.model.path.startswith(TINY_PREFIX) and not cfg.model.tokenizer_path:
        raise ValueError("model.path tiny:* needs data.synthetic.enable or a model.tokenizer_path")
    return load_tokenizer(cfg.model.tokenizer_path or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def materialise_model_dir(cfg: FipoConfig, tokenizer, *, rank: int, run_dir: str) -> str:
    """The HF model directory: ``model.path``, or a tiny random model written once by rank 0."""
    if not cfg.model.path.startswith(TINY_PREFIX):
        return cfg.model.path
    out = os.path.join(run_dir, "hf_init")
    if rank == 0 and not os.path.isfile(os.path.join(out, "config.json")):
        from fipo_megatron.testing.tiny_models import tiny_hf_model

        family = cfg.model.path[len(TINY_PREFIX):]
        special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if getattr(tokenizer, k, None) is not None}
        model = tiny_hf_model(family, seed=cfg.trainer.seed, vocab_size=len(tokenizer), **special,
                              **cfg.model.tiny_overrides)
        tmp = f"{out}.tmp"
        model.save_pretrained(tmp)
        if hasattr(tokenizer, "to_dict"):
            save_synthetic_tokenizer(tokenizer, tmp)
        else:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(out):  # a directory left without config.json by a crash
            shutil.rmtree(out)
        os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return out


def build_engine(cfg: FipoConfig, hf_dir: str) -> RolloutEngine:
    """The configured rollout engine (``rollout.engine``, ``rollout.engine_kwargs``) serving ``hf_dir``."""
    engine = get_engine(cfg.rollout.engine, model_path=hf_dir, **cfg.rollout.engine_kwargs)
    engine.connect_weight_sync()  # disaggregated servers: join their weight-sync groups now, not at the first sync
    return engine


def build_scorer(cfg: FipoConfig) -> ScoreRunner:
    """The rule reward of ``reward.reward_fn``, each call under ``reward.timeout_s``, each batch under
    ``reward.batch_timeout_s``."""
    score_fn, wrong = resolve_score_fn(cfg)
    return ScoreRunner(score_fn=score_fn, timeout_s=cfg.reward.timeout_s, wrong_score=wrong,
                       num_workers=cfg.reward.num_workers, batch_timeout_s=cfg.reward.batch_timeout_s)


def build_overlong_penalty(cfg: FipoConfig) -> Callable[[int], float] | None:
    """DAPO's overlong shaping as a function of the response length, or None when disabled."""
    ob = cfg.reward.overlong_buffer
    if not ob.enable:
        return None
    from fipo_megatron.algo.rewards import overlong_penalty

    max_len = cfg.data.max_response_length
    return lambda length: overlong_penalty(response_length=length, max_response_length=max_len,
                                           buffer_length=ob.len, penalty_factor=ob.penalty_factor)


def resolve_score_fn(cfg: FipoConfig) -> tuple[Callable[..., Any], float]:
    """(score function, the score of a failed/timed-out call) for ``reward.reward_fn`` (the reward registry;
    importing ``fipo_megatron.data`` registered the package's own rewards)."""
    name = cfg.reward.reward_fn
    if name == "auto":
        name = "synthetic" if cfg.data.synthetic.enable else "dapo_math"
    return get_reward(name), reward_failure_score(name)


def _load_prompts(cfg: FipoConfig, tokenizer, *, files: list[str], synthetic_rows: int, seed: int) -> PromptDataset:
    d = cfg.data
    rows = None
    if d.synthetic.enable:
        rows = make_synthetic_rows(task=d.synthetic.task, num_rows=synthetic_rows, num_digits=d.synthetic.num_digits,
                                   prompt_digits=d.synthetic.prompt_digits, seed=seed)
    return load_prompt_dataset(files=files, rows=rows, tokenizer=tokenizer, max_prompt_length=d.max_prompt_length,
                               prompt_key=d.prompt_key, ground_truth_key=d.ground_truth_key,
                               data_source_key=d.data_source_key, chat_template=d.chat_template,
                               raw_template=d.raw_template)


def build_rollout_phase(cfg: FipoConfig, *, engine: RolloutEngine, tokenizer, sampling: SamplingParams,
                        train_data: PromptDataset, val_data: PromptDataset | None, sampler: PromptSampler,
                        scorer: ScoreRunner) -> RolloutPhase:
    """Rank 0's rollout phase over these parts, with the step's shape and the reward shaping from ``cfg``."""
    fg, r = cfg.algorithm.filter_groups, cfg.rollout
    return RolloutPhase(
        engine=engine, train_data=train_data, sampler=sampler, tokenizer=tokenizer, scorer=scorer,
        sampling=sampling, overlong_penalty=build_overlong_penalty(cfg),
        num_prompts=cfg.data.train_batch_size, gen_batch_size=cfg.gen_batch_size,
        mini_batch_size=cfg.actor.ppo_mini_batch_size, max_response_length=cfg.data.max_response_length,
        filter_metric=fg.metric if fg.enable else None, max_num_gen_batches=fg.max_num_gen_batches,
        on_exhausted=fg.on_exhausted, adv_estimator=cfg.algorithm.adv_estimator,
        norm_adv_by_std=cfg.algorithm.norm_adv_by_std_in_grpo,
        seed=cfg.sampling.seed if cfg.sampling.seed is not None else cfg.trainer.seed,
        val_data=val_data,
        val_sampling=dataclasses.replace(sampling, n=r.val_n, temperature=r.val_temperature, top_p=r.val_top_p))


def build_run_parts(cfg: FipoConfig, *, rank: int, run_dir: str, placement: RolloutPlacement | None = None) -> RunParts:
    """Tokenizer and model directory on every rank; the engine where ``placement`` puts one (default: rank
    0 only); the rollout phase (prompt data, sampler, scorer) on rank 0."""
    from transformers import AutoConfig

    tokenizer = build_tokenizer(cfg)
    hf_dir = materialise_model_dir(cfg, tokenizer, rank=rank, run_dir=run_dir)
    hf_config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=cfg.model.trust_remote_code)
    stop = set(cfg.sampling.stop_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        stop.add(int(eos))
    sampling = dataclasses.replace(cfg.sampling, stop_token_ids=tuple(sorted(stop)))
    parts = RunParts(tokenizer=tokenizer, hf_dir=hf_dir, hf_config=hf_config, sampling=sampling,
                     sync_bucket_bytes=cfg.rollout.sync_bucket_mb << 20)
    placement = placement or RolloutPlacement()
    if rank != 0:
        if placement.engine_here:
            parts.engine = build_engine(cfg, hf_dir)
        return parts
    d = cfg.data
    # Data first: a bad prompt file fails before an engine is started.
    train_data = _load_prompts(cfg, tokenizer, files=d.train_files, synthetic_rows=d.synthetic.num_train, seed=d.seed)
    val_data = None
    if d.val_files or (d.synthetic.enable and d.synthetic.num_val):
        val_data = _load_prompts(cfg, tokenizer, files=d.val_files, synthetic_rows=d.synthetic.num_val, seed=d.seed + 1)
    sampler = PromptSampler(num_prompts=len(train_data), seed=d.seed, shuffle=d.shuffle)
    scorer = build_scorer(cfg)
    parts.engine = placement.driven_engine(build_engine(cfg, hf_dir))
    parts.rollout = build_rollout_phase(cfg, engine=parts.engine, tokenizer=tokenizer, sampling=sampling,
                                        train_data=train_data, val_data=val_data, sampler=sampler, scorer=scorer)
    logger.info("data: %d train prompts%s; engine %s", len(train_data),
                f", {len(val_data)} val prompts" if val_data else "", type(parts.engine).__name__)
    return parts


def build_actor(cfg: FipoConfig, parts: RunParts):
    """The Megatron actor (``actor/actor.py``) on this rank's shard of ``parts.hf_dir``'s weights.
    Every rank calls it: building the model chunks sets up Megatron's process groups."""
    from fipo_megatron.actor.actor import MegatronActor

    actor = MegatronActor(hf_config=parts.hf_config, parallel=cfg.parallel, actor_config=cfg.actor,
                          loss_config=cfg.policy_loss)
    actor.load_hf_weights(parts.hf_dir)
    return actor
