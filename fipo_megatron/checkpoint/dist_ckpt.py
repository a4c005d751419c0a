"""Megatron distributed checkpoints (``dist_checkpointing``, torch_dist backend): layout-free, atomic.

    save_megatron_checkpoint(ckpt_dir, model_chunks, optimizer=None, extra_state={"step": 10})
    extra = load_megatron_checkpoint(ckpt_dir, model_chunks, optimizer=None)

Every tensor is stored as its *global* tensor (all TP shards, all layers of all PP stages), so a
checkpoint saved at one (tp, pp, vpp, dp) loads at any other. This works on CPU/gloo as on GPU: the
torch_dist backend is ``torch.distributed.checkpoint`` with a file-system writer; only the
fully-parallel *load* (which exchanges tensors over NCCL) is GPU-only and is used only with CUDA.

Atomicity: all ranks write into ``<ckpt_dir>.tmp-<pid of rank 0>``; after every rank finished (barrier)
rank 0 renames it to ``ckpt_dir`` (moving an existing one aside first), so a crash never leaves a
half checkpoint under the final name. The model chunks are stored under ``model`` (one chunk) or
``model0``, ``model1``, ... (virtual pipeline), as Megatron-LM does.

Host memory: a model-only load writes the SwiGLU ``linear_fc1`` halves straight into the parameters
(no merge copy), and ``save_megatron_checkpoint(..., consume_model=True)`` (offline conversion) copies
view-backed shards one parameter at a time; both keep the peak near one copy of the model
(docs/benchmarks.md, "Checkpoint conversion").

Loading never runs code from the checkpoint (a downloaded one may be hostile): before megatron-core
reads anything, :func:`check_checkpoint_safe` unpickles torch DCP's ``.metadata`` (a plain pickle that
torch reads with ``pickle.load``) with an allow-list of DCP's own metadata classes, and lists the
globals of every ``*.pt`` (megatron-core's ``common.pt``, ``fipo_extra_state.pt``) without executing
them; the extra state is then read with ``weights_only=True``.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from fipo_megatron.log import get_logger

logger = get_logger(__name__)

EXTRA_STATE_FILE = "fipo_extra_state.pt"
FORMAT_FILE = "fipo_checkpoint.json"
# Sharding choices recorded in the checkpoint and replayed on load (Megatron-LM does the same), so a
# newer megatron-core with other defaults still builds the sharded state dict the files were written with.
_CONTENT_METADATA = {"singleton_local_shards": False}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would run code (or build objects outside the allow-list) when loaded."""


# torch DCP pickles its ``Metadata`` (dataclasses and enums of these modules, torch.Size, dtypes, layouts);
# read from torch/distributed/checkpoint/{metadata,planner,filesystem}.py of torch 2.13.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray"}
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, *, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES and not name.startswith("__"):
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(obj, type) or name == "_StorageInfo":
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_ENUMS):
            return getattr(torch, name)
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch.serialization" and name == "_get_layout":
            return getattr(torch.serialization, name)
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "builtins" and name in _BUILTINS:
            return getattr(__import__("builtins"), name)
        raise UnsafeCheckpointError(f"{self.source} refers to {module}.{name}, which a checkpoint has no reason to "
                                    "hold; refusing to load it (it could run code)")


def check_checkpoint_safe(ckpt_dir: str | os.PathLike) -> None:
    """Raise ``UnsafeCheckpointError`` naming the file if loading ``ckpt_dir`` could run code from it.

    The DCP ``.metadata`` is unpickled with an allow-list (a pickle that is not even readable is named
    too); every ``*.pt`` below ``ckpt_dir`` must load under ``weights_only=True`` without extra globals.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = ckpt_dir / ".metadata"
    if meta.is_file():
        try:
            _RestrictedUnpickler(meta.read_bytes(), source=str(meta)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # truncated or garbage: say which file, not pickle's bare message
            raise UnsafeCheckpointError(f"{meta} is not a readable checkpoint index ({type(exc).__name__}: {exc})") \
                from None
    for pt in sorted(ckpt_dir.rglob("*.pt")):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(pt))
        except Exception as exc:
            raise UnsafeCheckpointError(f"{pt} is not a readable torch file ({type(exc).__name__}: {exc})") from None
        if unsafe:
            raise UnsafeCheckpointError(f"{pt} holds objects that need code to rebuild ({', '.join(unsafe[:5])}); "
                                        "refusing to load it")


def load_extra_state(ckpt_dir: str | os.PathLike) -> dict:
    """The ``extra_state`` saved with the checkpoint (tensors and plain containers only: ``weights_only``)."""
    path = Path(ckpt_dir) / EXTRA_STATE_FILE
    if not path.is_file():
        return {}
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path} holds objects outside the weights-only allow-list: {exc}") from None


def _unwrap(chunk):
    # The wrappers inherit MegatronModule's sharded_state_dict (which would prefix every key with
    # "module."), so the GPTModel itself must be saved and loaded.
    from fipo_megatron.models.sharding import unwrap_model

    return unwrap_model(chunk)


def _model_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _sharded_state_dict(model_chunks: Sequence[torch.nn.Module], optimizer, metadata: dict, *, is_loading: bool):
    state: dict[str, Any] = {}
    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
        state[key] = _unwrap(chunk).sharded_state_dict(metadata=dict(metadata))
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=dict(metadata))
    return state


def _stop_writer_manager() -> None:
    """Stop the multiprocessing Manager megatron-core's torch_dist writer caches on the first save.

    ``filesystem_async`` keeps ``Manager().Queue()`` (a spawned server process) in a module global and
    never shuts it down; the process outlived every training run and test. The next save starts a new one.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    queue = getattr(filesystem_async, "_results_queue", None)
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
        filesystem_async._results_queue = None


