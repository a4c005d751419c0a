"""HF <-> Megatron conversion, one tensor at a time.

    load_hf_into_model(model_chunks, hf_dir, groups=groups)         # trainer: HF weights into a sharded model
    convert_hf_to_megatron(hf_dir=..., out_dir=..., tp=8, pp=4)      # offline: HF dir -> dist checkpoint
    convert_megatron_to_hf(ckpt_dir=..., hf_ref_dir=..., out_dir=...) # offline: dist checkpoint -> HF dir

The offline converters run in one CPU process. They build the model once at tp=pp=1 in the
checkpoint's own dtype, without random initialisation (untouched pages cost no memory), and stream:
HF -> Megatron reads one HF tensor group at a time into its parameter; Megatron -> HF writes one
tensor at a time into pre-planned safetensors shards. Peak memory is about one copy of the model.

A dist checkpoint stores global tensors, so it is layout-free: the actor loads it at any (tp, pp, vpp).
``--tp/--pp`` of the HF -> Megatron converter therefore only *validate* the intended layout against
the model (heads, KV heads, layers) and are recorded in the checkpoint's ``extra_state``.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from fipo_megatron.checkpoint.dist_ckpt import check_checkpoint_safe, load_megatron_checkpoint, save_megatron_checkpoint
from fipo_megatron.checkpoint.fs import atomic_output_dir, check_output_dir
from fipo_megatron.checkpoint.hf_io import HFCheckpointReader, TensorSpec, copy_hf_metadata, write_safetensors_shards
from fipo_megatron.checkpoint.mappings.base import ModelMapping
from fipo_megatron.checkpoint.registry import get_mapping
from fipo_megatron.log import get_logger

logger = get_logger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # HF's default shard size for save_pretrained
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def load_hf_config(hf_dir: str | os.PathLike):
    """The transformers config of an HF model directory (FileNotFoundError naming config.json)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"HF config not found: {path}")
    import transformers

    return transformers.AutoConfig.from_pretrained(str(hf_dir))


def _progress(total: int, desc: str, unit: str = "B"):
    from tqdm import tqdm

    quiet = dist.is_initialized() and dist.get_rank() != 0
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=quiet)


def _model_mapping(hf_config, params: dict[str, tuple], *, tp_size: int) -> ModelMapping:
    # The embedding may carry TP padding rows; read the padded size off the model itself.
    padded = None
    for name in _VOCAB_PARAMS:
        if name in params:
            padded = params[name][1].shape[0] * tp_size
    mapping = get_mapping(hf_config)
    if padded is not None and padded != mapping.vocab_size:
        mapping = get_mapping(hf_config, padded_vocab_size=padded)
    return mapping


# HF tensors a model directory may carry that no parameter maps to: rotary caches some exporters keep, and
# a tied model's copy of the embedding.
_IGNORABLE_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_hf_tensor_names(hf_dir: str | os.PathLike, hf_config=None, *,
                          reader: HFCheckpointReader | None = None) -> None:
    """ValueError unless the HF directory's tensors are exactly those its ``config.json`` describes.

    Reads only the names (the index, or each file's header). A ``config.json`` with fewer layers than the
    weights (a truncated model would train), tensors no parameter uses, and tensors the model needs but the
    directory lacks are all named.
    """
    hf_config = hf_config if hf_config is not None else load_hf_config(hf_dir)
    mapping = get_mapping(hf_config)
    reader = reader or HFCheckpointReader(hf_dir)
    expected = set(mapping.hf_names())
    present = set(reader.names())
    extra = sorted(n for n in present - expected
                   if not _IGNORABLE_HF.search(n) and not (n == "lm_head.weight" and mapping.tie_word_embeddings))
    beyond = sorted({int(m.group(1)) for n in extra if (m := _HF_LAYER.match(n))})
    if beyond and beyond[0] >= mapping.num_layers:
        raise ValueError(f"HF model {hf_dir}: config.json has num_hidden_layers={mapping.num_layers} but the weights "
                         f"hold layers up to {beyond[-1]} (e.g. {extra[0]!r}); fix config.json or the weights, "
                         "a truncated model would train silently")
    if extra:
        raise ValueError(f"HF model {hf_dir}: {len(extra)} tensor(s) that no {mapping.architecture} parameter uses, "
                         f"e.g. {extra[:5]}; is config.json the one these weights were saved with?")
    missing = sorted(expected - present)
    if missing:
        raise ValueError(f"HF model {hf_dir}: {len(missing)} tensor(s) the model needs are missing, e.g. {missing[:5]}")


