"""The FIPO training loop (issue #6). Launch through the CLI (``python -m fipo_megatron``)::

    torchrun --nproc-per-node 2 -m fipo_megatron --config examples/configs/tiny_cpu.yaml trainer.run_dir=runs/x

One step, as the spec reads (``Trainer.train_step``):

    1. rollout     rank 0 samples ``rollout.n`` responses per prompt with the engine;
    2. reward      rule score (each call under a timeout) + DAPO overlong shaping;
    3. filter      dynamic sampling: keep groups whose rewards disagree, generating again (at most
                   ``algorithm.filter_groups.max_num_gen_batches`` batches) until the step's prompts are full
                   (if the budget runs out, the step trains on the whole mini-batches it has, or raises as
                   DAPO does with ``filter_groups.on_exhausted=raise``);
    4. advantages  GRPO per group; the batch is broadcast to every rank as an object;
    5. update      ``actor.update``: old log-probs recomputed by the actor, then one FIPO optimizer step per
                   mini-batch (the FutureKL signal exists from the 2nd mini-batch on, spec §1);
    6. sync        Megatron shards -> HF tensors in buckets -> ``engine.update_weights``;
    7. log / save  metrics.jsonl (+ TensorBoard/wandb) and, every ``checkpoint.save_interval`` steps, an
                   atomic run checkpoint (model, optimizer, LR, RNG, data position, step).

The rollout lives on global rank 0 (the embedded engine, or a client of an SGLang/vLLM server); every
other rank waits in the broadcast. If the rollout raises (an engine unreachable after its retries) or a
weight sync fails, every rank checkpoints the last complete state and stops (``RolloutError`` /
``WeightSyncError``), so a resume loses nothing. Sampling seeds derive from ``(trainer.seed, step, gen batch)``, so a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from fipo_megatron.batch import TrainBatch
from fipo_megatron.checkpoint.manager import CheckpointManager
from fipo_megatron.config import FipoConfig, config_to_dict, save_config
from fipo_megatron.data.experience import Group, build_train_batch, keep_group, score_groups
from fipo_megatron.data.setup import build_model_and_data
from fipo_megatron.log import get_logger
from fipo_megatron.metrics import MetricsLogger, response_length_metrics
from fipo_megatron.rollout.mismatch import rollout_mismatch_metrics
from fipo_megatron.weights.transport import WeightSyncError

logger = get_logger(__name__)


class RolloutError(RuntimeError):
    """The rollout failed on rank 0 (an engine unreachable after its retries, a crashed server, ...); raised
    on every rank after the state the failed step started from was checkpointed."""


class Trainer:
    """Builds every part from a ``FipoConfig`` and runs the loop; call ``fit()`` on every rank."""

    def __init__(self, cfg: FipoConfig):
        if not dist.is_initialized():
            raise RuntimeError("Trainer needs torch.distributed initialised (launch with torchrun or the CLI)")
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.run_dir = cfg.run_dir
        self.timings: dict[str, float] = {}
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        # rollout.placement=per_node: an engine on every node's first rank, driven from rank 0 over a gloo
        # group of those ranks (rollout/node_engines.py). Checked before anything heavy is built.
        self._rollout_group, self._ranks_per_node = None, None
        engine_here = self.rank == 0
        if cfg.rollout.placement == "per_node":
            from fipo_megatron.rollout.node_engines import check_per_node_layout, node_leaders

            self._ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
            check_per_node_layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp,
                                  ranks_per_node=self._ranks_per_node)
            leaders = node_leaders(dist.get_world_size(), self._ranks_per_node)
            self._rollout_group = dist.new_group(leaders, backend="gloo")  # every rank takes part in new_group
            engine_here = self.rank in leaders
        self.parts = build_model_and_data(cfg, rank=self.rank, run_dir=self.run_dir,
                                          engine_here=engine_here)  # tokenizer, data, engine(s)
        if self._rollout_group is not None and self.rank == 0:
            from fipo_megatron.rollout.node_engines import NodeEngines

            self.parts.engine = NodeEngines(self.parts.engine, group=self._rollout_group, leaders=leaders)
        from fipo_megatron.actor.actor import MegatronActor

        self.actor = MegatronActor(hf_config=self.parts.hf_config, parallel=cfg.parallel,
                                   actor_config=cfg.actor, loss_config=cfg.policy_loss)
        if self._rollout_group is not None:
            from fipo_megatron.rollout.node_engines import exports_on_this_node

            g = self.actor.groups
            if engine_here and not (exports_on_this_node(g, self._ranks_per_node) and g.tp_rank == 0):
                raise RuntimeError(f"rank {self.rank} leads a node but is not the first rank of a model replica "
                                   f"(tp_rank {g.tp_rank}, cp_rank {g.cp_rank}, dp_rank {g.dp_rank})")
        self.actor.load_hf_weights(self.parts.hf_dir)
        self.ckpt = CheckpointManager(root=os.path.join(self.run_dir, "checkpoints"), keep_last=cfg.checkpoint.keep_last,
                                      rank=self.rank, barrier=dist.barrier)
        self.step = 0
        self._last_save_s: float | None = None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        cfg = self.cfg
        resumed = self._maybe_resume()
        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
                                     wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                     wandb_run_name=cfg.logging.wandb_run_name, config=config_to_dict(cfg),
                                     resume_step=self.step if resumed else None)
        if resumed:
            self.sync_weights()  # the engine still holds the initial weights
        bar = self._progress_bar()
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
                last = self.step == cfg.trainer.total_training_steps
                interval = cfg.checkpoint.save_interval
                if (interval and self.step % interval == 0) or (last and cfg.checkpoint.save_at_end):
                    t = time.perf_counter()
                    self.save()
                    self._last_save_s = time.perf_counter() - t
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3f}" for k in ("reward/mean", "rollout/acc")
                                     if isinstance(metrics.get(k), float)})
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()

    def train_step(self) -> dict[str, float]:
        """One RL step on every rank; returns the step's metrics (complete on rank 0)."""
        self.timings = {}
        t0 = time.perf_counter()
        data_at_start = self.parts.sampler.state_dict() if self.rank == 0 else None
        with self._timed("rollout_total"):
            error, outcome = self._rank0_phase(self._rollout_on_rank0, "rollout")
            batch, metrics = outcome or (None, {})
            error, batch = _broadcast_rollout(error, batch)
        if error is not None:
            # Nothing of this step has touched the model: keep what the previous step produced.
            self._save_before_stopping(self.step - 1, data_state=data_at_start, reason=error)
            raise RolloutError(f"step {self.step}: rollout failed on rank 0: {error}")
        if batch is not None:
            if self.parts.engine is not None:
                self.parts.engine.release_memory()  # a colocated engine gives its GPU memory to training
            # Train/rollout mismatch needs the actor's log-probs of the rollout: free when the actor keeps
            # its old log-probs, else one extra forward pass every logging.mismatch_interval steps.
            every = self.cfg.logging.mismatch_interval
            keeps_old = hasattr(self.actor, "last_old_log_probs")
            actor_log_probs = None
            if every and self.step % every == 0 and not keeps_old:
                with self._timed("mismatch_log_prob"):
                    actor_log_probs = self.actor.compute_log_probs(batch)
            with self._timed("actor"):
                metrics.update(self.actor.update(batch))
            for phase in ("old_log_prob", "update"):  # the actor times its two phases itself
                if f"actor/timing/{phase}_s" in metrics:
                    metrics[f"timing/{phase}"] = metrics.pop(f"actor/timing/{phase}_s")
            if keeps_old:
                actor_log_probs = self.actor.last_old_log_probs
            if self.rank == 0 and actor_log_probs is not None:
                metrics.update(rollout_mismatch_metrics(actor_log_probs=actor_log_probs,
                                                        rollout_log_probs=[s.rollout_log_probs for s in batch.samples]))
            with self._timed("sync"):
                try:
                    metrics.update(self.sync_weights())
                except WeightSyncError as e:  # raised on every rank; the update itself is complete
                    self._save_before_stopping(self.step, data_state=self.parts.sampler.state_dict()
                                               if self.rank == 0 else None, reason=repr(e))
                    raise
            num_tokens = sum(s.num_tokens for s in batch.samples)
            metrics["perf/total_num_tokens"] = float(num_tokens)
        metrics.update({f"timing/{k}": v for k, v in self.timings.items()})
        step_time = time.perf_counter() - t0
        metrics["timing/step"] = step_time
        if batch is not None:
            metrics["perf/throughput_tokens_per_s"] = metrics["perf/total_num_tokens"] / step_time
        return metrics

    # ------------------------------------------------------------------ phases
    def _rollout_on_rank0(self) -> tuple[TrainBatch | None, dict]:
        """Generate, score and filter until the step's prompts are full (rank 0 only)."""
        cfg, parts = self.cfg, self.parts
        fg = cfg.algorithm.filter_groups
        n, want = cfg.sampling.n, cfg.data.train_batch_size
        kept: list[Group] = []
        seen: list[Group] = []
        num_gen_batches, counts = 0, {"num_timeouts": 0, "num_errors": 0, "overlong_penalty_sum": 0.0}
        gen_tokens, gen_time = 0, 0.0
        while len(kept) < want:
            num_gen_batches += 1
            records = [parts.train_data[i] for i in parts.sampler.next_indices(cfg.gen_batch_size)]
            sampling = dataclasses.replace(parts.sampling, seed=_derive_seed(cfg, self.step, num_gen_batches))
            with self._timed("rollout"):
                t = time.perf_counter()
                outputs = parts.engine.generate([r.prompt_ids for r in records], sampling)
                gen_time += time.perf_counter() - t
            gen_tokens += sum(len(o.token_ids) for o in outputs)
            with self._timed("reward"):
                groups, c = score_groups(records, outputs, n=n, tokenizer=parts.tokenizer, runner=parts.scorer,
                                         overlong_penalty=parts.overlong_penalty)
            for k in counts:
                counts[k] += c[k]
            seen += groups
            kept += [g for g in groups if keep_group(g, fg.metric)] if fg.enable else groups
            if fg.enable and fg.max_num_gen_batches and num_gen_batches >= fg.max_num_gen_batches and len(kept) < want:
                if fg.on_exhausted == "raise":  # DAPO's behaviour
                    raise RuntimeError(f"dynamic sampling: only {len(kept)} of {want} prompts have mixed rewards after "
                                       f"{num_gen_batches} generation batches (algorithm.filter_groups."
                                       "max_num_gen_batches); the data may be too easy or too hard for the policy")
                # on_exhausted=train: train on the whole mini-batches we have (logged as batch/num_prompts).
                logger.info("step %d: only %d of %d prompts have mixed rewards after %d generation batches",
                            self.step, len(kept), want, num_gen_batches)
                break
        # A short batch keeps whole mini-batches only: every update then has the configured size.
        mini = cfg.actor.ppo_mini_batch_size
        kept = kept[:want] if len(kept) >= want else kept[:len(kept) // mini * mini]
        all_rewards = [r for g in seen for r in g.rewards]
        metrics = {
            "num_gen_batches": float(num_gen_batches),
            "batch/num_prompts": float(len(kept)),
            "batch/num_filtered_groups": float(len(seen) - len(kept)),
            "rollout/reward_mean": float(np.mean(all_rewards)),
            "rollout/acc": float(np.mean([a for g in seen for a in g.accs])),
            "rollout/tokens_per_s": gen_tokens / max(gen_time, 1e-9),
            "reward/num_timeouts": float(counts["num_timeouts"]),
            "reward/num_errors": float(counts["num_errors"]),
            "reward/overlong_penalty_mean": counts["overlong_penalty_sum"] / max(len(all_rewards), 1),
            "data/epoch": float(parts.sampler.epoch),
            **{f"data/{k}": float(v) for k, v in parts.train_data.stats.items()},
        }
        if not kept:
            logger.warning("step %d: no prompt with mixed rewards; skipping the update", self.step)
            return None, metrics
        batch = build_train_batch(kept, n=n, temperature=parts.sampling.temperature,
                                  adv_estimator=cfg.algorithm.adv_estimator,
                                  norm_adv_by_std=cfg.algorithm.norm_adv_by_std_in_grpo)
        rewards = [s.reward for s in batch.samples]
        metrics.update({"reward/mean": float(np.mean(rewards)), "reward/max": float(np.max(rewards)),
                        "reward/min": float(np.min(rewards)),
                        "reward/score_mean": float(np.mean([s for g in kept for s in g.scores])),
                        "reward/acc": float(np.mean([a for g in kept for a in g.accs]))})
        metrics.update(response_length_metrics([len(s.response_ids) for s in batch.samples],
                                               max_response_length=cfg.data.max_response_length))
        return batch, metrics

    def sync_weights(self) -> dict[str, float]:
        """Actor shards -> HF-named full tensors, bucketed -> the engine's transport (every rank joins).

        A failure on any rank raises ``WeightSyncError`` on every rank (weights/transport.py), so the
        job stops together instead of hanging in the export's collectives.
        """
        from fipo_megatron.weights.transport import sync_weights

        engine = self.parts.engine
        if engine is not None:
            engine.resume_memory()
        exporting = None
        if self._rollout_group is not None:  # every node's replica feeds its own node's engine
            from fipo_megatron.rollout.node_engines import exports_on_this_node

            exporting = exports_on_this_node(self.actor.groups, self._ranks_per_node)
        return sync_weights(self.actor.model_chunks, groups=self.actor.groups, hf_config=self.parts.hf_config,
                            transport=engine.weight_transport() if engine is not None else None,
                            destination="rank0", bucket_bytes=self.parts.sync_bucket_bytes,
                            exporting_replica=exporting)

    def validate(self) -> dict[str, float]:
        """Sample the validation prompts with the validation settings; avg@k of score and acc (rank 0)."""
        cfg, parts = self.cfg, self.parts
        if self.rank != 0 or parts.val_data is None:
            return {}
        with self._timed("validate"):
            sampling = dataclasses.replace(parts.sampling, n=cfg.rollout.val_n, temperature=cfg.rollout.val_temperature,
                                           top_p=cfg.rollout.val_top_p, seed=_derive_seed(cfg, self.step, 0) + 7)
            records = list(parts.val_data.records)
            outputs = parts.engine.generate([r.prompt_ids for r in records], sampling)
            groups, _ = score_groups(records, outputs, n=sampling.n, tokenizer=parts.tokenizer,
                                     runner=parts.scorer, overlong_penalty=None)
        return {"val/score_mean": float(np.mean([s for g in groups for s in g.scores])),
                "val/acc": float(np.mean([a for g in groups for a in g.accs]))}

    def close(self) -> None:
        """Stop what this rank started: its rollout engine (server processes) and, on rank 0, the scoring pool."""
        if self.parts.engine is not None:
            self.parts.engine.shutdown()
        if self.parts.scorer is not None:
            self.parts.scorer.close()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        state = {"data": self.parts.sampler.state_dict() if self.rank == 0 else None}
        return self.ckpt.save(step=self.step, trainer_state=state, save_model=self.actor.save_checkpoint)

    def _validate_everywhere(self) -> dict[str, float]:
        """``validate`` on rank 0; a failure there stops every rank (after saving this step) instead of
        leaving the others waiting in the next collective."""
        error, out = self._rank0_phase(self.validate, "validation")
        error = _broadcast_from_rank0(error)
        if error is not None:
            self._save_before_stopping(self.step, data_state=self.parts.sampler.state_dict() if self.rank == 0
                                       else None, reason=error)
            raise RolloutError(f"step {self.step}: validation failed on rank 0: {error}")
        return out or {}

    def _rank0_phase(self, fn, what: str):
        """``(error message or None, fn())``: ``fn`` runs on rank 0, then the other node leaders are released
        (placement=per_node); they serve rank 0's requests meanwhile. A failure is logged and returned, so the
        caller can tell every rank before stopping; other ranks get ``(None, None)``."""
        if self.rank != 0:
            self._serve_rollout_phase()
            return None, None
        try:
            try:
                return None, fn()
            finally:
                self._end_rollout_phase()
        except Exception as e:  # noqa: BLE001 - every rank learns of it from the caller's broadcast
            logger.exception("step %d: %s failed", self.step, what)
            return f"{type(e).__name__}: {e}", None

    def _end_rollout_phase(self) -> None:
        """Rank 0, placement=per_node: release the other node leaders from their serving loop."""
        self.parts.engine.end_phase()

    def _serve_rollout_phase(self) -> None:
        """Node leaders other than rank 0 (placement=per_node): sample what rank 0 sends until the phase ends."""
        if self._rollout_group is not None and self.parts.engine is not None:
            from fipo_megatron.rollout.node_engines import serve_rollouts

            serve_rollouts(self.parts.engine, group=self._rollout_group)

    def _save_before_stopping(self, step: int, *, data_state, reason: str) -> None:
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
            self.ckpt.save(step=step, trainer_state={"data": data_state}, save_model=self.actor.save_checkpoint)
        except Exception:  # noqa: BLE001
            logger.exception("could not save step %d before stopping", step)

    def _maybe_resume(self) -> bool:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return False
        path = self.ckpt.latest() if mode == "auto" else mode
        if path is None:
            return False
        state = self.ckpt.load(path, load_model=self.actor.load_checkpoint)
        self.step = int(state["step"])
        if self.rank == 0:
            self.parts.sampler.load_state_dict(state["data"])
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _timed(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def _progress_bar(self):
        if self.rank != 0 or not self.cfg.logging.progress_bar:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.trainer.total_training_steps, initial=self.step, desc="fipo", unit="step",
                    dynamic_ncols=True)


def _derive_seed(cfg: FipoConfig, step: int, gen_batch: int) -> int:
    base = cfg.sampling.seed if cfg.sampling.seed is not None else cfg.trainer.seed
    return (base * 1_000_003 + step * 1009 + gen_batch) % (2**31 - 1)


def _broadcast_from_rank0(obj):
    """``obj`` as global rank 0 has it, on every rank (picklable objects)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def _broadcast_rollout(error: str | None, batch: TrainBatch | None) -> tuple[str | None, TrainBatch | None]:
    """Broadcast rank 0's rollout outcome: an error message, or the step's batch. Token ids travel as int32
    arrays; the engine's log-probs stay on rank 0 (only its mismatch metric reads them), which keeps every
    other rank's copy of a 20k-token x 8192-response batch small. Rank 0 keeps its own object."""
    if dist.get_world_size() == 1:
        return error, batch
    outcome = _broadcast_from_rank0((error, None if error is not None else _compact(batch))
                                    if dist.get_rank() == 0 else None)
    if dist.get_rank() == 0:
        return error, batch
    error, payload = outcome
    return error, _expand(payload)


def _compact(batch: TrainBatch | None):
    if batch is None:
        return None
    rows = [(np.asarray(s.prompt_ids, np.int32), np.asarray(s.response_ids, np.int32),
             s.advantage, s.group_id, s.reward, s.finish_reason) for s in batch.samples]
    return (rows, batch.num_responses_per_prompt, batch.temperature, batch.meta)


def _expand(payload) -> TrainBatch | None:
    if payload is None:
        return None
    from fipo_megatron.batch import Sample

    rows, n, temperature, meta = payload
    samples = [Sample(prompt_ids=p.tolist(), response_ids=r.tolist(), advantage=a, group_id=g, reward=rw,
                      finish_reason=fr) for p, r, a, g, rw, fr in rows]
    return TrainBatch(samples=samples, num_responses_per_prompt=n, temperature=temperature, meta=meta)
