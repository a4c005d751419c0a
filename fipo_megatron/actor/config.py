"""``ActorConfig``: how the Megatron actor batches, recomputes and optimises (verl-style names)."""

from __future__ import annotations

import dataclasses

import torch

PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RECOMPUTE = ("none", "full", "selective")
PRECISIONS = ("bf16", "fp8")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActorConfig:
    """Actor settings. Defaults are the FIPO 32B recipe's optimiser (docs/algorithm.md §6).

    Fields:
        ppo_mini_batch_size: prompts per optimizer step; a mini-batch is ``ppo_mini_batch_size * n``
            samples (n responses per prompt). A step of 512 prompts with 64 per mini-batch makes 8 updates.
        ppo_epochs: passes over the step's data.
        max_tokens_per_micro_batch: token budget of one packed micro-batch (padded tokens, before the CP
            split); a longer single sample gets a micro-batch of its own.
        logprob_chunk_size: tokens per chunk in the vocab-parallel log-prob (memory ~ chunk x V/tp x 4 B).
        lr: peak learning rate, reached after ``lr_warmup_steps`` training steps, then constant.
        lr_warmup_steps: linear warm-up from 0, counted in training steps (``update`` calls), as verl's
            actor steps its scheduler; every mini-batch of a step uses that step's lr (0: constant).
        weight_decay: decoupled (AdamW) weight decay.
        adam_beta1, adam_beta2, adam_eps: Adam hyper-parameters.
        clip_grad: global grad-norm clip (0 disables clipping).
        params_dtype: "float32" | "bfloat16" parameters (bf16 keeps fp32 main weights in the optimizer).
        precision: "bf16" (GEMMs in ``params_dtype``: bfloat16 in the recipes, float32 in CPU tests) or "fp8"
            (Transformer Engine FP8 GEMMs with bf16 parameters and fp32 main weights; needs CUDA and TE,
            refused with a ValueError where either is missing).
        fp8_format: with precision "fp8": "e4m3" (forward and backward in e4m3) or "hybrid" (e4m3 forward,
            e5m2 gradients; Megatron-LM's usual training choice).
        fp8_recipe: with precision "fp8": TE's scaling recipe: "delayed" (per-tensor amax history),
            "tensorwise" (per-tensor current scaling) or "blockwise" (1x128 / 128x128 block scales, Hopper;
            the recipe matching block-FP8 rollout weights).
        recompute: activation recomputation: "none" | "full" (every layer) | "selective" (core attention).
        seed: RNG seed (model init before weights are loaded, dropout if any).
    """

    ppo_mini_batch_size: int = 64
    ppo_epochs: int = 1
    max_tokens_per_micro_batch: int = 16384
    logprob_chunk_size: int = 2048
    lr: float = 1e-6
    lr_warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    params_dtype: str = "bfloat16"
    precision: str = "bf16"
    fp8_format: str = "hybrid"
    fp8_recipe: str = "delayed"
    recompute: str = "none"
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("ppo_mini_batch_size", "ppo_epochs", "max_tokens_per_micro_batch", "logprob_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ActorConfig.{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"ActorConfig.lr must be > 0, got {self.lr!r}")
        if not isinstance(self.lr_warmup_steps, int) or self.lr_warmup_steps < 0:
            raise ValueError(f"ActorConfig.lr_warmup_steps must be an int >= 0, got {self.lr_warmup_steps!r}")
        if self.weight_decay < 0:
            raise ValueError(f"ActorConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ActorConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.adam_eps > 0:
            raise ValueError(f"ActorConfig.adam_eps must be > 0, got {self.adam_eps!r}")
        if self.clip_grad < 0:
            raise ValueError(f"ActorConfig.clip_grad must be >= 0 (0 disables), got {self.clip_grad!r}")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"ActorConfig.params_dtype must be one of {sorted(PARAMS_DTYPES)}, got {self.params_dtype!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"ActorConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.fp8_format not in FP8_FORMATS:
            raise ValueError(f"ActorConfig.fp8_format must be one of {FP8_FORMATS}, got {self.fp8_format!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"ActorConfig.fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        if self.precision == "fp8" and self.params_dtype != "bfloat16":
            raise ValueError(f"ActorConfig.precision='fp8' needs params_dtype='bfloat16' (FP8 GEMMs keep bf16 "
                             f"parameters), got params_dtype={self.params_dtype!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"ActorConfig.recompute must be one of {RECOMPUTE}, got {self.recompute!r}")

    @property
    def torch_params_dtype(self) -> torch.dtype:
        """``params_dtype`` as a torch dtype."""
        return PARAMS_DTYPES[self.params_dtype]

    def fp8_model_kwargs(self) -> dict:
        """``fp8`` / ``fp8_recipe`` for the model builder (empty unless precision is "fp8")."""
        if self.precision != "fp8":
            return {}
        return {"fp8": self.fp8_format, "fp8_recipe": self.fp8_recipe}

    def recompute_overrides(self) -> dict:
        """``TransformerConfig`` fields for the chosen activation recomputation."""
        if self.recompute == "full":
            return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if self.recompute == "selective":
            return dict(recompute_granularity="selective")
        return {}
