"""vLLM rollout engine over the offline ``vllm.LLM`` (colocated; engine TP independent of the trainer's).

Written against vllm 0.32.0 (the ``vllm`` extra pins it): ``vllm/entrypoints/llm.py`` (``LLM.generate`` with
``TokensPrompt`` and one ``SamplingParams`` per prompt, ``LLM.collective_rpc(method, args=...)``,
``LLM.sleep(level=1)``, ``LLM.wake_up() -> bool``, ``LLM.reset_prefix_cache() -> bool``), the V1 GPU worker
(``vllm/v1/worker/gpu_worker.py``: ``worker.model_runner.model``) and every vLLM model's
``load_weights(weights: Iterable[tuple[str, Tensor]])``, which takes HF-named full tensors and shards them
for the engine's own TP.

Weight sync. ``LLM`` runs the engine core in a child process by default and ``collective_rpc`` reaches it as
a utility call ``(client, call_id, "collective_rpc", (method, timeout, args, kwargs))`` encoded with
``vllm/v1/serial_utils.py``'s ``MsgpackEncoder`` and decoded there with an untyped ``MsgpackDecoder``. Without
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` that codec refuses functions and arbitrary objects (``enc_hook``:
TypeError), and an untyped decode turns a tensor into its ``[dtype, shape, buffer]`` header, not a tensor.
So nothing but msgpack-native values crosses: the worker method is registered by name through vLLM's
``worker_extension_cls`` (``WeightLoaderExtension``, mixed into every worker by
``vllm/v1/worker/worker_base.py``), and a bucket travels as plain dicts of CUDA IPC handle fields
(``ipc_handle``) or of raw bytes (CPU tensors). No pickle is involved, in the caller or the engine core, and
no environment variable has to reach the engine-core process. Each worker returns how many tensors it
loaded; any other count raises ``WeightSyncError``.

Sampling seeds: vLLM seeds one generator per request, so the ``n`` requests of a prompt each get their own
seed (``rollout.sampling.request_seeds``), as vLLM's own ``n`` fan-out gives child ``i`` ``seed + i``.

Log-probs: vLLM returns raw (pre-temperature) log-probs by default; this engine is created with
``logprobs_mode="processed_logprobs"`` so they are taken after temperature (and after top-k/top-p
masking: with top-k/top-p off, as in the FIPO recipes, that is exactly ``log_softmax(logits / T)``, the
convention of ``rollout/base.py``; with them on, vLLM renormalises over the kept tokens).

Never run against a real vLLM in this repository's CI; see docs/rollout.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fipo_megatron.log import get_logger
from fipo_megatron.rollout.base import RolloutEngine, RolloutOutput, SamplingParams, register_engine
from fipo_megatron.rollout.sampling import request_seeds
from fipo_megatron.weights.transport import WeightSyncError

logger = get_logger(__name__)


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vLLM rollout engine needs vLLM: pip install fipo_megatron[vllm]") from e
    return vllm


def vllm_sampling_kwargs(sampling: SamplingParams, *, seed: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request (``n`` expanded by the caller). ``seed``:
    this request's seed (``request_seeds``), never the call's own seed."""
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,  # -1 disables top-k in vLLM too
        "max_tokens": sampling.max_new_tokens,
        "logprobs": 0,  # the sampled token's log-prob only
        "detokenize": False,
        "skip_special_tokens": False,
    }
    if sampling.stop_token_ids:
        kwargs["stop_token_ids"] = list(sampling.stop_token_ids)
    if seed is not None:
        kwargs["seed"] = seed
    return kwargs


def vllm_requests(prompt_token_ids: list[list[int]], sampling: SamplingParams
                  ) -> tuple[list[list[int]], list[dict[str, Any]], list[int]]:
    """The requests of one call: prompt token ids, ``SamplingParams`` keyword arguments and prompt index of
    each (``n`` per prompt, grouped), every request with its own seed."""
    prompts = [list(p) for p in prompt_token_ids for _ in range(sampling.n)]
    index = [i for i in range(len(prompt_token_ids)) for _ in range(sampling.n)]
    seeds = request_seeds(sampling.seed, len(prompts))
    return prompts, [vllm_sampling_kwargs(sampling, seed=s) for s in seeds], index


