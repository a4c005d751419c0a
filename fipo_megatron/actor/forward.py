"""Glue between Megatron's ``GPTModel`` and the chunked vocab-parallel log-prob.

``GPTModel`` ends in ``output_layer`` (a ``ColumnParallelLinear``) that would materialise ``[T, V/tp]``
logits. The actor never wants them, so :func:`install_hidden_states_output` replaces that layer's
``forward`` (on this instance only) by a pass-through: the model then returns the final, normed hidden
states ``[1, T, H]`` while the weight stays a registered parameter under its usual name (checkpoints,
weight export, DDP buckets and the PP embedding-group all-reduce of tied embeddings are unchanged). The
weight is then used by :func:`~fipo_megatron.actor.logprobs.vocab_parallel_log_probs`, and its gradient
reaches the same parameter Megatron's ``finalize_model_grads`` synchronises between first and last stage.
"""

from __future__ import annotations

import types
from typing import Callable

import torch

from fipo_megatron.actor.logprobs import vocab_parallel_log_probs
from fipo_megatron.actor.packing import PackedMicroBatch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers (``models.sharding.unwrap_model``)."""
    from fipo_megatron.models.sharding import unwrap_model

    return unwrap_model(model)


def _hidden_passthrough(self, input_, weight=None, runtime_gather_output=None, **_):
    # With sequence parallelism each TP rank holds T/tp tokens; the vocab-parallel log-prob needs all T on
    # every rank. Backward of this gather keeps this rank's slice; the log-prob sums hidden grads over TP.
    if getattr(self, "sequence_parallel", False):
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
    return input_, None


def install_hidden_states_output(model: torch.nn.Module) -> None:
    """Make this (last-stage) model return hidden states ``[b, s, h]`` instead of logits. Idempotent."""
    inner = unwrap(model)
    layer = getattr(inner, "output_layer", None)
    if layer is None or getattr(layer, "_fipo_hidden_passthrough", False):
        return
    layer.forward = types.MethodType(_hidden_passthrough, layer)
    layer._fipo_hidden_passthrough = True


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """This TP rank's output-weight shard ``[V/tp, H]``: the tied embedding or ``output_layer.weight``."""
    inner = unwrap(model)
    if getattr(inner, "share_embeddings_and_output_weights", False):
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight


def is_last_stage_chunk(model: torch.nn.Module) -> bool:
    """Whether this model chunk ends in the output layer (computes log-probs)."""
    return bool(getattr(unwrap(model), "post_process", True))


def model_forward(model: torch.nn.Module, mb: PackedMicroBatch, *, cp_group=None) -> torch.Tensor:
    """Run one packed micro-batch through a model chunk; hidden states on the last stage, else activations."""
    return model(mb.input_ids, mb.position_ids, None, packed_seq_params=mb.packed_seq_params(cp_group=cp_group))


def make_forward_step(*, groups, temperature: float, chunk_size: int, num_valid_vocab: int,
                      loss_fn: Callable[[PackedMicroBatch, torch.Tensor, torch.Tensor], tuple]):
    """A Megatron ``forward_step_func(data_iterator, model) -> (output, loss_func)`` over packed micro-batches.

    On the last stage the output is the micro-batch's log-probs ``[T]`` (differentiable) and ``loss_func``
    is ``loss_fn(mb, logp_T, entropy_T)``, which must return Megatron's ``(loss, num_tokens, reduced)``.
    """
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    cp_group = groups.cp_group if groups.cp_size > 1 else None

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model_forward(model, mb, cp_group=cp_group)
        if not is_last_stage_chunk(model):
            return out, None  # intermediate stage: the schedule sends activations on, never calls a loss
        hidden_TH = out.reshape(-1, out.shape[-1])
        weight_VH = output_weight(model)
        logp_T, entropy_T = vocab_parallel_log_probs(
            hidden_TH=hidden_TH, weight_VH=weight_VH, labels_T=mb.labels_T, tp_group=tp_group,
            temperature=temperature, chunk_size=chunk_size, vocab_start=groups.tp_rank * weight_VH.shape[0],
            num_valid_vocab=num_valid_vocab)
        return logp_T, lambda logp: loss_fn(mb, logp, entropy_T)

    return forward_step
