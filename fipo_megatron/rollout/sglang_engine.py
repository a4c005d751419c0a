"""SGLang rollout engines: colocated in-process ``sglang.Engine`` and a disaggregated HTTP server.

Built against sgl-project/sglang main (commit 001067f), ``python/sglang/srt/entrypoints/engine.py``:
``Engine.generate(input_ids=, sampling_params=, return_logprob=)``, ``update_weights_from_tensor(
named_tensors, load_format=None, flush_cache=True)`` (the Engine serialises the tensors once per engine TP
rank itself, with ``MultiprocessingSerializer``: CUDA tensors travel as CUDA IPC handles, so pass tensors
that live on this GPU and keep them alive until the call returns), ``release_memory_occupation`` /
``resume_memory_occupation`` (need ``enable_memory_saver=True``), ``init_weights_update_group`` /
``update_weights_from_distributed(names, dtypes, shapes, group_name, flush_cache)``, and the HTTP routes
of the same names in ``entrypoints/http_server.py``.

Engine TP (``tp_size``) is independent of the trainer's TP/PP: the engine always receives full tensors
and shards them with its own loader.

Log-probs: SGLang's ``output_token_logprobs`` are ``log(softmax(logits / T))`` of the sampled token
(``layers/sampler.py``: log of the temperature-scaled probabilities, taken before top-k/top-p), i.e. the
convention of ``rollout/base.py``; temperature 0 is greedy with log-probs of ``log_softmax(logits)``.

Never run against a real SGLang in this repository's CI (no GPU there): the payloads and parsing are
unit-tested, the HTTP client against a local fake server; see docs/rollout.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fipo_megatron.log import get_logger
from fipo_megatron.rollout.base import RolloutEngine, RolloutOutput, SamplingParams, register_engine
from fipo_megatron.rollout.http_client import RetryPolicy, request_json
from fipo_megatron.rollout.multi import MultiEngine

logger = get_logger(__name__)


def _import_sglang():
    try:
        import sglang
    except ImportError as e:
        raise ImportError("the SGLang rollout engine needs SGLang: pip install fipo_megatron[sglang]") from e
    return sglang


def sglang_sampling_params(sampling: SamplingParams) -> dict[str, Any]:
    """SGLang ``sampling_params`` for one response (``n`` is expanded into separate requests by the caller)."""
    params: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,  # -1 = off, SGLang's own convention
        "max_new_tokens": sampling.max_new_tokens,
        "skip_special_tokens": False,
        "no_stop_trim": True,  # keep the stop token in the output, like the embedded engine
    }
    if sampling.stop_token_ids:
        params["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed
    return params


def expand_prompts(prompt_token_ids: list[list[int]], n: int) -> tuple[list[list[int]], list[int]]:
    """Each prompt repeated ``n`` times (grouped), with the prompt index of every request."""
    expanded = [list(p) for p in prompt_token_ids for _ in range(n)]
    index = [i for i in range(len(prompt_token_ids)) for _ in range(n)]
    return expanded, index


def generate_payload(prompt_token_ids: list[list[int]], sampling: SamplingParams) -> dict[str, Any]:
    """The body of ``POST /generate`` (and the kwargs of ``Engine.generate``) for a batch of prompts."""
    expanded, _ = expand_prompts(prompt_token_ids, sampling.n)
    return {"input_ids": expanded, "sampling_params": sglang_sampling_params(sampling), "return_logprob": True}


def parse_sglang_output(item: dict[str, Any], *, prompt_index: int) -> RolloutOutput:
    """One SGLang answer -> RolloutOutput. ``meta_info.output_token_logprobs`` is a list of
    ``(logprob, token_id, text_or_None)``; ``meta_info.finish_reason.type`` is "stop" | "length" | "abort"."""
    meta = item["meta_info"]
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind not in ("stop", "length"):
        raise RuntimeError(f"SGLang request for prompt {prompt_index} ended with {finish!r}")
    entries = meta.get("output_token_logprobs") or []
    token_ids = [int(e[1]) for e in entries]
    if "output_ids" in item and list(item["output_ids"]) != token_ids:
        raise RuntimeError(f"SGLang output_ids and output_token_logprobs disagree for prompt {prompt_index}")
    return RolloutOutput(token_ids=token_ids, log_probs=[float(e[0]) for e in entries],
                         finish_reason=kind, prompt_index=prompt_index)


def parse_generate_response(response: Any, index: list[int]) -> list[RolloutOutput]:
    items = response if isinstance(response, list) else [response]
    if len(items) != len(index):
        raise RuntimeError(f"SGLang returned {len(items)} outputs for {len(index)} requests")
    return [parse_sglang_output(item, prompt_index=i) for item, i in zip(items, index)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SGLangEngineConfig:
    """Colocated engine settings (forwarded to ``sglang.Engine``; ``extra`` for anything else)."""

    model_path: str
    tp_size: int = 1
    mem_fraction_static: float = 0.5
    dtype: str = "bfloat16"
    base_gpu_id: int = 0
    random_seed: int = 0
    enable_memory_saver: bool = True
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.tp_size < 1:
            raise ValueError(f"SGLangEngineConfig.tp_size must be >= 1, got {self.tp_size}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"SGLangEngineConfig.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``sglang.Engine(...)``."""
        return {"model_path": self.model_path, "tp_size": self.tp_size,
                "mem_fraction_static": self.mem_fraction_static, "dtype": self.dtype,
                "base_gpu_id": self.base_gpu_id, "random_seed": self.random_seed,
                "enable_memory_saver": self.enable_memory_saver, "skip_tokenizer_init": True, **self.extra}


