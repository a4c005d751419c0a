"""``MegatronActor``: the policy being trained, on Megatron-core with TP/PP/CP/DP.

    actor = MegatronActor(hf_config=cfg, parallel=ParallelConfig(tp=2, pp=2), actor_config=ActorConfig(...),
                          loss_config=PolicyLossConfig())
    actor.load_hf_weights(hf_dir)
    metrics = actor.update(batch)          # old log-probs, then one optimizer step per mini-batch

One training step (``update``), docs/algorithm.md §1-5:
1. old log-probs of every response, recomputed by the actor itself (no grad, Megatron's forward-only
   schedule, so PP works), broadcast to every rank;
2. for each mini-batch of ``ppo_mini_batch_size * n`` samples: this DP rank's share (balanced by tokens),
   token-budget micro-batches packed THD and split zig-zag over CP, forward + backward through the
   pipeline schedule with the registered policy loss (FIPO by default; ``CPShard`` under CP), the exact
   global token mean (``actor/step.py``), a non-finite guard, then clip + Adam step;
3. the LR scheduler advances once per ``update`` call (warm-up counts training steps, as verl's actor).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.distributed as dist

from fipo_megatron.actor.config import ActorConfig
from fipo_megatron.actor.forward import install_hidden_states_output, make_forward_step, unwrap
from fipo_megatron.actor.optim import build_optimizer, current_lr, step_if_finite, wrap_ddp
from fipo_megatron.actor.packing import PackedMicroBatch, balanced_partition, plan_and_pack
from fipo_megatron.actor.step import (TokenCapture, collect_token_taps, combine_mini_batches, logprob_loss_fn,
                                      make_loss_fn, reduce_metrics, run_schedule)
from fipo_megatron.batch import Sample, TrainBatch
from fipo_megatron.log import get_logger
from fipo_megatron.parallel.cp_layout import padded_length
from fipo_megatron.parallel.topology import ParallelConfig, initialize_parallel, local_device

logger = get_logger(__name__)


class MegatronActor:
    """The trained policy. Collective: every rank constructs it and calls every method together.

    Attributes:
        model_chunks: this rank's DDP-wrapped ``GPTModel`` chunks (one per virtual pipeline stage).
        groups: the ``parallel.topology.ParallelGroups`` bundle.
        optimizer, scheduler: Megatron's optimizer and ``OptimizerParamScheduler``.
        last_mini_batch_metrics: per-mini-batch metrics of the last ``update`` (unprefixed names).
        last_old_log_probs: the old log-probs the last ``update`` recomputed (per sample), or None; the
            trainer's train/rollout mismatch metric reads them instead of running another forward pass.
        last_token_taps: per-token values of the samples ``update(record_samples=...)`` asked for
            (``{batch sample index: {field: [response_len]}}``, ``algo.policy_loss.TOKEN_TAP_FIELDS``), on
            global rank 0; None elsewhere and when nothing was asked.
    """

    def __init__(self, *, hf_config, parallel: ParallelConfig, actor_config: ActorConfig, loss_config) -> None:
        from megatron.core.distributed import finalize_model_grads

        from fipo_megatron.algo.policy_loss import get_policy_loss
        from fipo_megatron.models.builder import build_model_chunks, require_fp8_training

        if parallel.num_virtual_stages > 1 and not torch.cuda.is_available():
            # Forward-only works, but the interleaved 1F1B update deadlocks in Megatron's p2p shape
            # exchange (variable_seq_lengths) over gloo; unverified on GPU, where it is allowed.
            raise ValueError("ParallelConfig.vpp > 1 is not supported by the actor on CPU/gloo")
        if actor_config.recompute != "none" and not torch.cuda.is_available():
            # Megatron's activation checkpointing saves/restores CUDA RNG states (tensor_parallel.random).
            raise ValueError("ActorConfig.recompute needs CUDA (Megatron's checkpointing reads CUDA RNG state)")
        if actor_config.precision == "fp8":
            require_fp8_training(field="ActorConfig.precision")
        self.hf_config, self.parallel, self.config, self.loss_config = hf_config, parallel, actor_config, loss_config
        self.loss_fn = get_policy_loss(loss_config.loss_mode)
        self.groups = initialize_parallel(parallel, hf_config=hf_config, seed=actor_config.seed)
        # Packed micro-batches differ in length, so PP must exchange shapes (variable_seq_lengths);
        # Megatron rejects that with its default (MoE-only) "allgather" dispatcher even for dense models.
        overrides = dict(calculate_per_token_loss=True, **actor_config.recompute_overrides())
        if parallel.pp > 1:
            overrides.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
        chunks = build_model_chunks(hf_config, groups=self.groups, params_dtype=actor_config.torch_params_dtype,
                                    seed=actor_config.seed, config_overrides=overrides,
                                    **actor_config.fp8_model_kwargs())
        for chunk in chunks:
            install_hidden_states_output(chunk)
        tf_config = chunks[0].config
        use_dist_opt = parallel.use_distributed_optimizer
        self.model_chunks = wrap_ddp(chunks, transformer_config=tf_config, use_distributed_optimizer=use_dist_opt)
        self.optimizer, self.scheduler = build_optimizer(self.model_chunks, actor_config=actor_config,
                                                         use_distributed_optimizer=use_dist_opt)
        # What Megatron's schedules read from the model config (as Megatron-LM's training loop sets them).
        tf_config.finalize_model_grads_func = finalize_model_grads
        no_sync = [c.no_sync for c in self.model_chunks]
        tf_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        tf_config.grad_scale_func = self.optimizer.scale_loss
        self.device = local_device()
        self.num_updates = 0
        self.last_mini_batch_metrics: list[dict[str, float]] = []
        self.last_old_log_probs: list[torch.Tensor] | None = None
        self.last_token_taps: dict[int, dict[str, torch.Tensor]] | None = None
        self._multiple = parallel.sequence_parallel_multiple()

    # ------------------------------------------------------------------ packing
    def _pack(self, samples: Sequence[Sample]) -> list[PackedMicroBatch]:
        g = self.groups
        return plan_and_pack(samples, dp_size=g.dp_size, dp_rank=g.dp_rank,
                             max_tokens=self.config.max_tokens_per_micro_batch, cp_size=g.cp_size,
                             cp_rank=g.cp_rank, multiple=self._multiple, device=self.device,
                             count_multiple=g.pp_size if g.vpp_size > 1 else 1)

    def _forward_step(self, loss_fn, temperature: float):
        return make_forward_step(groups=self.groups, temperature=temperature,
                                 chunk_size=self.config.logprob_chunk_size,
                                 num_valid_vocab=int(self.hf_config.vocab_size), loss_fn=loss_fn)

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch, *, return_entropy: bool = False):
        """Per-sample response log-probs (fp32, CPU), under the current weights, on every rank.

        With ``return_entropy`` also the per-token entropies: ``(log_probs, entropies)``.
        """
        samples = batch.samples
        g = self.groups
        outputs = run_schedule(model_chunks=self.model_chunks, micro_batches=self._pack(samples),
                               forward_step=self._forward_step(logprob_loss_fn, batch.temperature),
                               forward_only=True, groups=g)
        resp_lens = [len(s.response_ids) for s in samples]
        keys = ("logp", "entropy") if return_entropy else ("logp",)
        flat = torch.zeros(len(keys), sum(resp_lens), dtype=torch.float32, device=self.device)
        if g.is_last_stage:
            for k, key in enumerate(keys):
                mine: dict[int, torch.Tensor] = {}
                for out in outputs:
                    local = out[key]
                    shards = [local]
                    if g.cp_size > 1:
                        shards = [torch.empty_like(local) for _ in range(g.cp_size)]
                        dist.all_gather(shards, local.contiguous(), group=g.cp_group)
                    mine.update(zip(out["mb"].sample_indices, out["mb"].gather_responses(shards)))
                flat[k] = self._gather_dp(mine, samples, resp_lens)
        if g.pp_size > 1:
            dist.broadcast(flat, src=dist.get_global_rank(g.pp_group, g.pp_size - 1), group=g.pp_group)
        results = [list(row.cpu().split(resp_lens)) for row in flat]
        return tuple(results) if return_entropy else results[0]

    def _gather_dp(self, mine: dict[int, torch.Tensor], samples, resp_lens) -> torch.Tensor:
        """Every DP rank's per-sample values -> one flat tensor in sample order (same split on every rank)."""
        g = self.groups
        lengths = [padded_length(s.num_tokens, cp_size=g.cp_size, multiple=self._multiple) for s in samples]
        parts = balanced_partition(lengths, num_parts=g.dp_size)
        offsets = [0]
        for n in resp_lens:
            offsets.append(offsets[-1] + n)
        local = torch.cat([mine[i].to(self.device).float() for i in parts[g.dp_rank]])
        sizes = [sum(resp_lens[i] for i in p) for p in parts]
        if g.dp_size > 1:
            padded = torch.zeros(max(sizes), dtype=torch.float32, device=self.device)
            padded[:local.numel()] = local
            gathered = [torch.empty_like(padded) for _ in range(g.dp_size)]
            dist.all_gather(gathered, padded, group=g.dp_group)
        else:
            gathered = [local]
        flat = torch.zeros(offsets[-1], dtype=torch.float32, device=self.device)
        for part, buf in zip(parts, gathered):
            pos = 0
            for i in part:
                flat[offsets[i]:offsets[i + 1]] = buf[pos:pos + resp_lens[i]]
                pos += resp_lens[i]
        return flat

    # ------------------------------------------------------------------ update
    def update(self, batch: TrainBatch, *, record_samples: Sequence[int] = ()) -> dict[str, float]:
        """One training step on ``batch``: old log-probs, then one optimizer step per mini-batch; ``actor/`` metrics.

        ``record_samples``: indices into ``batch.samples``, all in the last mini-batch, whose per-token loss
        values on that last mini-batch (Δlog p against the step's start, FutureKL, ...) are kept in
        ``last_token_taps``. The same on every rank. Empty (the default): nothing is tapped.
        """
        t_start = time.perf_counter()
        old_log_probs = self.compute_log_probs(batch)
        self.last_old_log_probs = old_log_probs
        t_old = time.perf_counter() - t_start
        samples = batch.samples
        per_mini = self.config.ppo_mini_batch_size * batch.num_responses_per_prompt
        starts = list(range(0, len(samples), per_mini))
        self.last_mini_batch_metrics = []
        self.last_token_taps = None
        capture = None
        if record_samples:
            last = starts[-1]
            outside = [i for i in record_samples if not last <= i < len(samples)]
            if outside:
                raise ValueError(f"record_samples {outside} are not in the last mini-batch (samples {last}.."
                                 f"{len(samples) - 1})")
            capture = TokenCapture(sample_indices=frozenset(i - last for i in record_samples))
        for model in self.model_chunks:
            model.train()
        for epoch in range(self.config.ppo_epochs):
            for start in starts:
                tap_here = capture if start == starts[-1] and epoch == self.config.ppo_epochs - 1 else None
                self.last_mini_batch_metrics.append(self._update_mini_batch(
                    samples[start:start + per_mini], old_log_probs[start:start + per_mini], batch.temperature,
                    capture=tap_here))
        if capture is not None:
            taps = collect_token_taps(capture, groups=self.groups)
            self.last_token_taps = None if taps is None else {i + starts[-1]: v for i, v in taps.items()}
        self.scheduler.step(increment=1)
        self.num_updates += 1
        metrics = combine_mini_batches(self.last_mini_batch_metrics)
        metrics["num_mini_batches"] = float(len(self.last_mini_batch_metrics))
        metrics["timing/old_log_prob_s"] = t_old
        metrics["timing/update_s"] = time.perf_counter() - t_start - t_old
        return {f"actor/{k}": v for k, v in metrics.items()}

    def _update_mini_batch(self, samples, old_log_probs, temperature: float,
                           capture: TokenCapture | None = None) -> dict[str, float]:
        g = self.groups
        micro_batches = self._pack(samples)
        for mb in micro_batches:
            mb.old_log_probs_T = mb.scatter_responses([old_log_probs[i] for i in mb.sample_indices])
        num_local_seqs = sum(len(mb.sample_indices) for mb in micro_batches)
        for model in self.model_chunks:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_fn = make_loss_fn(loss_fn=self.loss_fn, loss_config=self.loss_config, groups=g,
                               num_local_seqs=num_local_seqs, capture=capture)
        outputs = run_schedule(model_chunks=self.model_chunks, micro_batches=micro_batches,
                               forward_step=self._forward_step(loss_fn, temperature), forward_only=False, groups=g)
        metrics = reduce_metrics(outputs, groups=g, device=self.device)
        # Loss guard: a non-finite loss anywhere skips this optimizer step on every rank; a non-finite
        # gradient shows in the global grad norm (step_if_finite).
        ok = torch.tensor([1.0 if math.isfinite(metrics["pg_loss"]) else 0.0], device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        grad_norm = float("nan")
        skipped = 1.0
        if bool(ok.item()):
            stepped, grad_norm = step_if_finite(self.optimizer)
            skipped = 0.0 if stepped else 1.0
        if skipped:
            for model in self.model_chunks:
                model.zero_grad_buffer()
            self.optimizer.zero_grad()
            logger.warning("non-finite loss or gradient: optimizer step skipped (pg_loss=%s)", metrics["pg_loss"])
        metrics.update(grad_norm=grad_norm, lr=current_lr(self.optimizer), num_skipped_steps=skipped)
        return metrics

    # ------------------------------------------------------------------ weights and checkpoints
    def load_hf_weights(self, hf_dir: str) -> None:
        """Load a Hugging Face checkpoint directory (safetensors) into this rank's shards."""
        from fipo_megatron.checkpoint.convert import load_hf_into_model

        load_hf_into_model([unwrap(c) for c in self.model_chunks], hf_dir, groups=self.groups, hf_config=self.hf_config)
        self.optimizer.reload_model_params()

    def load_full_state_dict(self, full_state_dict: dict[str, torch.Tensor]) -> None:
        """Load full (TP=1, global-name) Megatron tensors; see ``models.sharding.load_full_state_dict``."""
        from fipo_megatron.models.sharding import load_full_state_dict

        load_full_state_dict(self.model_chunks, full_state_dict, groups=self.groups)
        self.optimizer.reload_model_params()

    def save_checkpoint(self, ckpt_dir: str) -> None:
        """Model, optimizer and LR scheduler as a Megatron dist checkpoint (any layout reloads it).

        RNG states are not the actor's: the run checkpoint (``checkpoint.manager``) saves every rank's.
        """
        from fipo_megatron.checkpoint.dist_ckpt import save_megatron_checkpoint

        extra = {"scheduler": self.scheduler.state_dict(), "num_updates": self.num_updates}
        # The bare GPTModels: the checkpoint keys must not carry the DDP wrapper's "module." prefix.
        save_megatron_checkpoint(ckpt_dir, [unwrap(c) for c in self.model_chunks], optimizer=self.optimizer,
                                 extra_state=extra, groups=self.groups)

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        """Restore what :meth:`save_checkpoint` wrote; returns the extra state."""
        from fipo_megatron.checkpoint.dist_ckpt import load_megatron_checkpoint

        extra = load_megatron_checkpoint(ckpt_dir, [unwrap(c) for c in self.model_chunks], optimizer=self.optimizer,
                                         groups=self.groups)
        if "scheduler" in extra:
            self.scheduler.load_state_dict(extra["scheduler"])
        self.num_updates = int(extra.get("num_updates", 0))
        return extra
