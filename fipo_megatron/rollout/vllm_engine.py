"""vLLM rollout engine over the offline ``vllm.LLM`` (colocated; engine TP independent of the trainer's).

Built against vllm-project/vllm main: ``vllm/entrypoints/llm.py`` (``LLM.generate`` with ``TokensPrompt``,
``LLM.collective_rpc(method, args=...)`` which also accepts a function ``fn(worker, *args)`` run on every
worker, ``LLM.sleep(level=1)`` / ``LLM.wake_up()``, ``LLM.reset_prefix_cache()``), the V1 GPU worker
(``vllm/v1/worker/gpu_worker.py``: ``worker.model_runner.model``) and every vLLM model's
``load_weights(weights: Iterable[tuple[str, Tensor]])``, which takes HF-named full tensors and shards
them for the engine's own TP. Older V0 vLLM reached the model at
``llm.llm_engine.model_executor.driver_worker.model_runner.model``; that path is the fallback.

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

logger = get_logger(__name__)


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vLLM rollout engine needs vLLM: pip install fipo_megatron[vllm]") from e
    return vllm


def vllm_sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request (``n`` expanded by the caller)."""
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
    if sampling.seed is not None:
        kwargs["seed"] = sampling.seed
    return kwargs


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


def _load_weights_on_worker(worker, payload):
    """Runs inside each vLLM worker (via ``collective_rpc``): rebuild the bucket and load it."""
    from fipo_megatron.weights.transport import rebuild_from_ipc

    kind, items = payload
    named = rebuild_from_ipc(items) if kind == "ipc" else items
    worker.model_runner.model.load_weights(weights=named)
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
                "logprobs_mode": "processed_logprobs", **self.extra}


class VLLMEngine(RolloutEngine):
    """``RolloutEngine`` over ``vllm.LLM``; weights loaded on every worker with ``collective_rpc``."""

    def __init__(self, *, config: VLLMEngineConfig | None = None, **kwargs):
        self.config = config or VLLMEngineConfig(**kwargs)
        vllm = _import_vllm()
        self._vllm = vllm
        self.llm = vllm.LLM(**self.config.llm_kwargs())

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        from vllm.inputs import TokensPrompt

        prompts, index = [], []
        for i, p in enumerate(prompt_token_ids):
            for _ in range(sampling.n):
                prompts.append(TokensPrompt(prompt_token_ids=list(p)))
                index.append(i)
        params = self._vllm.SamplingParams(**vllm_sampling_kwargs(sampling))
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [parse_vllm_output(o, prompt_index=i) for o, i in zip(outputs, index)]

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        if torch.cuda.is_available() and all(t.is_cuda for _, t in named_tensors):
            from torch.multiprocessing.reductions import reduce_tensor

            alive = [(n, t.detach().contiguous()) for n, t in named_tensors]  # alive until the rpc returns
            torch.cuda.current_stream().synchronize()
            payload = ("ipc", [(n, reduce_tensor(t)) for n, t in alive])
        else:
            payload = ("tensors", [(n, t.detach().cpu()) for n, t in named_tensors])
        if hasattr(self.llm, "collective_rpc"):
            self.llm.collective_rpc(_load_weights_on_worker, args=(payload,))
        else:  # V0 in-process engine
            model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            model.load_weights(weights=named_tensors)

    def finish_weight_update(self) -> None:
        self.llm.reset_prefix_cache()

    def release_memory(self) -> None:
        self.llm.sleep(level=1)

    def resume_memory(self) -> None:
        self.llm.wake_up()

    def shutdown(self) -> None:
        del self.llm


@register_engine("vllm")
def _make_vllm(**kwargs):
    return VLLMEngine(**kwargs)