class SGLangEngine(RolloutEngine):
    """``RolloutEngine`` over a colocated in-process ``sglang.Engine`` (weights via CUDA IPC)."""

    def __init__(self, *, config: SGLangEngineConfig | None = None, **kwargs):
        self.config = config or SGLangEngineConfig(**kwargs)
        sglang = _import_sglang()
        self.engine = sglang.Engine(**self.config.engine_kwargs())

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        _, index = expand_prompts(prompt_token_ids, sampling.n)
        return parse_generate_response(self.engine.generate(**generate_payload(prompt_token_ids, sampling)), index)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        # One call per bucket; the prefix cache is flushed once, in finish_weight_update.
        self.engine.update_weights_from_tensor(named_tensors=named_tensors, flush_cache=False)

    def finish_weight_update(self) -> None:
        flush = getattr(self.engine, "flush_cache", None)
        if flush is not None:
            flush()

    def release_memory(self) -> None:
        self.engine.release_memory_occupation()

    def resume_memory(self) -> None:
        self.engine.resume_memory_occupation()

    def shutdown(self) -> None:
        self.engine.shutdown()


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightSyncConfig:
    """Where servers join the trainer's weight-sync group (``rollout.engine_kwargs.weight_sync``).

    One group holds the exporting rank (global rank 0, group rank 0) and every server's GPU workers
    (server ``i`` from ``rank_offset = 1 + sum of the earlier servers' sizes``), so one broadcast per tensor
    reaches all servers.

    ``master_address``: an address of the exporting rank that the servers can reach; default
    ``$MASTER_ADDR`` (torchrun sets it to rank 0's host), else this host's name. ``master_port``: a free port
    there. ``engine_world_size``: a server's GPU worker count (its tp_size x dp_size); one number for all
    servers, or a list with one per server.
    """

    master_port: int
    engine_world_size: int | list[int]
    master_address: str | None = None
    backend: str = "nccl"

    def __post_init__(self):
        if not 0 < self.master_port < 65536:
            raise ValueError(f"weight_sync.master_port must be a port number, got {self.master_port}")
        sizes = self.engine_world_size if isinstance(self.engine_world_size, list) else [self.engine_world_size]
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"weight_sync.engine_world_size must be an integer >= 1 or a list of them, "
                             f"got {self.engine_world_size!r}")

    def world_sizes(self, num_servers: int) -> list[int]:
        if not isinstance(self.engine_world_size, list):
            return [self.engine_world_size] * num_servers
        if len(self.engine_world_size) != num_servers:
            raise ValueError(f"weight_sync.engine_world_size lists {len(self.engine_world_size)} sizes for "
                             f"{num_servers} servers")
        return list(self.engine_world_size)

    def address(self) -> str:
        import os
        import socket

        return self.master_address or os.environ.get("MASTER_ADDR") or socket.getfqdn()

    @classmethod
    def parse(cls, value: "WeightSyncConfig | dict | None") -> "WeightSyncConfig | None":
        """From the config's mapping through the config loader: unknown, missing or mistyped keys are a
        ValueError naming ``rollout.engine_kwargs.weight_sync.<key>``."""
        if value is None or isinstance(value, cls):
            return value
        from fipo_megatron.config_loader import build_dataclass

        return build_dataclass(cls, value, prefix="rollout.engine_kwargs.weight_sync")


