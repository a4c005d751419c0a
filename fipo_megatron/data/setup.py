"""Build what the trainer consumes from a config: tokenizer, model directory, prompts, engine, scorer.

``build_model_and_data(cfg, rank=, run_dir=)`` runs on every rank; the parts only rank 0 needs (prompt
data, sampler, rollout engine, scorer) are ``None`` elsewhere. ``model.path: tiny:<family>`` makes a random
tiny HF model sized to the tokenizer (rank 0 writes it to ``<run_dir>/hf_init`` once; a resumed run
reuses it), so the embedded engine and the Megatron actor start from the same weights and token ids.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from fipo_megatron.config import FipoConfig
from fipo_megatron.data.dataset import PromptDataset, PromptSampler, load_prompt_dataset
from fipo_megatron.data.scoring import ScoreRunner, math_verify_score
from fipo_megatron.data.synthetic import (make_synthetic_rows, save_synthetic_tokenizer, synthetic_score,
                                          synthetic_tokenizer)
from fipo_megatron.data.tokenizer import load_tokenizer
from fipo_megatron.log import get_logger
from fipo_megatron.rollout.base import SamplingParams

logger = get_logger(__name__)

TINY_PREFIX = "tiny:"


@dataclass(kw_only=True)
class RunParts:
    """Everything the loop needs besides the actor. Rank-0-only fields are None on other ranks."""

    tokenizer: Any
    hf_dir: str
    hf_config: Any
    sampling: SamplingParams
    train_data: PromptDataset | None = None
    val_data: PromptDataset | None = None
    sampler: PromptSampler | None = None
    engine: Any = None
    scorer: ScoreRunner | None = None
    overlong_penalty: Callable[[int], float] | None = None
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


def _build_engine(cfg: FipoConfig, hf_dir: str):
    from fipo_megatron.rollout.base import get_engine

    engine = get_engine(cfg.rollout.engine, model_path=hf_dir, **cfg.rollout.engine_kwargs)
    engine.connect_weight_sync()  # disaggregated servers: join their weight-sync groups now, not at the first sync
    return engine


def resolve_score_fn(cfg: FipoConfig) -> tuple[Callable[..., Any], float]:
    """(score function, the score of a failed/timed-out call) for ``reward.reward_fn``."""
    name = cfg.reward.reward_fn
    if name == "auto":
        name = "synthetic" if cfg.data.synthetic.enable else "dapo_math"
    if name == "synthetic":
        return synthetic_score, 0.0
    if name == "math_verify":
        return math_verify_score, -1.0
    from fipo_megatron.algo.rewards import get_reward_fn

    return get_reward_fn(name), -1.0


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


def build_model_and_data(cfg: FipoConfig, *, rank: int, run_dir: str, engine_here: bool | None = None) -> RunParts:
    """Tokenizer and model directory on every rank; data, sampler, engine and scorer on rank 0.
    ``engine_here``: build an engine on this rank (default: rank 0 only; node leaders under
    ``rollout.placement=per_node``)."""
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
    if rank != 0:
        if engine_here:
            parts.engine = _build_engine(cfg, hf_dir)
        return parts
    d = cfg.data
    parts.train_data = _load_prompts(cfg, tokenizer, files=d.train_files, synthetic_rows=d.synthetic.num_train, seed=d.seed)
    if d.val_files or (d.synthetic.enable and d.synthetic.num_val):
        parts.val_data = _load_prompts(cfg, tokenizer, files=d.val_files, synthetic_rows=d.synthetic.num_val,
                                       seed=d.seed + 1)
    parts.sampler = PromptSampler(num_prompts=len(parts.train_data), seed=d.seed, shuffle=d.shuffle)
    score_fn, wrong = resolve_score_fn(cfg)
    parts.scorer = ScoreRunner(score_fn=score_fn, timeout_s=cfg.reward.timeout_s, wrong_score=wrong,
                               num_workers=cfg.reward.num_workers)
    ob = cfg.reward.overlong_buffer
    if ob.enable:
        from fipo_megatron.algo.rewards import overlong_penalty

        parts.overlong_penalty = lambda length: overlong_penalty(
            response_length=length, max_response_length=d.max_response_length, buffer_length=ob.len,
            penalty_factor=ob.penalty_factor)
    if engine_here is None or engine_here:
        parts.engine = _build_engine(cfg, hf_dir)
    logger.info("data: %d train prompts%s; engine %s", len(parts.train_data),
                f", {len(parts.val_data)} val prompts" if parts.val_data else "", type(parts.engine).__name__)
    return parts
