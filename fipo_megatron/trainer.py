"""The FIPO training loop. Launch through the CLI (``python -m fipo_megatron``)::

    torchrun --nproc-per-node 2 -m fipo_megatron --config examples/configs/tiny_cpu.yaml trainer.run_dir=runs/x

One step of the algorithm (docs/algorithm.md) as ``Trainer.train_step`` runs it, with the owner of each part:

    1. rollout     rank 0 samples ``rollout.n`` responses per prompt with the engine (``rollout/phase.py``);
    2. reward      rule score (each call under a timeout) + DAPO overlong shaping (``rollout/experience.py``);
    3. filter      dynamic sampling: keep groups whose rewards disagree, generating again (at most
                   ``algorithm.filter_groups.max_num_gen_batches`` batches) until the step's prompts are full
                   (if the budget runs out, the step trains on the whole mini-batches it has, or raises as
                   DAPO does with ``filter_groups.on_exhausted=raise``; ``algo/dynamic_sampling.py``);
    4. advantages  GRPO per group (``algo/advantages.py``); the batch is broadcast to every rank
                   (``TrainBatch.to_wire``);
    5. update      ``actor.update``: old log-probs recomputed by the actor, then one FIPO optimizer step per
                   mini-batch (FutureKL acts from the 2nd mini-batch on, docs/algorithm.md §1; ``actor/``);
    6. sync        Megatron shards -> HF tensors in buckets -> the engine's transport (``weights/``);
    7. log / save  metrics.jsonl (+ TensorBoard/wandb), per-token records every ``logging.token_records_interval``
                   steps (``token_records.py``) and, every ``checkpoint.save_interval`` steps, an
                   atomic run checkpoint (model, optimizer, LR, RNG, data position, step).

Every part is built by ``build.py``. The rollout lives on global rank 0 (the embedded engine, or a client
of an SGLang/vLLM server; with ``rollout.placement=per_node`` rank 0 drives an engine on every node,
``rollout/node_engines.py``); every other rank waits in the broadcast. If the rollout raises (an engine
unreachable after its retries) or a weight sync fails, every rank checkpoints the last complete state and
stops (``RolloutError`` / ``WeightSyncError``), so a resume loses nothing. The run guards
(``guards.py``) stop a run after ``trainer.max_consecutive_skipped_steps`` steps without progress, refuse
to checkpoint non-finite weights, and turn SIGTERM into a save at the next step boundary.
"""

from __future__ import annotations

import math
import os
import time

import torch.distributed as dist

from fipo_megatron.batch import TrainBatch
from fipo_megatron.build import build_actor, build_run_parts
from fipo_megatron.checkpoint.manager import CheckpointManager
from fipo_megatron.config import FipoConfig, config_to_dict, save_config
from fipo_megatron.guards import (DivergenceError, PreemptionHandler, SkipGuard, WeightGrowthGuard,
                                  first_non_finite_parameter, parameter_norm, skip_reason)
from fipo_megatron.log import get_logger
from fipo_megatron.metrics import MetricsLogger, PhaseTimer
from fipo_megatron.parallel.topology import collective_device
from fipo_megatron.rollout.mismatch import rollout_mismatch_metrics
from fipo_megatron.rollout.node_engines import RolloutPlacement
from fipo_megatron.token_records import TokenRecorder
from fipo_megatron.weights.fp8 import require_fp8_rollout
from fipo_megatron.weights.transport import WeightSyncError

logger = get_logger(__name__)


class RolloutError(RuntimeError):
    """The rollout failed on rank 0 (an engine unreachable after its retries, a crashed server, ...); raised
    on every rank after the state the failed step started from was checkpointed."""