def join_weight_group(servers: list["SGLangServerEngine"], *, master_address: str, master_port: int,
                      engine_world_sizes: list[int], group_name: str, backend: str = "nccl"):
    """Create the group of the exporting rank (rank 0) and the servers' workers; call on that rank only.

    Each server is asked (``/init_weights_update_group``, concurrently) to join at its rank offset while this
    rank joins the same rendezvous; a refusal raises naming the server."""
    import threading

    from fipo_megatron.weights.nccl_transport import init_weight_update_group

    world_size = 1 + sum(engine_world_sizes)
    offsets = [1 + sum(engine_world_sizes[:i]) for i in range(len(servers))]
    errors: list[BaseException] = []

    def ask(server, offset):
        payload = {"master_address": master_address, "master_port": master_port, "rank_offset": offset,
                   "world_size": world_size, "group_name": group_name, "backend": backend}
        try:
            _check_success(server._post("/init_weights_update_group", payload, retry=_no_retry(server.retry)))
        except BaseException as e:
            errors.append(RuntimeError(f"SGLang server {server.base_url} did not join the weight-sync group: {e!r}"))

    threads = [threading.Thread(target=ask, args=(srv, off), daemon=True) for srv, off in zip(servers, offsets)]
    for thread in threads:
        thread.start()  # each server joins the rendezvous while handling its request
    logger.info("weight sync: group of %d ranks at %s:%d (%s): trainer + %s", world_size, master_address,
                master_port, backend, ", ".join(f"{srv.base_url} x{n}" for srv, n in zip(servers, engine_world_sizes)))
    group = init_weight_update_group(master_address=master_address, master_port=master_port, rank=0,
                                     world_size=world_size, group_name=group_name, backend=backend)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return group


class SGLangServerEngine(RolloutEngine):
    """``RolloutEngine`` over a running SGLang HTTP server (disaggregated: other GPUs or nodes).

    Generation is ``POST /generate``. Weights go over a process group shared with the server
    (``connect_weight_sync``/``init_weight_sync``, then buckets through
    ``weights.nccl_transport.NcclBroadcastTransport``); ``update_weights`` itself is unsupported here
    because the tensors do not travel over HTTP. The trainer calls ``connect_weight_sync()`` once, on the
    rank that builds the engine, with the ``weight_sync`` settings given here.
    """

    def __init__(self, *, base_url: str, retry: RetryPolicy = RetryPolicy(), group_name: str = "fipo_weight_sync",
                 weight_sync: WeightSyncConfig | dict | None = None, model_path: str | None = None):
        # model_path is accepted (and unused) so get_engine(name, model_path=...) works for every engine:
        # the server was launched with its model already.
        del model_path
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.group_name = group_name
        self.weight_sync = WeightSyncConfig.parse(weight_sync)
        self.group = None

    def connect_weight_sync(self):
        """Join this server's weight-sync group with the configured settings (once, before the first sync)."""
        ws = _require_weight_sync(self.weight_sync)
        return self.init_weight_sync(master_address=ws.address(), master_port=ws.master_port,
                                     engine_world_size=ws.world_sizes(1)[0], backend=ws.backend)

    def _post(self, route: str, payload: Any = None, *, retry: RetryPolicy | None = None) -> Any:
        return request_json(f"{self.base_url}{route}", payload if payload is not None else {},
                            policy=retry or self.retry)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        _, index = expand_prompts(prompt_token_ids, sampling.n)
        return parse_generate_response(self._post("/generate", generate_payload(prompt_token_ids, sampling)), index)

    def init_weight_sync(self, *, master_address: str, master_port: int, engine_world_size: int,
                         backend: str = "nccl"):
        """Create the trainer(rank 0) + engine(ranks 1..N) group; call on the exporting rank only."""
        self.group = join_weight_group([self], master_address=master_address, master_port=master_port,
                                       engine_world_sizes=[engine_world_size], group_name=self.group_name,
                                       backend=backend)
        return self.group

    def announce_bucket(self, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> None:
        """``POST /update_weights_from_distributed`` for one bucket (never retried: the broadcasts that
        go with it cannot be replayed)."""
        payload = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": self.group_name,
                   "flush_cache": False}
        _check_success(self._post("/update_weights_from_distributed", payload, retry=_no_retry(self.retry)))

    def weight_transport(self, *, device=None):
        """The transport that carries buckets to this server (after ``init_weight_sync``)."""
        from fipo_megatron.weights.nccl_transport import NcclBroadcastTransport

        if self.group is None:
            raise RuntimeError("call init_weight_sync(...) before syncing weights to an SGLang server")
        return NcclBroadcastTransport(group=self.group, announce=self.announce_bucket,
                                      on_finish=self.finish_weight_update, device=device)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError("SGLangServerEngine receives weights through weight_transport() "
                                  "(process-group broadcast), not update_weights")

    def finish_weight_update(self) -> None:
        self._post("/flush_cache")

    def release_memory(self) -> None:
        self._post("/release_memory_occupation")

    def resume_memory(self) -> None:
        self._post("/resume_memory_occupation")

    def shutdown(self) -> None:
        # The server was started by someone else (a launcher script); it is not ours to stop.
        self.group = None


