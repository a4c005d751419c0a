"""The small shim that lets megatron-core run on CPU over gloo (tests, the CPU demo). No-op on CUDA.

megatron-core assumes a GPU in a few places that are not about the math. Found on 0.16.1, checked in the
megatron-core main source (0.20.0.dev), and run with 0.19.2 (Python 3.12, CUDA hidden) on the GPU box; a patch whose target a version lacks is
skipped (debug log), never guessed. Each redirect and what it serves:

1. ``torch.cuda.current_device()`` / ``device="cuda"`` factories / ``torch.cuda.synchronize()``: the p2p
   shape exchange and sync (``pipeline_parallel.p2p_communication``), the schedules' token counter,
   layer and collective buffers (``tensor_parallel.layers/mappings/utils``, ``transformer.*``), RoPE's
   ``inv_freq`` move (``rotary_pos_embedding``), DDP's grad buffers (``distributed.param_and_grad_buffer``),
   the optimizer's found-inf / scale tensors and grad-norm buffers (``optimizer.*``), the global memory
   buffer (``megatron.core.utils``), and (megatron-core >= 0.19) the ``torch.cuda.current_stream()`` that
   DDP's ``start_grad_sync`` asks for before every gradient reduction. Those modules (:data:`_PROXIED_MODULES`) get a module-local ``torch``
   proxy mapping "cuda" to CPU; the real ``torch`` module is not modified.
2. The CUDA RNG tracker (``tensor_parallel.random``: ``model_parallel_cuda_manual_seed``, every
   ``get_cuda_rng_tracker().fork()``): replaced by the same tracker over CPU generator states.
3. ``rope_utils.get_pos_emb_on_this_cp_rank`` (padded input under CP) builds its index with ``.cuda()``:
   replaced by the same zig-zag selection on the tensor's own device.
4. ``LanguageModule.setup_embeddings_and_output_layer`` (tied embeddings under PP) calls
   ``weight.data.cuda()`` before syncing the last stage's embedding copy: ``Tensor.cuda`` is the identity
   for the duration of that one call.
5. ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``: the optimizer
   gets the same in-place scaling by ``max_norm / (norm + 1e-6)`` without the assert.

GPU-only by design and not shimmed: the distributed optimizer and sequence parallelism (rejected on CPU
by ``parallel.topology``), fused kernels (off in the CPU model config).
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

from fipo_megatron.log import get_logger

logger = get_logger(__name__)
_ACTIVE = False
_PROXIED_MODULES = tuple(f"megatron.core.{m}" for m in (
    "pipeline_parallel.p2p_communication", "pipeline_parallel.schedules",
    "tensor_parallel.layers", "tensor_parallel.mappings", "tensor_parallel.utils",
    "transformer.attention", "transformer.module", "transformer.transformer_layer", "transformer.utils",
    "models.gpt.gpt_model", "models.common.embeddings.rotary_pos_embedding",
    "distributed.distributed_data_parallel", "distributed.param_and_grad_buffer", "distributed.finalize_model_grads",
    "optimizer.optimizer", "optimizer.distrib_optimizer", "optimizer.grad_scaler", "optimizer.clip_grads", "utils",
    # dist_checkpointing's torch_dist save: torch.cuda.synchronize() after the (no-op) D2H copy, and a
    # failure flag allocated on torch.cuda.current_device() (reached from checkpoint/dist_ckpt.py).
    "dist_checkpointing.strategies.filesystem_async", "dist_checkpointing.strategies.state_dict_saver",
))


def _cpu(device):
    return torch.device("cpu") if isinstance(device, int) or str(device).startswith("cuda") else device


class _CpuStream:
    """What ``torch.cuda.current_stream()`` returns on CPU: work is already in order, so waits are no-ops."""

    def wait_event(self, event):
        return None

    def wait_stream(self, stream):
        return None

    def synchronize(self):
        return None


class _CudaOnCpu:
    """``torch.cuda`` inside a proxied module: current device is the CPU; synchronize and streams no-ops."""

    current_device = staticmethod(lambda: torch.device("cpu"))
    synchronize = staticmethod(lambda device=None: None)
    current_stream = staticmethod(lambda device=None: _CpuStream())

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """A ``torch`` look-alike whose tensor factories send ``device="cuda"`` to the CPU."""

    _FACTORIES = frozenset({"empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand"})

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr
        return lambda *args, device=None, **kwargs: attr(*args, device=_cpu(device), **kwargs)


def _cpu_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """Megatron's tracker (same bookkeeping) over CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_ or name in self.states_:
                raise Exception(f"rng state {name} / seed {seed} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def _get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """Chunks ``r`` and ``2cp-1-r`` of ``pos_emb`` along ``seq_dim`` (Megatron's function, device-agnostic)."""
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def _tensor_cuda_is_identity(fn):
    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    wrapper.__wrapped__ = fn
    return wrapper


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's clip without its CUDA tensor-type assert (same scale factor, applied in place)."""
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for p in parameters:
            grad = getattr(p, "decoupled_grad" if use_decoupled_grad else "grad", None)
            if grad is not None:
                grad.detach().mul_(clip_coeff)


def _patch(module_name: str, attr: str, make):
    """Set ``module.attr = make(module.attr)``; skip (debug log) if this megatron-core lacks it."""
    try:
        module = importlib.import_module(module_name)
        setattr(module, attr, make(getattr(module, attr)))
    except (ImportError, AttributeError) as err:
        logger.debug("cpu_compat: skipped %s.%s (%s)", module_name, attr, err)


def cpu_compat_active() -> bool:
    """Whether :func:`apply_cpu_compat` has patched megatron-core in this process."""
    return _ACTIVE


def apply_cpu_compat() -> bool:
    """Patch megatron-core to run on CPU/gloo; idempotent, and a no-op when CUDA is available.

    Returns whether the shim is active. ``parallel.initialize_parallel`` calls it.
    """
    global _ACTIVE
    if _ACTIVE or torch.cuda.is_available():
        return _ACTIVE
    proxy = _TorchOnCpu()
    for name in _PROXIED_MODULES:
        _patch(name, "torch", lambda _: proxy)

    random = "megatron.core.tensor_parallel.random"
    tracker = _cpu_tracker_class()()
    _patch(random, "_CUDA_RNG_STATE_TRACKER", lambda _: tracker)
    _patch(random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", lambda _: True)
    # model_parallel_cuda_manual_seed re-creates the tracker through initialize_rng_tracker: keep ours.
    # Its torch.cuda.manual_seed(seed) is queued lazily and never runs without CUDA; the default stream
    # is torch's CPU generator, which parallel.initialize_parallel seeds.
    _patch(random, "initialize_rng_tracker", lambda _: lambda *args, **kwargs: None)

    embeddings = "megatron.core.models.common.embeddings"
    _patch(f"{embeddings}.rope_utils", "get_pos_emb_on_this_cp_rank", lambda _: _get_pos_emb_on_this_cp_rank)
    _patch(f"{embeddings}.rotary_pos_embedding", "get_pos_emb_on_this_cp_rank", lambda _: _get_pos_emb_on_this_cp_rank)
    _patch("megatron.core.models.common.language_module.language_module", "LanguageModule",
           lambda cls: _wrap_method(cls, "setup_embeddings_and_output_layer", _tensor_cuda_is_identity))
    _patch("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", lambda _: _clip_grad_by_total_norm_fp32)
    _ACTIVE = True
    logger.info("cpu_compat: megatron-core patched for CPU/gloo")
    return True


def _wrap_method(cls, name, wrap):
    setattr(cls, name, wrap(getattr(cls, name)))
    return cls
