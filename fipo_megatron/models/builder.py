"""Build Megatron ``GPTModel`` chunks from a Hugging Face config.

    groups = initialize_parallel(parallel, hf_config=hf_config)
    model = build_gpt_model(hf_config, groups=groups, params_dtype=torch.bfloat16)   # this rank's stage
    chunks = build_model_chunks(hf_config, groups=groups)                            # one per virtual stage

Layer spec: Transformer Engine (``get_gpt_layer_with_transformer_engine_spec``) when TE imports and CUDA is
present, else the local spec with :class:`~fipo_megatron.models.cp_attention.LocalCoreAttention` as core
attention (packed THD input and context parallelism without TE). FP8 needs TE.

Inputs (the actor's contract): packed THD batches are ``input_ids`` ``[1, t_local]`` with
``PackedSeqParams(qkv_format="thd", cu_seqlens_q/kv=<offsets of the full packed batch, each sequence
padded to a multiple of 2*cp>, max_seqlen_q/kv=<longest padded sequence>)``; under CP ``t_local`` is this
rank's zig-zag share (``parallel.cp_layout.split_packed``). RoPE positions come from ``cu_seqlens``, not
from ``position_ids``: megatron-core restarts them at every sequence and, under CP, selects chunks ``r`` and
``2cp-1-r`` exactly as ``cp_layout`` does (unfused path: ``rope_utils._apply_rotary_pos_emb_thd``; padded
input: ``get_pos_emb_on_this_cp_rank``; TE's fused kernel does the same), which the parity tests check
against transformers. Output logits are ``[b, s_local, vocab / tp]`` (vocab-parallel).
"""

from __future__ import annotations

import dataclasses

import torch

from fipo_megatron.log import get_logger
from fipo_megatron.models.hf_config import arch_spec, padded_vocab_size, rope_settings, transformer_config_from_hf
from fipo_megatron.parallel.topology import ParallelConfig, ParallelGroups, seed_stage_rng

logger = get_logger(__name__)

BACKENDS = ("auto", "te", "local")
FP8_FORMATS = (None, "e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")


def te_available() -> bool:
    """Whether Transformer Engine imports and CUDA is present (the conditions for the TE spec)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def require_fp8_training(*, field: str = "actor.precision") -> None:
    """Raise a ValueError naming ``field`` unless FP8 training can run here (CUDA and Transformer Engine):
    called before any model is built, so a CPU or TE-less machine fails at start-up, not mid-build."""
    if not torch.cuda.is_available():
        raise ValueError(f"{field}='fp8' needs a CUDA GPU (Transformer Engine's FP8 GEMMs); none is visible. "
                         "Use precision 'bf16' on this machine.")
    if not te_available():
        raise ValueError(f"{field}='fp8' needs Transformer Engine, which does not import here: "
                         "pip install fipo_megatron[te] (or use precision 'bf16')")


def resolve_backend(backend: str, *, fp8: str | None = None) -> str:
    """``"auto"`` -> ``"te"`` when :func:`te_available` else ``"local"``; checks explicit choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"fp8 must be one of {FP8_FORMATS}, got {fp8!r}")
    if backend == "auto":
        backend = "te" if te_available() else "local"
    if backend == "te" and not te_available():
        raise ValueError("backend='te' needs CUDA and Transformer Engine: pip install fipo_megatron[te]")
    if fp8 is not None and backend != "te":
        raise ValueError(f"fp8={fp8!r} needs Transformer Engine on CUDA: pip install fipo_megatron[te]")
    return backend


def layer_spec(config, *, backend: str):
    """The transformer layer ``ModuleSpec`` for ``backend`` ("te" | "local")."""
    from megatron.core.models.gpt import gpt_layer_specs

    if backend == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    from fipo_megatron.models.cp_attention import LocalCoreAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    attention = spec.submodules.self_attention
    # Megatron's local DotProductAttention handles neither THD nor CP; swap in ours (specs are fresh per call).
    try:
        attention.submodules.core_attention = LocalCoreAttention
    except dataclasses.FrozenInstanceError:  # a megatron-core whose spec dataclasses are frozen
        attention.submodules = dataclasses.replace(attention.submodules, core_attention=LocalCoreAttention)
    return spec