def _no_retry(policy: RetryPolicy) -> RetryPolicy:
    return dataclasses.replace(policy, max_retries=0)


def _check_success(answer: Any) -> None:
    # SGLang answers {"success": bool, "message": str} to weight-management requests.
    if isinstance(answer, dict) and answer.get("success") is False:
        raise RuntimeError(f"SGLang refused the request: {answer.get('message')}")


def _sglang_replica(kwargs: dict, i: int) -> dict:
    """Replica ``i`` of a colocated engine takes the next ``tp_size`` GPUs of the node and its own seed."""
    config = kwargs.pop("config", None) or SGLangEngineConfig(**kwargs)
    return {"config": dataclasses.replace(config, base_gpu_id=config.base_gpu_id + i * config.tp_size,
                                          random_seed=config.random_seed + i)}


@register_engine("sglang", replica_kwargs=_sglang_replica)
def _make_sglang(**kwargs):
    return SGLangEngine(**kwargs)


class SGLangServerPool(MultiEngine):
    """Several SGLang servers as one engine: generation is split across them (``MultiEngine``), and weights
    travel over one group spanning all of them (``join_weight_group``): per bucket every server is told the
    names (concurrently), then one broadcast per tensor reaches them all."""

    def __init__(self, servers: list[SGLangServerEngine], *, weight_sync: WeightSyncConfig | None = None):
        super().__init__(servers)
        self.weight_sync = weight_sync
        self.group = None

    def connect_weight_sync(self):
        ws = _require_weight_sync(self.weight_sync)
        self.group = join_weight_group(self.engines, master_address=ws.address(), master_port=ws.master_port,
                                       engine_world_sizes=ws.world_sizes(len(self.engines)),
                                       group_name=self.engines[0].group_name, backend=ws.backend)
        return self.group

    def announce_bucket(self, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> None:
        self._on_all("announce_bucket", names, dtypes, shapes)

    def weight_transport(self, *, device=None):
        from fipo_megatron.weights.nccl_transport import NcclBroadcastTransport

        if self.group is None:
            raise RuntimeError("call connect_weight_sync() before syncing weights to SGLang servers")
        return NcclBroadcastTransport(group=self.group, announce=self.announce_bucket,
                                      on_finish=self.finish_weight_update, device=device)


def _require_weight_sync(weight_sync):
    if weight_sync is None:
        raise ValueError("rollout.engine_kwargs.weight_sync is not set; an SGLang server needs master_port and "
                         "engine_world_size (its tp_size x dp_size) to join the trainer's weight-sync group")
    return weight_sync


@register_engine("sglang_server")
def _make_sglang_server(*, base_url: str | None = None, base_urls: list[str] | None = None,
                        weight_sync: dict | WeightSyncConfig | None = None, **kwargs):
    """One server (``base_url``) or several (``base_urls``: engine data parallelism over one weight group)."""
    if (base_url is None) == (not base_urls):
        raise ValueError("sglang_server needs exactly one of base_url (one server) or base_urls (a list of servers)")
    colocated_only = sorted(set(kwargs) & {f.name for f in dataclasses.fields(SGLangEngineConfig)} - {"model_path"})
    if colocated_only:
        raise ValueError(f"sglang_server does not take {colocated_only}: those configure the colocated 'sglang' "
                         "engine (a server is launched with its own settings)")
    weight_sync = WeightSyncConfig.parse(weight_sync)
    if base_url is not None:
        return SGLangServerEngine(base_url=base_url, weight_sync=weight_sync, **kwargs)
    if weight_sync is not None:
        weight_sync.world_sizes(len(base_urls))  # a size list of the wrong length fails here, not at start-up
    return SGLangServerPool([SGLangServerEngine(base_url=url, **kwargs) for url in base_urls], weight_sync=weight_sync)