@torch.no_grad()
def load_hf_into_model(model_chunks: Sequence[torch.nn.Module], hf_dir: str | os.PathLike, *, groups,
                       hf_config=None, show_progress: bool = False) -> None:
    """Load an HF safetensors directory straight into this rank's (TP/PP-sharded) ``model_chunks``.

    Every rank reads only the HF tensors of its own parameters (memory-mapped), builds each full
    Megatron tensor with the family mapping and copies its TP slice in; nothing else is materialised.
    Shapes are checked against the config (ValueError naming the tensor and both shapes), the set of
    tensors against the config (:func:`check_hf_tensor_names`), and every tensor must be finite.
    """
    from fipo_megatron.models.sharding import local_params, shard_for_tp

    hf_config = hf_config if hf_config is not None else load_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    check_hf_tensor_names(hf_dir, hf_config, reader=reader)
    params = local_params(model_chunks)
    mapping = _model_mapping(hf_config, params, tp_size=groups.tp_size)
    bar = _progress(len(params), f"load {Path(hf_dir).name}", unit="tensor") if show_progress else None
    try:
        for name, (_, param, _) in params.items():
            sources = {h: reader.get(h) for h in mapping.hf_sources(name)}
            for h, t in sources.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"HF model {hf_dir}: tensor {h!r} holds NaN or Inf values")
            full = mapping.hf_to_megatron(name, sources)
            shard = shard_for_tp(name, full, tp_rank=groups.tp_rank, tp_size=groups.tp_size)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: TP shard shape {tuple(shard.shape)} != parameter shape {tuple(param.shape)}")
            param.copy_(shard)
            del sources, full, shard
            if bar is not None:
                bar.update(1)
    finally:
        reader.close()
        if bar is not None:
            bar.close()