def parse_vllm_output(request_output: Any, *, prompt_index: int) -> RolloutOutput:
    """A ``vllm.RequestOutput`` (one completion) -> RolloutOutput. ``completion.logprobs[t]`` maps token
    id -> ``Logprob`` and always contains the sampled token."""
    completion = request_output.outputs[0]
    token_ids = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned no per-token log-probs for prompt {prompt_index} (logprobs=0 not honoured)")
    log_probs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, token_ids)]
    reason = completion.finish_reason
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request for prompt {prompt_index} ended with {reason!r}")
    return RolloutOutput(token_ids=token_ids, log_probs=log_probs, finish_reason=reason, prompt_index=prompt_index)


WORKER_EXTENSION = "fipo_megatron.rollout.vllm_engine.WeightLoaderExtension"
LOAD_METHOD = "fipo_load_weights"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"unknown dtype {name!r} in a weight bucket")
    return dtype


def ipc_handle(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    """A CUDA tensor's IPC handle as msgpack-native fields (``torch.multiprocessing.reductions.reduce_tensor``'s
    arguments of ``rebuild_cuda_tensor``, torch 2.x), opened by ``open_bucket`` in a vLLM worker that sees the
    same devices (vLLM's multiprocess executor keeps the caller's ``CUDA_VISIBLE_DEVICES``)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, (tensor_cls, size, stride, offset, storage_cls, dtype, device, handle, storage_bytes, storage_offset,
        requires_grad, ref_handle, ref_offset, event_handle, event_sync) = reduce_tensor(tensor)
    if tensor_cls is not torch.Tensor or storage_cls is not torch.storage.TypedStorage:
        raise WeightSyncError(f"{name}: cannot describe a {tensor_cls.__name__} on {storage_cls.__name__} by IPC")
    return {"name": name, "kind": "ipc", "shape": list(size), "stride": list(stride), "offset": int(offset),
            "dtype": _dtype_name(dtype), "device": int(device), "handle": bytes(handle),
            "storage_bytes": int(storage_bytes), "storage_offset": int(storage_offset),
            "ref_handle": bytes(ref_handle), "ref_offset": int(ref_offset),
            "event_handle": bytes(event_handle) if event_handle is not None else None,
            "event_sync": bool(event_sync), "requires_grad": bool(requires_grad)}


def bytes_entry(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    """A CPU tensor as msgpack-native fields (its raw bytes)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return {"name": name, "kind": "bytes", "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype),
            "data": flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""}


def open_bucket(entries: list[dict[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a bucket made by ``ipc_handle`` / ``bytes_entry`` (in the receiving process)."""
    named = []
    for e in entries:
        dtype, shape = _dtype(e["dtype"]), torch.Size(e["shape"])
        if e["kind"] == "bytes":
            data = e["data"]
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            named.append((e["name"], raw.view(dtype).reshape(shape)))
        elif e["kind"] == "ipc":
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            named.append((e["name"], rebuild_cuda_tensor(
                torch.Tensor, shape, tuple(e["stride"]), e["offset"], torch.storage.TypedStorage, dtype,
                e["device"], e["handle"], e["storage_bytes"], e["storage_offset"], e["requires_grad"],
                e["ref_handle"], e["ref_offset"], e["event_handle"], e["event_sync"])))
        else:
            raise WeightSyncError(f"unknown weight entry kind {e['kind']!r} for {e.get('name')!r}")
    return named


class WeightLoaderExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``), so the weight load is a worker method called
    by name through ``collective_rpc`` instead of a pickled function."""

    def fipo_load_weights(self, entries: list[dict[str, Any]]) -> int:
        """In each vLLM worker: ``model.load_weights`` of the bucket ``open_bucket`` rebuilds; returns how many
        tensors it loaded."""
        named = open_bucket(entries)
        self.model_runner.model.load_weights(weights=named)
        if any(e["kind"] == "ipc" for e in entries):
            torch.cuda.synchronize()  # the copies out of the sender's memory are done before it may free it
        return len(named)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VLLMEngineConfig:
    """Settings forwarded to ``vllm.LLM`` (``extra`` for anything else)."""

    model_path: str
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    dtype: str = "bfloat16"
    seed: int = 0
    enable_sleep_mode: bool = True
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"VLLMEngineConfig.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization < 1.0:
            raise ValueError(f"VLLMEngineConfig.gpu_memory_utilization must be in (0, 1), got {self.gpu_memory_utilization}")

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM(...)``."""
        return {"model": self.model_path, "tensor_parallel_size": self.tensor_parallel_size,
                "gpu_memory_utilization": self.gpu_memory_utilization, "dtype": self.dtype, "seed": self.seed,
                "enable_sleep_mode": self.enable_sleep_mode, "skip_tokenizer_init": True,
                "logprobs_mode": "processed_logprobs", "worker_extension_cls": WORKER_EXTENSION, **self.extra}


class VLLMEngine(RolloutEngine):
    """``RolloutEngine`` over ``vllm.LLM``; weights loaded on every worker with ``collective_rpc``."""

    def __init__(self, *, config: VLLMEngineConfig | None = None, **kwargs):
        self.config = config or VLLMEngineConfig(**kwargs)
        vllm = _import_vllm()
        self._vllm = vllm
        self.llm = vllm.LLM(**self.config.llm_kwargs())

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        """``LLM.generate`` of one request per response (``vllm_requests``: each with its own seed)."""
        from vllm.inputs import TokensPrompt

        prompts, kwargs, index = vllm_requests(prompt_token_ids, sampling)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                    sampling_params=[self._vllm.SamplingParams(**k) for k in kwargs], use_tqdm=False)
        if len(outputs) != len(index):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(index)} requests")
        return [parse_vllm_output(o, prompt_index=i) for o, i in zip(outputs, index)]

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """The bucket to every worker by ``collective_rpc``: CUDA tensors as IPC handles, CPU ones as bytes
        (module docstring); ``WeightSyncError`` unless every worker loaded all of it."""
        if torch.cuda.is_available() and all(t.is_cuda for _, t in named_tensors):
            alive = [(n, t.detach().contiguous()) for n, t in named_tensors]  # alive until the rpc returns
            torch.cuda.current_stream().synchronize()
            entries = [ipc_handle(n, t) for n, t in alive]
        else:
            entries = [bytes_entry(n, t) for n, t in named_tensors]
        counts = self.llm.collective_rpc(LOAD_METHOD, args=(entries,))
        if not counts or any(c != len(entries) for c in counts):
            raise WeightSyncError(f"vLLM workers loaded {counts} tensors of a bucket of {len(entries)} "
                                  f"(first {entries[0]['name'] if entries else None!r})")

    def finish_weight_update(self) -> None:
        """Reset vLLM's prefix cache; ``WeightSyncError`` when vLLM reports it could not."""
        if self.llm.reset_prefix_cache() is False:
            raise WeightSyncError("vLLM did not reset its prefix cache after the weight update (requests still "
                                  "running?); cached prefixes would be served from the old weights")

    def release_memory(self) -> None:
        """``LLM.sleep(level=1)`` (needs ``enable_sleep_mode``, on by default in the config)."""
        self.llm.sleep(level=1)

    def resume_memory(self) -> None:
        """``LLM.wake_up()``; RuntimeError when vLLM reports it is not fully awake."""
        if self.llm.wake_up() is False:
            raise RuntimeError("vLLM wake_up() reported the engine not fully awake")

    def shutdown(self) -> None:
        """Drop this engine's ``vllm.LLM``."""
        del self.llm


@register_engine("vllm")
def _make_vllm(**kwargs):
    return VLLMEngine(**kwargs)
