"""Name and shape mapping between Hugging Face decoder LMs and *full* Megatron GPTModel tensors.

A :class:`ModelMapping` works on the TP=1 layout with global layer indices (TP/PP slicing lives in
``fipo_megatron.models.sharding``). It is the one definition, shared by checkpoint conversion and the
rollout weight sync, of how a Megatron tensor becomes HF tensors and back.

Megatron names exist in two spellings, both accepted everywhere:

- local spec: ``decoder.layers.N.input_layernorm.weight``, ``decoder.layers.N.pre_mlp_layernorm.weight``;
- Transformer Engine spec: the norms are fused into the next linear,
  ``decoder.layers.N.self_attention.linear_qkv.layer_norm_weight`` and
  ``decoder.layers.N.mlp.linear_fc1.layer_norm_weight``.

Fused layouts (Megatron's, not HF's):

- ``linear_qkv`` is interleaved per GQA group: for each of the ``num_query_groups`` groups,
  ``[q heads of the group (heads/groups * head_dim rows); k (head_dim rows); v (head_dim rows)]``;
- ``linear_fc1`` of SwiGLU is ``[gate; up]`` stacked on dim 0.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import torch

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Per-layer Megatron suffix -> (kind, HF suffixes under ``model.layers.N.``). Both norm spellings map
# to the same HF tensor; ``megatron_names`` picks the spelling of the requested backend.
_LAYER_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("copy", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("copy", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": ("qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": ("qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                               "self_attn.v_proj.bias")),
    "self_attention.q_layernorm.weight": ("copy", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("copy", ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": ("copy", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("copy", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("copy", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("gate_up", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("copy", ("mlp.down_proj.weight",)),
}
_GLOBAL_TABLE: dict[str, str] = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
BACKENDS = ("local", "te")


def config_get(hf_config: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a transformers config object or a plain ``config.json`` dict."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelMapping:
    """HF <-> full-Megatron mapping for one decoder-only model (dense, RMSNorm, SwiGLU, RoPE, GQA).

    Build it through ``fipo_megatron.checkpoint.registry.get_mapping(hf_config)``; the per-family
    modules under ``checkpoint/mappings/`` decide the flags from the HF config.
    """

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    # Megatron may pad the vocabulary (to a multiple of 128*tp); the padded rows are dropped on export
    # and zero-filled on import. Equal to ``vocab_size`` when nothing is padded.
    padded_vocab_size: int | None = None

    def __post_init__(self):
        for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                      "head_dim", "vocab_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_query_groups ({self.num_query_groups})")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size ({self.vocab_size})")

    # ---- names -------------------------------------------------------------------------------------
    def megatron_names(self, *, backend: str = "local") -> list[str]:
        """All full Megatron parameter names (global layer index) in model order, local or TE spelling."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        te = backend == "te"
        per_layer = ["self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight",
                     "self_attention.linear_qkv.weight"]
        if self.qkv_bias:
            per_layer.append("self_attention.linear_qkv.bias")
        if self.qk_norm:
            per_layer += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
        per_layer += ["self_attention.linear_proj.weight",
                      "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight",
                      "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
        names = ["embedding.word_embeddings.weight"]
        names += [f"decoder.layers.{i}.{s}" for i in range(self.num_layers) for s in per_layer]
        names.append("decoder.final_layernorm.weight")
        if not self.tie_word_embeddings:
            names.append("output_layer.weight")
        return names

    def hf_names(self) -> list[str]:
        """All HF tensor names this model's safetensors hold (in Megatron order)."""
        return [h for name in self.megatron_names() for h in self.hf_sources(name)]

    def _resolve(self, megatron_name: str) -> tuple[str, list[str]]:
        """(kind, HF names) for one Megatron name; ValueError for a name this model does not have."""
        if megatron_name in _GLOBAL_TABLE:
            if megatron_name == "output_layer.weight" and self.tie_word_embeddings:
                # Tied: the output layer *is* the embedding (PP>1 keeps a copy on the last stage).
                return "vocab", ["model.embed_tokens.weight"]
            kind = "copy" if megatron_name == "decoder.final_layernorm.weight" else "vocab"
            return kind, [_GLOBAL_TABLE[megatron_name]]
        match = _LAYER_RE.match(megatron_name)
        if match is not None and match.group(2) in _LAYER_TABLE:
            layer, suffix = int(match.group(1)), match.group(2)
            optional_ok = True
            if suffix == "self_attention.linear_qkv.bias":
                optional_ok = self.qkv_bias
            elif suffix in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"):
                optional_ok = self.qk_norm
            if layer < self.num_layers and optional_ok:
                kind, hf_suffixes = _LAYER_TABLE[suffix]
                return kind, [f"model.layers.{layer}.{s}" for s in hf_suffixes]
        raise ValueError(f"{self.architecture}: no HF mapping for Megatron parameter {megatron_name!r} "
                         f"(expected a global layer index < {self.num_layers}; local or TE spec names)")

    def hf_sources(self, megatron_name: str) -> list[str]:
        """The HF tensor names that make up ``megatron_name``."""
        return self._resolve(megatron_name)[1]

    # ---- shapes ------------------------------------------------------------------------------------
    @property
    def _megatron_vocab(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    def expected_shape(self, megatron_name: str) -> tuple[int, ...]:
        """Shape of the full (TP=1) Megatron tensor ``megatron_name``."""
        kind, hf = self._resolve(megatron_name)
        if kind == "vocab":
            return (self._megatron_vocab, self.hidden_size)
        if kind == "qkv":
            rows = (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim
            return (rows, self.hidden_size) if megatron_name.endswith("weight") else (rows,)
        if kind == "gate_up":
            return (2 * self.ffn_hidden_size, self.hidden_size)
        return self.hf_expected_shape(hf[0])

    def hf_expected_shape(self, hf_name: str) -> tuple[int, ...]:
        """Shape of the HF tensor ``hf_name``."""
        h, d, f = self.hidden_size, self.head_dim, self.ffn_hidden_size
        q_rows, kv_rows = self.num_attention_heads * d, self.num_query_groups * d
        suffix = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
        table = {
            "model.embed_tokens.weight": (self.vocab_size, h), "lm_head.weight": (self.vocab_size, h),
            "model.norm.weight": (h,), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q_rows, h), "self_attn.k_proj.weight": (kv_rows, h),
            "self_attn.v_proj.weight": (kv_rows, h), "self_attn.q_proj.bias": (q_rows,),
            "self_attn.k_proj.bias": (kv_rows,), "self_attn.v_proj.bias": (kv_rows,),
            "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,), "self_attn.o_proj.weight": (h, q_rows),
            "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
        }
        if suffix not in table:
            raise ValueError(f"{self.architecture}: unknown HF tensor {hf_name!r}")
        return table[suffix]

    @staticmethod
    def _check(name: str, tensor: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(f"{what} tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")

    # ---- conversion --------------------------------------------------------------------------------
    def megatron_to_hf(self, megatron_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Split one full Megatron tensor into its HF tensors (views where the layout allows)."""
        kind, hf = self._resolve(megatron_name)
        self._check(megatron_name, tensor, self.expected_shape(megatron_name), "Megatron")
        if kind == "copy":
            return [(hf[0], tensor)]
        if kind == "vocab":
            return [(hf[0], tensor[: self.vocab_size])]
        if kind == "gate_up":
            gate, up = torch.chunk(tensor, 2, dim=0)
            return list(zip(hf, (gate, up)))
        # qkv: view rows as (groups, q_per_group + 2, head_dim, ...) and pick q / k / v per group.
        g, qpg, d = self.num_query_groups, self.num_attention_heads // self.num_query_groups, self.head_dim
        grouped = tensor.reshape(g, qpg + 2, d, *tensor.shape[1:])
        q = grouped[:, :qpg].reshape(g * qpg * d, *tensor.shape[1:])
        k = grouped[:, qpg].reshape(g * d, *tensor.shape[1:])
        v = grouped[:, qpg + 1].reshape(g * d, *tensor.shape[1:])
        return list(zip(hf, (q, k, v)))

    def hf_to_megatron(self, megatron_name: str, hf_tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Build the full Megatron tensor ``megatron_name`` from its HF tensors (``hf_sources`` names)."""
        kind, hf = self._resolve(megatron_name)
        missing = [h for h in hf if h not in hf_tensors]
        if missing:
            raise ValueError(f"{self.architecture}: Megatron parameter {megatron_name!r} needs HF tensors {missing}")
        parts = [hf_tensors[h] for h in hf]
        for h, t in zip(hf, parts):
            self._check(h, t, self.hf_expected_shape(h), "HF")
        if kind == "copy":
            return parts[0]
        if kind == "vocab":
            extra = self._megatron_vocab - self.vocab_size
            return parts[0] if extra == 0 else torch.cat([parts[0], parts[0].new_zeros(extra, self.hidden_size)])
        if kind == "gate_up":
            return torch.cat(parts, dim=0)
        g, qpg, d = self.num_query_groups, self.num_attention_heads // self.num_query_groups, self.head_dim
        q, k, v = parts
        rest = tuple(q.shape[1:])
        fused = torch.cat([q.reshape(g, qpg, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)], dim=1)
        return fused.reshape(g * (qpg + 2) * d, *rest)


def common_fields(hf_config: Any) -> dict[str, Any]:
    """The ModelMapping fields every supported family reads the same way from its HF config."""
    arch = (config_get(hf_config, "architectures") or [None])[0] or config_get(hf_config, "model_type")
    heads = config_get(hf_config, "num_attention_heads")
    hidden = config_get(hf_config, "hidden_size")
    head_dim = config_get(hf_config, "head_dim") or hidden // heads
    return dict(architecture=str(arch), num_layers=config_get(hf_config, "num_hidden_layers"), hidden_size=hidden,
                ffn_hidden_size=config_get(hf_config, "intermediate_size"), num_attention_heads=heads,
                num_query_groups=config_get(hf_config, "num_key_value_heads") or heads, head_dim=head_dim,
                vocab_size=config_get(hf_config, "vocab_size"),
                tie_word_embeddings=bool(config_get(hf_config, "tie_word_embeddings", False)))


def require(hf_config: Any, arch: str, key: str, allowed: tuple, default: Any = None) -> None:
    """ValueError when an HF config field takes a value this Megatron mapping cannot represent."""
    value = config_get(hf_config, key, default)
    if value not in allowed:
        raise ValueError(f"{arch}: config field {key}={value!r} is not supported (supported: {list(allowed)})")
