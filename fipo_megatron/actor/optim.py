"""Megatron DDP wrapping, optimizer and LR schedule for the actor.

- DDP: ``megatron.core.distributed.DistributedDataParallel`` with fp32 gradient buffers, one per model
  chunk (bucketing only on the first chunk, as Megatron-LM does for interleaved pipelines).
- The loss is reported to Megatron *per token* (``calculate_per_token_loss``): DDP then sums gradients
  over DP x CP instead of averaging, and ``finalize_model_grads`` divides by the all-reduced token count
  the loss function returned. That is exactly the global token mean of docs/algorithm.md §5 (see ``actor/step.py``).
- Optimizer: ``get_megatron_optimizer`` (Adam with decoupled weight decay, global grad-norm clipping,
  fp32 main weights for bf16 parameters, the distributed optimizer when asked on GPU).
- Schedule: ``OptimizerParamScheduler``, linear warm-up from 0 to ``lr`` over ``lr_warmup_steps`` optimizer
  steps, then constant (the recipes' schedule); weight decay constant.
"""

from __future__ import annotations

import inspect
import math

import torch

from fipo_megatron.actor.config import ActorConfig

# Megatron's scheduler needs a decay horizon even for a constant schedule; it is never reached.
_CONSTANT_HORIZON = 10**9


def _supported(cls, **kwargs) -> dict:
    """Keep only the keyword arguments ``cls`` accepts (fields differ across megatron-core versions)."""
    params = inspect.signature(cls).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def wrap_ddp(model_chunks: list, *, transformer_config, use_distributed_optimizer: bool, pg_collection=None) -> list:
    """Wrap each chunk in Megatron's DDP (fp32 grad buffers, no overlap: the schedule syncs at the end)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(**_supported(
        DistributedDataParallelConfig, grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer, check_for_nan_in_grad=False))
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        kwargs = dict(config=transformer_config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        if pg_collection is not None and "pg_collection" in inspect.signature(DistributedDataParallel).parameters:
            kwargs["pg_collection"] = pg_collection
        wrapped.append(DistributedDataParallel(**kwargs))
    return wrapped


def build_optimizer(model_chunks: list, *, actor_config: ActorConfig, use_distributed_optimizer: bool = False):
    """``(optimizer, scheduler)`` for DDP-wrapped ``model_chunks``. ``use_distributed_optimizer``
    (``ParallelConfig.use_distributed_optimizer``) must match what the chunks were wrapped with."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    c = actor_config
    bf16 = c.torch_params_dtype == torch.bfloat16
    opt_config = OptimizerConfig(**_supported(
        OptimizerConfig, optimizer="adam", lr=c.lr, min_lr=0.0, weight_decay=c.weight_decay,
        adam_beta1=c.adam_beta1, adam_beta2=c.adam_beta2, adam_eps=c.adam_eps, clip_grad=c.clip_grad,
        bf16=bf16, params_dtype=c.torch_params_dtype,
        use_distributed_optimizer=use_distributed_optimizer))
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=c.lr, min_lr=c.lr, lr_warmup_steps=c.lr_warmup_steps,
        lr_decay_steps=_CONSTANT_HORIZON, lr_decay_style="constant", start_wd=c.weight_decay,
        end_wd=c.weight_decay, wd_incr_steps=_CONSTANT_HORIZON, wd_incr_style="constant")
    return optimizer, scheduler


def current_lr(optimizer) -> float:
    """The learning rate of the first parameter group (all groups share it here)."""
    return float(optimizer.param_groups[0]["lr"])


@torch.no_grad()
def step_if_finite(optimizer) -> tuple[bool, float]:
    """Megatron's optimizer step, skipped when a gradient anywhere is NaN or inf: ``(stepped, grad_norm)``.

    The finiteness check is the global grad norm the step computes anyway for clipping (one reduction per
    gradient tensor, then a scalar all-reduce over the model-parallel group; DDP has already reduced the
    gradients over DP, so every rank sees the same norm and takes the same branch). A non-finite entry makes
    that norm non-finite, so no gradient-sized temporary is built. This is ``ChainedOptimizer.step`` of
    megatron-core 0.16-0.19 (``megatron/core/optimizer/optimizer.py``: ``prepare_grads``,
    ``get_grad_norm``, ``clip_grad_by_total_norm_fp32`` per optimizer, ``step_with_ready_grads``) with the
    check placed before the clip and the update: its own step would apply a NaN update (a NaN clip
    coefficient fails ``< 1`` and leaves the gradients as they are).
    """
    # the name the optimizer module itself calls (the CPU compatibility layer patches it there)
    from megatron.core.optimizer import optimizer as mcore_optimizer

    clip_grad_by_total_norm_fp32 = mcore_optimizer.clip_grad_by_total_norm_fp32
    if optimizer.prepare_grads():  # a loss scaler's own inf/nan check (fp16); bf16/fp32 have none
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    decoupled = "use_decoupled_grad" in inspect.signature(clip_grad_by_total_norm_fp32).parameters
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0:
            continue
        params = opt.get_parameters()
        if params:
            kwargs = {}
            if decoupled:
                kwargs["use_decoupled_grad"] = bool(getattr(
                    opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8",
                    getattr(opt.config, "use_precision_aware_optimizer", False)))
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm, **kwargs)
    return bool(optimizer.step_with_ready_grads()), grad_norm