def make_transformer_config(hf_config, *, parallel: ParallelConfig, params_dtype: torch.dtype = torch.float32,
                            backend: str = "auto", fp8: str | None = None, fp8_recipe: str = "delayed",
                            **overrides):
    """``transformer_config_from_hf`` plus the backend-dependent fields (transformer_impl, FP8, RoPE fusion)."""
    backend = resolve_backend(backend, fp8=fp8)
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe must be one of {FP8_RECIPES}, got {fp8_recipe!r}")
    extra: dict = {"transformer_impl": "transformer_engine" if backend == "te" else "local"}
    if backend == "te":
        extra["apply_rope_fusion"] = True  # TE's fused RoPE handles THD + CP zig-zag positions itself
    if fp8 is not None:
        extra.update(fp8=fp8, fp8_recipe=fp8_recipe)
    extra.update(overrides)
    return transformer_config_from_hf(hf_config, parallel=parallel, params_dtype=params_dtype, **extra), backend


def build_gpt_model(hf_config, *, groups: ParallelGroups, params_dtype: torch.dtype = torch.float32,
                    backend: str = "auto", fp8: str | None = None, fp8_recipe: str = "delayed",
                    pre_process: bool | None = None, post_process: bool | None = None,
                    vp_stage: int | None = None, seed: int | None = 1234, config_overrides: dict | None = None):
    """One ``GPTModel`` (this rank's pipeline stage, or virtual stage ``vp_stage``) for ``hf_config``.

    ``groups``: the bundle ``parallel.initialize_parallel`` returned (its ``config`` is the layout).
    ``pre_process`` / ``post_process`` default to whether this chunk holds the embedding / the output
    layer. ``seed``: if given, re-seeds the RNGs for this stage before building
    (``parallel.topology.seed_stage_rng``; weights are normally loaded afterwards, so init rarely
    matters). The vocabulary is padded per :func:`~fipo_megatron.models.hf_config.padded_vocab_size`.
    ``config_overrides`` go to ``TransformerConfig`` (e.g. recompute settings, calculate_per_token_loss).
    """
    from megatron.core.models.gpt import GPTModel

    parallel = groups.config
    arch_spec(hf_config)
    config, backend = make_transformer_config(hf_config, parallel=parallel, params_dtype=params_dtype,
                                              backend=backend, fp8=fp8, fp8_recipe=fp8_recipe,
                                              **(config_overrides or {}))
    if parallel.num_virtual_stages > 1 and vp_stage is None:
        raise ValueError("vp_stage is required with vpp > 1; use build_model_chunks")
    if pre_process is None:
        pre_process = groups.is_first_chunk(vp_stage)
    if post_process is None:
        post_process = groups.is_last_chunk(vp_stage)
    if seed is not None:
        seed_stage_rng(seed, pp_rank=groups.pp_rank)
    rope = rope_settings(hf_config)
    kwargs = dict(
        config=config,
        transformer_layer_spec=layer_spec(config, backend=backend),
        vocab_size=padded_vocab_size(hf_config, tp=parallel.tp),
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # logits stay vocab-sharded over TP; the actor's log-prob is vocab-parallel
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope.rotary_base,
        rope_scaling=rope.rope_scaling,
        rope_scaling_factor=rope.rope_scaling_factor,
    )
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    model = GPTModel(**kwargs)
    if params_dtype != torch.float32:
        # The local spec's torch RMSNorm ignores params_dtype and stays fp32; cast it like every other
        # parameter (as Megatron-LM's Float16Module does), so norms and activations share one dtype.
        for param in model.parameters():
            if param.dtype != params_dtype:
                param.data = param.data.to(params_dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    logger.debug("built GPTModel stage (pre=%s post=%s vp=%s) backend=%s", pre_process, post_process, vp_stage,
                 backend)
    return model


def build_model_chunks(hf_config, *, groups: ParallelGroups, **kwargs) -> list:
    """All model chunks of this rank: one per virtual pipeline stage (a one-element list without vpp)."""
    if groups.vpp_size == 1:
        return [build_gpt_model(hf_config, groups=groups, **kwargs)]
    return [build_gpt_model(hf_config, groups=groups, vp_stage=i, **kwargs) for i in range(groups.vpp_size)]