class Trainer:
    """Builds every part from a ``FipoConfig`` (``build.py``) and runs the loop; call ``fit()`` on every rank."""

    def __init__(self, cfg: FipoConfig):
        if not dist.is_initialized():
            raise RuntimeError("Trainer needs torch.distributed initialised (launch with torchrun or the CLI)")
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.run_dir = cfg.run_dir
        self.timer = PhaseTimer()
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        if cfg.rollout.weights_fp8:
            require_fp8_rollout()  # before anything heavy is built
        # Checked (per_node: ranks per node) before anything heavy is built; a collective on every rank.
        self.placement = RolloutPlacement(cfg.rollout.placement)
        self.parts = build_run_parts(cfg, rank=self.rank, run_dir=self.run_dir, placement=self.placement)
        self.actor = build_actor(cfg, self.parts)
        self.placement.attach(self.actor.groups)
        self.ckpt = CheckpointManager(root=os.path.join(self.run_dir, "checkpoints"), keep_last=cfg.checkpoint.keep_last,
                                      rank=self.rank, barrier=dist.barrier, world_size=dist.get_world_size(),
                                      all_gather=_all_gather_objects)
        self.skips = SkipGuard(max_consecutive=cfg.trainer.max_consecutive_skipped_steps)
        self.growth = WeightGrowthGuard(max_growth=cfg.trainer.max_weight_norm_growth)
        self.step = 0
        self._last_save_s: float | None = None
        self.token_records = TokenRecorder.from_config(cfg, run_dir=self.run_dir, tokenizer=self.parts.tokenizer,
                                                       rank=self.rank)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Resume if a checkpoint says so, then run steps until ``trainer.total_training_steps``: validate
        at ``trainer.val_interval``, log every step, save at ``checkpoint.save_interval`` (every rank)."""
        cfg = self.cfg
        resumed = self._maybe_resume()
        self.growth.start(parameter_norm(self.actor.model_chunks))  # every rank: a collective
        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
                                     wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                     wandb_run_name=cfg.logging.wandb_run_name, config=config_to_dict(cfg),
                                     resume_step=self.step if resumed else None)
        self.token_records.start(resume_step=self.step if resumed else None)
        if resumed:
            self.sync_weights()  # the engine still holds the initial weights
        bar = self._progress_bar()
        preemption = PreemptionHandler(grace_s=cfg.trainer.sigterm_grace_s).__enter__()
        try:
            if cfg.trainer.val_before_train and self.step == 0:
                self.metrics.log(0, self._validate_everywhere())
            while self.step < cfg.trainer.total_training_steps:
                self.step += 1
                metrics = self.train_step()
                if cfg.trainer.val_interval and self.step % cfg.trainer.val_interval == 0:
                    metrics.update(self._validate_everywhere())
                if self._last_save_s is not None:
                    metrics["timing/last_save"], self._last_save_s = self._last_save_s, None
                # Log, then save: a crash in between resumes from the previous checkpoint and re-logs this step.
                self.metrics.log(self.step, metrics)
                # One decision for every rank (only rank 0 has the reward metrics): a diverged run stops here,
                # before its weights reach a checkpoint.
                self.skips.observe(self.step, _broadcast_from_rank0(
                    skip_reason(metrics, updated="actor/num_mini_batches" in metrics) if self.rank == 0 else None))
                last = self.step == cfg.trainer.total_training_steps
                interval = cfg.checkpoint.save_interval
                saved = None
                if (interval and self.step % interval == 0) or (last and cfg.checkpoint.save_at_end):
                    t = time.perf_counter()
                    saved = self.save()
                    self._last_save_s = time.perf_counter() - t
                if preemption.agreed():  # SIGTERM on any rank: this step boundary is the safe point
                    raise preemption.error(self.step, saved=saved or self.save())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3f}" for k in ("reward/mean", "rollout/acc")
                                     if isinstance(metrics.get(k), float)})
        finally:
            preemption.__exit__(None, None, None)
            if bar is not None:
                bar.close()
            self.metrics.close()

    def train_step(self) -> dict[str, float]:
        """One RL step on every rank (the module docstring's 1-6); returns its metrics (complete on rank 0)."""
        timer = self.timer = PhaseTimer()
        t0 = time.perf_counter()
        resume_at_start = self._resume_state()
        # 1-4. rollout, reward, dynamic-sampling filter, GRPO advantages: rank 0 builds the batch, all get it
        with timer("rollout_total"):
            error, outcome = self._rank0_phase(lambda: self.parts.rollout.collect(self.step, timer=timer), "rollout")
            batch, metrics = outcome or (None, {})
            error, batch = _broadcast_batch(error, batch)
        if error is not None:
            # Nothing of this step has touched the model: keep what the previous step produced.
            self._save_before_stopping(self.step - 1, resume_state=resume_at_start, reason=error)
            raise RolloutError(f"step {self.step}: rollout failed on rank 0: {error}")
        if batch is not None:
            if self.parts.engine is not None:
                self.parts.engine.release_memory()  # a colocated engine gives its GPU memory to training
            # 5. old log-probs, then one FIPO optimizer step per mini-batch (FutureKL from the 2nd on)
            record = self.token_records.select(self.step, batch)  # per-token records: [] on most steps
            with timer("actor"):
                metrics.update(self.actor.update(batch, record_samples=record))
            self.token_records.write(self.step, batch, self.actor.last_token_taps)
            for phase in ("old_log_prob", "update"):  # the actor times its two phases itself
                if f"actor/timing/{phase}_s" in metrics:
                    metrics[f"timing/{phase}"] = metrics.pop(f"actor/timing/{phase}_s")
            # train/rollout mismatch: the engine's log-probs against the actor's old ones (rank 0 holds both)
            if self.rank == 0 and self.actor.last_old_log_probs is not None:
                metrics.update(rollout_mismatch_metrics(actor_log_probs=self.actor.last_old_log_probs,
                                                        rollout_log_probs=[s.rollout_log_probs for s in batch.samples]))
            # 6. weight sync: the engine samples the next step with the updated policy
            with timer("sync"):
                try:
                    metrics.update(self.sync_weights())
                except WeightSyncError as e:  # raised on every rank; the update itself is complete
                    self._save_before_stopping(self.step, resume_state=self._resume_state(), reason=repr(e))
                    raise
            metrics["perf/total_num_tokens"] = float(sum(s.num_tokens for s in batch.samples))
        metrics.update(timer.metrics())
        metrics["timing/step"] = step_time = time.perf_counter() - t0
        if batch is not None:
            metrics["perf/throughput_tokens_per_s"] = metrics["perf/total_num_tokens"] / step_time
        return metrics

    # ------------------------------------------------------------------ phases
    def sync_weights(self) -> dict[str, float]:
        """Actor shards -> HF-named full tensors, bucketed -> the engine's transport (every rank joins).

        A failure on any rank raises ``WeightSyncError`` on every rank (weights/transport.py), so the
        job stops together instead of hanging in the export's collectives.
        """
        engine = self.parts.engine
        if engine is not None:
            engine.resume_memory()
        return self.placement.sync_weights(self.actor.model_chunks, groups=self.actor.groups, engine=engine,
                                           hf_config=self.parts.hf_config, bucket_bytes=self.parts.sync_bucket_bytes,
                                           fp8=self.cfg.rollout.weights_fp8)

    def validate(self) -> dict[str, float]:
        """Sample the validation prompts with the validation settings; avg@k of score and acc (rank 0)."""
        if self.rank != 0:
            return {}
        with self.timer("validate"):
            return self.parts.rollout.validate(self.step)

    def close(self) -> None:
        """Stop what this rank started: its rollout engine (server processes) and, on rank 0, the scoring pool."""
        if self.parts.engine is not None:
            self.parts.engine.shutdown()
        if self.parts.rollout is not None:
            self.parts.rollout.scorer.close()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Checkpoint this step (every rank): model, optimizer, LR, RNG, data position, the engines' split
        history, step."""
        return self._checked_save(self.step, self._resume_state())

    def _checked_save(self, step: int, state: dict) -> str:
        """Save only finite weights (``DivergenceError`` otherwise: the good checkpoints stay); a checkpoint
        saved inside a run of skipped steps, or whose weights grew past ``trainer.max_weight_norm_growth``,
        is marked as not passing, so rotation keeps an older good one."""
        # One pass over the weights on the good path: the float64 norm is finite exactly when every weight is
        # (finite fp32 squares stay below 1.2e77), and the same on every rank; only a bad one is searched for.
        norm = parameter_norm(self.actor.model_chunks)
        if not math.isfinite(norm):
            bad = first_non_finite_parameter(self.actor.model_chunks)
            raise DivergenceError(f"step {step}: the weights are not finite ({bad}); not saving them. Resume from "
                                  "the last checkpoint with a lower actor.lr")
        norm_ok, growth = self.growth.check(norm)
        if not norm_ok:
            logger.warning("step %d: the weights' norm grew %.3g-fold since the last good checkpoint (limit "
                           "trainer.max_weight_norm_growth=%g): saving it marked as not passing; rotation keeps the "
                           "older good checkpoint", step, growth, self.cfg.trainer.max_weight_norm_growth)
        passed = self.skips.streak == 0 and norm_ok
        path = self.ckpt.save(step=step, trainer_state=state, save_model=self.actor.save_checkpoint, passed=passed,
                              checks={"weights_finite": True, "consecutive_skipped_steps": self.skips.streak,
                                      "weight_norm": norm, "weight_norm_growth": growth})
        if passed:
            self.growth.passed(norm)
        return path

    def _resume_state(self) -> dict:
        """A checkpoint's trainer state: the prompt sampler's position and the engines' split histories
        (``RolloutPlacement.engine_state``), both None on ranks other than 0. Every rank calls it."""
        rollout = self.placement.engine_state(self.parts.engine)  # every rank: per_node gathers from the leaders
        return {"data": self.parts.rollout.sampler.state_dict() if self.rank == 0 else None, "rollout": rollout}

    def _validate_everywhere(self) -> dict[str, float]:
        """``validate`` on rank 0; a failure there stops every rank (after saving this step) instead of
        leaving the others waiting in the next collective."""
        error, out = self._rank0_phase(self.validate, "validation")
        error = _broadcast_from_rank0(error)
        if error is not None:
            self._save_before_stopping(self.step, resume_state=self._resume_state(), reason=error)
            raise RolloutError(f"step {self.step}: validation failed on rank 0: {error}")
        return out or {}

    def _rank0_phase(self, fn, what: str):
        """``(error message or None, fn())``: ``fn`` runs on rank 0, then the other node leaders are released
        (placement=per_node); they serve rank 0's requests meanwhile. A failure is logged and returned, so the
        caller can tell every rank before stopping; other ranks get ``(None, None)``."""
        if self.rank != 0:
            self.placement.serve(self.parts.engine)
            return None, None
        try:
            try:
                return None, fn()
            finally:
                self.parts.engine.end_phase()  # per_node: releases the other node leaders
        except Exception as e:  # noqa: BLE001 - every rank learns of it from the caller's broadcast
            logger.exception("step %d: %s failed", self.step, what)
            return f"{type(e).__name__}: {e}", None

    def _save_before_stopping(self, step: int, *, resume_state, reason: str) -> None:
        """Checkpoint ``step`` (every rank) on the way out of a failed step, unless it is saved already, so a
        resume loses nothing; a failure to save is logged and the original error goes on."""
        saved = None
        if self.rank == 0:
            try:
                latest = self.ckpt.latest()
                saved = latest is not None and os.path.basename(latest) == f"step_{step:08d}"
            except Exception:  # noqa: BLE001 - a broken 'latest' must not hide the original error
                logger.exception("could not read the latest checkpoint")
        saved = _broadcast_from_rank0(saved)  # one decision for all ranks: the save is collective
        if step < 1 or saved is not False:
            return
        logger.error("stopping after: %s; saving step %d first", reason, step)
        try:
            self._checked_save(step, resume_state)
        except Exception:  # noqa: BLE001
            logger.exception("could not save step %d before stopping", step)

    def _maybe_resume(self) -> bool:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return False
        if mode == "auto":  # the newest checkpoint whose files match their checksums
            found = self.ckpt.load_latest_intact(load_model=self.actor.load_checkpoint)
            if found is None:
                return False
            path, state = found
        else:
            path, state = mode, self.ckpt.load(mode, load_model=self.actor.load_checkpoint)
        self.step = int(state["step"])
        if self.rank == 0:
            self.parts.rollout.sampler.load_state_dict(state["data"])
        self.placement.load_engine_state(self.parts.engine, state.get("rollout"))  # older checkpoints: none
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ helpers
    def _progress_bar(self):
        if self.rank != 0 or not self.cfg.logging.progress_bar:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.trainer.total_training_steps, initial=self.step, desc="fipo", unit="step",
                    dynamic_ncols=True)


def _broadcast_from_rank0(obj):
    """``obj`` as global rank 0 has it, on every rank (picklable objects)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def _all_gather_objects(obj) -> list:
    """``obj`` from every rank, in rank order (picklable objects)."""
    if dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast_batch(error: str | None, batch: TrainBatch | None) -> tuple[str | None, TrainBatch | None]:
    """Rank 0's rollout outcome on every rank: an error message, or the step's batch (in the compact form of
    ``TrainBatch.to_wire``). Rank 0 keeps its own object, with the engine's log-probs."""
    if dist.get_world_size() == 1:
        return error, batch
    rank0 = dist.get_rank() == 0
    wire = None if error is not None or batch is None else batch.to_wire()
    got_error, payload = _broadcast_from_rank0((error, wire) if rank0 else None)
    if rank0:
        return error, batch
    return got_error, None if payload is None else TrainBatch.from_wire(payload)