def iter_hf_tensors(model_chunk: torch.nn.Module, mapping: ModelMapping, *,
                    dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors of a *full* (tp=pp=1) model, in ``mapping.megatron_names`` order, cast to ``dtype``.

    The cast matters because Megatron keeps some parameters (the local spec's norms) in fp32 in a
    bf16 model, while an HF checkpoint has one dtype.
    """
    from fipo_megatron.models.sharding import local_params

    params = local_params([model_chunk])
    for name in mapping.megatron_names(backend="te"):
        for hf_name, tensor in mapping.megatron_to_hf(name, params[name][1].detach()):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)


def hf_tensor_specs(mapping: ModelMapping, *, dtype: torch.dtype) -> list[TensorSpec]:
    """Names, shapes and dtypes of the HF tensors :func:`iter_hf_tensors` yields (computed on meta tensors)."""
    specs = []
    for name in mapping.megatron_names(backend="te"):
        meta = torch.empty(mapping.expected_shape(name), dtype=dtype, device="meta")
        specs += [TensorSpec(name=h, shape=tuple(t.shape), dtype=dtype) for h, t in mapping.megatron_to_hf(name, meta)]
    return specs


@contextlib.contextmanager
def single_process_model(hf_config, *, params_dtype: torch.dtype) -> Iterator[tuple[Any, Any]]:
    """A tp=pp=1 GPTModel (uninitialised weights) on one CPU process, with Megatron's groups set up and torn down."""
    from fipo_megatron.models.builder import build_gpt_model
    from fipo_megatron.parallel.topology import ParallelConfig, destroy_parallel, init_distributed, initialize_parallel

    created = init_distributed(backend="gloo")  # conversion is CPU work, even where a GPU is visible
    try:
        if dist.get_world_size() != 1:
            raise ValueError(f"offline conversion runs in one process, got world size {dist.get_world_size()}")
        parallel = ParallelConfig()
        groups = initialize_parallel(parallel, hf_config=hf_config)
        model = build_gpt_model(hf_config, groups=groups, params_dtype=params_dtype, backend="local", seed=None,
                                config_overrides={"perform_initialization": False})
        yield model, groups
    finally:
        destroy_parallel()
        if created:
            dist.destroy_process_group()


def convert_hf_to_megatron(*, hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
                           force: bool = False) -> Path:
    """Convert an HF safetensors directory into a (layout-free) Megatron dist checkpoint at ``out_dir``.

    ``tp``/``pp``: the layout the checkpoint is meant for; validated against the model, recorded, and
    otherwise irrelevant (any layout loads it). Every input error is raised before any work starts.
    """
    from fipo_megatron.parallel.topology import ParallelConfig, validate_layout

    check_output_dir(out_dir, force=force)
    hf_config = load_hf_config(hf_dir)
    mapping = get_mapping(hf_config)  # unknown architecture / unsupported options: fail before building anything
    heads = hf_config.num_attention_heads
    validate_layout(ParallelConfig(tp=tp, pp=pp), world_size=tp * pp, num_attention_heads=heads,
                    num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
                    num_layers=hf_config.num_hidden_layers, on_cpu=False)
    reader = HFCheckpointReader(hf_dir)
    check_hf_tensor_names(hf_dir, hf_config, reader=reader)  # before the model is built
    dtype = reader.dtype()
    reader.close()
    with single_process_model(hf_config, params_dtype=dtype) as (model, groups):
        load_hf_into_model([model], hf_dir, groups=groups, hf_config=hf_config, show_progress=True)
        extra = {"converted_from": {"hf_dir": str(Path(hf_dir).absolute()), "architecture":
                                    mapping.architecture, "dtype": str(dtype), "intended_tp": tp,
                                    "intended_pp": pp, "hf_config": hf_config.to_dict()}}
        final = save_megatron_checkpoint(out_dir, [model], extra_state=extra, consume_model=True)
    logger.info("converted %s -> %s (%s, intended layout tp=%d pp=%d)", hf_dir, final, dtype, tp, pp)
    return final


def _checkpoint_dtype(ckpt_dir: Path) -> torch.dtype:
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    return metadata["embedding.word_embeddings.weight"].dtype


def convert_megatron_to_hf(*, ckpt_dir: str | os.PathLike, hf_ref_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert a Megatron dist checkpoint (any saved layout) to an HF directory at ``out_dir``.

    ``hf_ref_dir`` supplies config.json, generation config and tokenizer files (copied to ``out_dir``).
    Weights are written in the checkpoint's dtype as sharded safetensors plus index. The output
    appears under ``out_dir`` only once complete (temporary sibling directory, then rename).
    """
    ckpt_dir = Path(ckpt_dir)
    check_output_dir(out_dir, force=force)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"Megatron dist checkpoint not found (no metadata.json): {ckpt_dir / 'metadata.json'}")
    check_checkpoint_safe(ckpt_dir)  # before megatron-core unpickles its index
    hf_config = load_hf_config(hf_ref_dir)
    get_mapping(hf_config)
    dtype = _checkpoint_dtype(ckpt_dir)
    with single_process_model(hf_config, params_dtype=dtype) as (model, _):
        load_megatron_checkpoint(ckpt_dir, [model])
        from fipo_megatron.models.sharding import local_params

        mapping = _model_mapping(hf_config, local_params([model]), tp_size=1)
        specs = hf_tensor_specs(mapping, dtype=dtype)
        with atomic_output_dir(out_dir, force=force) as tmp:
            bar = _progress(sum(s.num_bytes for s in specs), f"write {Path(out_dir).name}")
            try:
                write_safetensors_shards(tmp, specs=specs, tensors=iter_hf_tensors(model, mapping, dtype=dtype),
                                         max_shard_bytes=max_shard_bytes, progress=bar.update)
            finally:
                bar.close()
            copy_hf_metadata(hf_ref_dir, tmp)
    logger.info("converted %s -> %s (%s)", ckpt_dir, out_dir, dtype)
    return Path(out_dir)