def _save_strategy(groups):
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    try:
        strategy = TorchDistSaveShardedStrategy()  # megatron-core >= 0.17: torch_dist is the only backend
    except TypeError:
        strategy = TorchDistSaveShardedStrategy("torch_dist", 1)  # 0.16 takes backend and version
    group = groups.dp_cp_group if groups is not None else None
    if group is not None and dist.get_world_size(group) > 1:
        # Spread the writing of DP-replicated tensors over the DP ranks (metadata exchange only: gloo-safe).
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def _load_strategy(groups):
    group = groups.dp_cp_group if groups is not None else None
    if not torch.cuda.is_available() or group is None or dist.get_world_size(group) == 1:
        return None  # the default torch_dist load strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    return FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(), group)


def _clone_views_and_release_params(state: dict, model_chunks: Sequence[torch.nn.Module]) -> None:
    """Give every view-backed shard its own memory, freeing each parameter once its views are copied.

    torch_dist clones, all at once, every shard that is a view of a larger storage (the SwiGLU
    ``linear_fc1`` halves: 40% of a Qwen2 model). Doing it here one parameter at a time and releasing
    the parameter keeps the peak at one model copy. The model is unusable afterwards.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(state)
    params = {p.untyped_storage().data_ptr(): p for c in model_chunks for p in _unwrap(c).parameters()}
    views: dict[int, list] = {}
    for value in nested_values(state):
        if isinstance(value, ShardedTensor) and isinstance(value.data, torch.Tensor):
            t = value.data
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                views.setdefault(t.untyped_storage().data_ptr(), []).append(value)
    for ptr, shards in views.items():
        for sh in shards:
            sh.data = sh.data.clone()
        if ptr in params:
            params[ptr].data = torch.empty(0, dtype=params[ptr].dtype, device=params[ptr].device)


def _build_model_factories(state: dict, num_chunks: int) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Turn the model's sharded-tensor factories into their shards (views of the parameters) before loading.

    Megatron's load would otherwise ``torch.cat`` the two SwiGLU ``linear_fc1`` halves of every layer
    into new tensors and only then copy them into the parameters (+40% memory for a Qwen2 model at
    once); loading straight into the views needs no merge. Returns ``{model key: {name: [views]}}``.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, apply_factories

    views: dict[str, dict[str, list[torch.Tensor]]] = {}
    for key in _model_keys(num_chunks):
        names = [n for n, v in state[key].items() if isinstance(v, ShardedTensorFactory)]
        apply_factories(state[key])
        for name in names:
            built = state[key][name]
            built = built if isinstance(built, list) else [built]
            views.setdefault(key, {})[name] = [sh.data for sh in built]
    return views


def _broadcast_path(path: Path | None) -> Path:
    obj = [str(path) if path is not None else None]
    dist.broadcast_object_list(obj, src=0)
    return Path(obj[0])


def save_megatron_checkpoint(ckpt_dir: str | os.PathLike, model_chunks: Sequence[torch.nn.Module], *,
                             optimizer=None, extra_state: dict | None = None, consume_model: bool = False,
                             groups=None) -> Path:
    """Save ``model_chunks`` (and the Megatron ``optimizer``'s state) as a dist checkpoint, atomically.

    Collective: every rank calls it with its own chunks. ``extra_state`` (tensors and plain containers,
    as ``torch.load(weights_only=True)`` reads them: step counters, scheduler state) is taken from
    rank 0 and returned by :func:`load_megatron_checkpoint`.
    An existing ``ckpt_dir`` is replaced. Returns the final path. ``consume_model``: the caller drops the
    model after saving (offline conversion), so parameters may be freed while saving to lower the peak.
    ``groups`` (``parallel.topology.ParallelGroups``, optional): with DP x CP > 1 the writing of the
    tensors the DP x CP ranks hold alike is spread over them; without, every rank writes its own shards.
    """
    from megatron.core import dist_checkpointing

    final = Path(ckpt_dir).absolute()
    tmp = None
    if dist.get_rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    tmp = _broadcast_path(tmp)
    try:
        state = _sharded_state_dict(model_chunks, optimizer, _CONTENT_METADATA, is_loading=False)
        if consume_model:
            _clone_views_and_release_params(state, model_chunks)
        kwargs = {}
        if "content_metadata" in inspect.signature(dist_checkpointing.save).parameters:
            kwargs["content_metadata"] = dict(_CONTENT_METADATA)
        dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(groups), **kwargs)
        _stop_writer_manager()
        if dist.get_rank() == 0:
            torch.save(extra_state or {}, tmp / EXTRA_STATE_FILE)
            info = {"format": "megatron_dist_ckpt", "num_model_chunks": len(model_chunks),
                    "has_optimizer": optimizer is not None}
            (tmp / FORMAT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        dist.barrier()
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.get_rank() == 0:
        old = None
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved Megatron checkpoint %s", final)
    dist.barrier()
    return final


def load_megatron_checkpoint(ckpt_dir: str | os.PathLike, model_chunks: Sequence[torch.nn.Module], *,
                             optimizer=None, strict: bool = True, groups=None) -> dict:
    """Load a dist checkpoint into ``model_chunks`` (any layout) and optionally ``optimizer``; return extra_state.

    Collective. ``strict``: every model tensor must be in the checkpoint (ValueError naming the absent
    ones); absent ``_extra_state`` objects are tolerated. The checkpoint may hold more than is
    requested (e.g. optimizer state when ``optimizer`` is None).
    Tensors are cast to each parameter's dtype (a bf16 checkpoint loads into fp32 parameters).
    ``groups`` (optional, as in :func:`save_megatron_checkpoint`): on CUDA with DP x CP > 1 those ranks
    share the reading and exchange the tensors (Megatron's fully-parallel load).
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"not a Megatron dist checkpoint (no metadata.json): {ckpt_dir}")
    check_checkpoint_safe(ckpt_dir)  # before megatron-core unpickles anything in it
    metadata = dict(_CONTENT_METADATA)
    if hasattr(dist_checkpointing, "load_content_metadata"):  # megatron-core >= 0.14
        metadata.update(dist_checkpointing.load_content_metadata(str(ckpt_dir)) or {})
    if optimizer is not None:
        info_path = ckpt_dir / FORMAT_FILE
        if info_path.is_file() and not json.loads(info_path.read_text()).get("has_optimizer", True):
            raise ValueError(f"checkpoint {ckpt_dir} holds no optimizer state (it was saved without an optimizer)")
    from megatron.core.dist_checkpointing.validation import StrictHandling

    state = _sharded_state_dict(model_chunks, optimizer, metadata, is_loading=True)
    in_place = _build_model_factories(state, len(model_chunks)) if optimizer is None else {}
    # RETURN_ALL drops requested keys the checkpoint lacks instead of failing inside torch DCP; we then
    # fail for any real tensor but tolerate absent ``_extra_state`` objects (FP8 / TE module metadata),
    # so a checkpoint written by the local spec (e.g. the offline converter) loads into a TE model.
    loaded, _, absent = dist_checkpointing.load(state, str(ckpt_dir), sharded_strategy=_load_strategy(groups),
                                                strict=StrictHandling.RETURN_ALL)
    absent_tensors = sorted(k for k in absent if not k.endswith("_extra_state"))
    if absent_tensors and strict:
        raise ValueError(f"checkpoint {ckpt_dir} lacks {len(absent_tensors)} tensors this model needs, "
                         f"e.g. {absent_tensors[:5]}")
    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
        for name, views in in_place.get(key, {}).items():
            for view, tensor in zip(views, loaded[key].pop(name, [])):
                if tensor.data_ptr() != view.data_ptr():  # a strategy that loaded into new memory
                    with torch.no_grad():
                        view.copy_(tensor)
        result = _unwrap(chunk).load_state_dict(loaded[key], strict=False)
        done = in_place.get(key, {})
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state") and k not in done]
        if strict and (missing or result.unexpected_keys):
            raise ValueError(f"loading {ckpt_dir} into {key}: missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return load_extra_state(ckpt_dir)
