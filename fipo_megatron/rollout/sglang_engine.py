"""SGLang rollout engines: colocated in-process ``sglang.Engine`` and a disaggregated HTTP server.

Written against sglang 0.5.23 (the ``sglang`` extra pins it), ``python/sglang/srt/entrypoints/engine.py``:
``Engine.generate(input_ids=, sampling_params=, return_logprob=)`` (``sampling_params`` one dict or one per
request), ``update_weights_from_tensor(named_tensors, load_format=None, flush_cache=True)`` -> ``(success,
message)`` (the Engine serialises the tensors once per engine TP rank itself, with
``MultiprocessingSerializer``: CUDA tensors travel as CUDA IPC handles, so pass tensors that live on this GPU
and keep them alive until the call returns), ``flush_cache()`` -> ``FlushCacheReqOutput(success, ...)``,
``release_memory_occupation`` / ``resume_memory_occupation`` (need ``enable_memory_saver=True``; they return
None and raise on failure), and the HTTP routes of the same names in ``entrypoints/http_server.py``, which
answer ``{"success", "message"}`` with HTTP 400 on failure (``/flush_cache``: plain text, 400 on failure).
Every call that reports success is checked (``_check_result``): a refused weight update raises
``WeightSyncError`` instead of leaving the engine on stale weights.

One ``sglang.Engine`` per process: ``sglang/srt/runtime_context.py`` keeps one process-wide published config
("A process holds at most one live config ... last-publish-wins"), which the tokenizer manager reads on every
call, and every Engine made on one thread shares that thread's asyncio loop (``Engine._ensure_event_loop``),
so a second Engine in the process silently runs on the first one's settings and two threads driving them
collide in ``loop.run_until_complete``. ``num_engines > 1`` is refused at start-up (``_sglang_replica``) and a
second live Engine in the process at construction; several engines run as several SGLang servers
(``sglang_server`` with ``base_urls``) or one per node (``rollout.placement=per_node``).

Sampling seeds: SGLang honours ``sampling_seed`` only when the engine runs with
``enable_deterministic_inference`` (``sglang/srt/sampling/sampling_batch_info.py``: without it the seed
tensor is None and sampling draws from the device's global generator). Each request still gets its own seed
(``rollout.sampling.request_seeds``), so turning determinism on cannot make the ``n`` samples of a prompt
copies of one response; without it a run's rollouts are not reproducible, whatever the seed.

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
from fipo_megatron.rollout.http_client import EngineRequestError, RetryPolicy, request_json
from fipo_megatron.rollout.multi import MultiEngine
from fipo_megatron.rollout.sampling import request_seeds
from fipo_megatron.weights.transport import WeightSyncError

logger = get_logger(__name__)


def _import_sglang():
    try:
        import sglang
    except ImportError as e:
        raise ImportError("the SGLang rollout engine needs SGLang: pip install fipo_megatron[sglang]") from e
    return sglang


def sglang_sampling_params(sampling: SamplingParams, *, seed: int | None = None) -> dict[str, Any]:
    """SGLang ``sampling_params`` of one request (one response; ``n`` is expanded into separate requests by the
    caller). ``seed``: this request's ``sampling_seed`` (``request_seeds``), never the call's own seed."""
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
    if seed is not None:
        params["sampling_seed"] = seed
    return params


def expand_prompts(prompt_token_ids: list[list[int]], n: int) -> tuple[list[list[int]], list[int]]:
    """Each prompt repeated ``n`` times (grouped), with the prompt index of every request."""
    expanded = [list(p) for p in prompt_token_ids for _ in range(n)]
    index = [i for i in range(len(prompt_token_ids)) for _ in range(n)]
    return expanded, index


def generate_payload(prompt_token_ids: list[list[int]], sampling: SamplingParams) -> dict[str, Any]:
    """The body of ``POST /generate`` (and the kwargs of ``Engine.generate``) for a batch of prompts: one
    ``sampling_params`` dict per request, each with its own seed (``GenerateReqInput.sampling_params`` takes a
    list as long as ``input_ids``)."""
    expanded, _ = expand_prompts(prompt_token_ids, sampling.n)
    seeds = request_seeds(sampling.seed, len(expanded))
    return {"input_ids": expanded, "sampling_params": [sglang_sampling_params(sampling, seed=s) for s in seeds],
            "return_logprob": True}


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
    """SGLang's answer to a batch of requests (a list, or one object for one request) -> one ``RolloutOutput``
    per request, ``index[k]`` the prompt of request ``k``; RuntimeError when the counts differ."""
    items = response if isinstance(response, list) else [response]
    if len(items) != len(index):
        raise RuntimeError(f"SGLang returned {len(items)} outputs for {len(index)} requests")
    return [parse_sglang_output(item, prompt_index=i) for item, i in zip(items, index)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SGLangEngineConfig:
    """Colocated engine settings (forwarded to ``sglang.Engine``, i.e. ``ServerArgs``; ``extra`` for anything
    else). ``enable_deterministic_inference``: SGLang's switch that makes it honour the per-request sampling
    seeds (slower kernels); off, rollouts are not reproducible."""

    model_path: str
    tp_size: int = 1
    mem_fraction_static: float = 0.5
    dtype: str = "bfloat16"
    base_gpu_id: int = 0
    random_seed: int = 0
    enable_memory_saver: bool = True
    enable_deterministic_inference: bool = False
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.tp_size < 1:
            raise ValueError(f"SGLangEngineConfig.tp_size must be >= 1, got {self.tp_size}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"SGLangEngineConfig.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        # TokenizerManager.update_weights_from_tensor asserts dp_size == 1 ("data-parallel replicas are not
        # supported for update weights from tensor", managers/tokenizer_control_mixin.py, sglang 0.5.23).
        if self.extra.get("dp_size", 1) != 1:
            raise ValueError(f"rollout.engine_kwargs.dp_size={self.extra['dp_size']}: a colocated SGLang engine "
                             "receives weights with update_weights_from_tensor, which SGLang supports only with "
                             "dp_size=1; run several SGLang servers (engine: sglang_server, base_urls) instead")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``sglang.Engine(...)`` (the fields of ``sglang.srt.server_args.ServerArgs``)."""
        return {"model_path": self.model_path, "tp_size": self.tp_size,
                "mem_fraction_static": self.mem_fraction_static, "dtype": self.dtype,
                "base_gpu_id": self.base_gpu_id, "random_seed": self.random_seed,
                "enable_memory_saver": self.enable_memory_saver,
                "enable_deterministic_inference": self.enable_deterministic_inference,
                "skip_tokenizer_init": True, **self.extra}


def _check_result(result: Any, what: str, error: type[Exception] = RuntimeError) -> None:
    """Raise ``error`` if an SGLang call reported failure: a ``(success, message)`` tuple (``Engine.
    update_weights_from_tensor``), an object with ``success``/``message`` (``FlushCacheReqOutput``) or an HTTP
    answer ``{"success": ..., "message": ...}``. ``None`` is how ``release/resume_memory_occupation`` and some
    routes answer success (their failures raise)."""
    if result is None or isinstance(result, str):
        return
    if isinstance(result, tuple) and len(result) >= 1 and isinstance(result[0], bool):
        success, message = result[0], (result[1] if len(result) > 1 else "")
    elif isinstance(result, dict) and "success" in result:
        success, message = result["success"], result.get("message")
    elif hasattr(result, "success"):
        success, message = result.success, getattr(result, "message", "")
    else:
        return
    if success is not True:
        raise error(f"SGLang {what} failed: {message or '(no message)'}")


class SGLangEngine(RolloutEngine):
    """``RolloutEngine`` over a colocated in-process ``sglang.Engine`` (weights via CUDA IPC); at most one
    per process (see the module docstring)."""

    _live: "SGLangEngine | None" = None  # the process's one live engine

    def __init__(self, *, config: SGLangEngineConfig | None = None, **kwargs):
        self.config = config or SGLangEngineConfig(**kwargs)
        if SGLangEngine._live is not None:
            raise RuntimeError(
                "a second sglang.Engine in one process: SGLang keeps one process-wide runtime config (the last "
                "engine launched wins) and one asyncio loop per thread, so two engines here would run on one "
                "engine's settings. Use one engine per process: rollout.placement=per_node (one engine on each "
                "node's first rank) or SGLang servers (engine: sglang_server, base_urls)")
        sglang = _import_sglang()
        self.engine = sglang.Engine(**self.config.engine_kwargs())
        SGLangEngine._live = self

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        """``Engine.generate`` of one request per response (``generate_payload``: each with its own seed)."""
        _, index = expand_prompts(prompt_token_ids, sampling.n)
        return parse_generate_response(self.engine.generate(**generate_payload(prompt_token_ids, sampling)), index)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """``update_weights_from_tensor`` of one bucket without a cache flush (``finish_weight_update`` flushes
        once per sync); ``WeightSyncError`` when SGLang refuses it."""
        # A name or shape the model does not know comes back as (False, message) from the scheduler, not as
        # an exception.
        result = self.engine.update_weights_from_tensor(named_tensors=named_tensors, flush_cache=False)
        _check_result(result, f"update_weights_from_tensor ({len(named_tensors)} tensors, first "
                              f"{named_tensors[0][0] if named_tensors else None!r})", WeightSyncError)

    def finish_weight_update(self) -> None:
        """Flush SGLang's prefix cache (KV of the old weights); ``WeightSyncError`` when it reports failure."""
        _check_result(self.engine.flush_cache(), "flush_cache after the weight update", WeightSyncError)

    def release_memory(self) -> None:
        """``release_memory_occupation`` (needs ``enable_memory_saver``, on by default in the config)."""
        _check_result(self.engine.release_memory_occupation(), "release_memory_occupation")

    def resume_memory(self) -> None:
        """``resume_memory_occupation``."""
        _check_result(self.engine.resume_memory_occupation(), "resume_memory_occupation")

    def shutdown(self) -> None:
        """Stop the ``sglang.Engine`` and its processes; the process may then build another engine."""
        try:
            self.engine.shutdown()
        finally:
            if SGLangEngine._live is self:
                SGLangEngine._live = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightSyncConfig:
    """Where servers join the trainer's weight-sync group (``rollout.engine_kwargs.weight_sync``).

    One group holds the exporting rank (global rank 0, group rank 0) and every server's GPU workers
    (server ``i`` from ``rank_offset = 1 + sum of the earlier servers' sizes``), so one broadcast per tensor
    reaches all servers.

    ``master_address``: an address of the exporting rank that the servers can reach; default
    ``$MASTER_ADDR`` (torchrun sets it to rank 0's host), else this host's name. ``master_port``: a free port
    there. ``engine_world_size``: a server's ``tp_size``; one number for all servers, or a list with one per
    server.

    What SGLang supports (sglang 0.5.23): its workers join at ``rank_offset + tp_rank``
    (``model_executor/model_runner_components/weight_updater.py``), so a server with ``pp_size > 1`` would put
    two workers on one rank, and ``TokenizerManager.init_weights_update_group`` asserts ``dp_size == 1``
    (``managers/tokenizer_control_mixin.py``). ``connect_weight_sync`` therefore reads each server's
    ``/server_info`` first and refuses ``dp_size != 1``, ``pp_size != 1`` or a ``tp_size`` other than
    ``engine_world_size``, naming the setting, before anyone waits in the rendezvous. For more engine data
    parallelism, run more servers (``base_urls``).
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
        """The ``engine_world_size`` of each of ``num_servers`` servers; ValueError for a list of another length."""
        if not isinstance(self.engine_world_size, list):
            return [self.engine_world_size] * num_servers
        if len(self.engine_world_size) != num_servers:
            raise ValueError(f"weight_sync.engine_world_size lists {len(self.engine_world_size)} sizes for "
                             f"{num_servers} servers")
        return list(self.engine_world_size)

    def address(self) -> str:
        """``master_address``, else ``$MASTER_ADDR``, else this host's fully qualified name."""
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


def check_weight_sync_layout(server_info: dict, *, base_url: str, engine_world_size: int) -> None:
    """ValueError unless a server (its ``/server_info`` answer: ``ServerArgs.resolved_dict()`` plus scheduler
    state) can join the weight-sync group with ``engine_world_size`` workers (see ``WeightSyncConfig``)."""
    for key in ("dp_size", "pp_size"):
        value = server_info.get(key, 1)
        if value not in (1, None):
            raise ValueError(
                f"SGLang server {base_url} runs with {key}={value}; SGLang's weight update from a process group "
                f"supports only {key}=1 (its workers join at rank_offset + tp_rank, and it asserts dp_size == 1). "
                "Launch each server with one data-parallel replica and no pipeline, and list several servers in "
                "rollout.engine_kwargs.base_urls for more replicas")
    tp_size = server_info.get("tp_size")
    if tp_size is not None and tp_size != engine_world_size:
        raise ValueError(f"rollout.engine_kwargs.weight_sync.engine_world_size={engine_world_size} for SGLang "
                         f"server {base_url}, whose tp_size is {tp_size}: they must be equal")


def join_weight_group(servers: list["SGLangServerEngine"], *, master_address: str, master_port: int,
                      engine_world_sizes: list[int], group_name: str, backend: str = "nccl"):
    """Create the group of the exporting rank (rank 0) and the servers' workers; call on that rank only.

    Each server's layout is checked first (``check_weight_sync_layout`` on its ``/server_info``), then each
    is asked (``/init_weights_update_group``, concurrently) to join at its rank offset while this rank joins
    the same rendezvous; a refusal raises naming the server."""
    import threading

    from fipo_megatron.weights.nccl_transport import init_weight_update_group

    for server, size in zip(servers, engine_world_sizes):
        info = server.server_info()
        if not isinstance(info, dict):
            raise RuntimeError(f"SGLang server {server.base_url} answered /server_info with {info!r}")
        check_weight_sync_layout(info, base_url=server.base_url, engine_world_size=size)

    world_size = 1 + sum(engine_world_sizes)
    offsets = [1 + sum(engine_world_sizes[:i]) for i in range(len(servers))]
    errors: list[BaseException] = []

    def ask(server, offset):
        payload = {"master_address": master_address, "master_port": master_port, "rank_offset": offset,
                   "world_size": world_size, "group_name": group_name, "backend": backend}
        try:
            _check_success(server._post("/init_weights_update_group", payload, retry=_no_retry(server.retry)),
                           "/init_weights_update_group")
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

    def server_info(self) -> Any:
        """``GET /server_info``: the server's resolved ``ServerArgs`` (``tp_size``, ``dp_size``, ...)."""
        return request_json(f"{self.base_url}/server_info", None, method="GET", policy=self.retry)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        """``POST /generate`` of one request per response, retried under the client's ``RetryPolicy``."""
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
        _check_success(self._post_weights("/update_weights_from_distributed", payload),
                       f"{self.base_url}/update_weights_from_distributed", WeightSyncError)

    def _post_weights(self, route: str, payload: Any = None) -> Any:
        # Never retried (the broadcasts that go with a bucket cannot be replayed); SGLang answers a refusal
        # with HTTP 400 and {"success": false, "message": ...}, which is a failed weight sync.
        try:
            return self._post(route, payload, retry=_no_retry(self.retry))
        except EngineRequestError as e:
            raise WeightSyncError(f"SGLang server {self.base_url} refused {route}: {e}") from e

    def weight_transport(self, *, device=None):
        """The transport that carries buckets to this server (after ``init_weight_sync``)."""
        from fipo_megatron.weights.nccl_transport import NcclBroadcastTransport

        if self.group is None:
            raise RuntimeError("call init_weight_sync(...) before syncing weights to an SGLang server")
        return NcclBroadcastTransport(group=self.group, announce=self.announce_bucket,
                                      on_finish=self.finish_weight_update, device=device)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Unsupported (NotImplementedError): buckets reach a server through ``weight_transport``."""
        raise NotImplementedError("SGLangServerEngine receives weights through weight_transport() "
                                  "(process-group broadcast), not update_weights")

    def finish_weight_update(self) -> None:
        """``POST /flush_cache`` once after the last bucket, never retried; ``WeightSyncError`` if refused."""
        # /flush_cache answers plain text: 200 on success, 400 with the reason otherwise.
        self._post_weights("/flush_cache")

    def release_memory(self) -> None:
        """``POST /release_memory_occupation``."""
        _check_success(self._post("/release_memory_occupation"), f"{self.base_url}/release_memory_occupation")

    def resume_memory(self) -> None:
        """``POST /resume_memory_occupation``."""
        _check_success(self._post("/resume_memory_occupation"), f"{self.base_url}/resume_memory_occupation")

    def shutdown(self) -> None:
        """Forget the weight-sync group; the server keeps running."""
        # The server was started by someone else (a launcher script); it is not ours to stop.
        self.group = None


def _no_retry(policy: RetryPolicy) -> RetryPolicy:
    return dataclasses.replace(policy, max_retries=0)


def _check_success(answer: Any, what: str = "request", error: type[Exception] = RuntimeError) -> None:
    # SGLang answers {"success": bool, "message": str} to weight-management requests (null on success for
    # the memory routes).
    _check_result(answer, what, error)


def _sglang_replica(kwargs: dict, i: int) -> dict:
    """Refuses ``num_engines > 1`` before any engine starts: several ``sglang.Engine`` in one process share one
    process-wide runtime config (see the module docstring)."""
    raise ValueError(
        "rollout.engine_kwargs.num_engines > 1 with engine 'sglang': SGLang supports one sglang.Engine per "
        "process (one process-wide runtime config, last launch wins). Use one engine per process instead: "
        "rollout.placement=per_node (an engine on every node's first rank) with num_engines: 1, or SGLang "
        "servers (engine: sglang_server, base_urls: [...])")


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
        """Join one weight-sync group spanning every server (``join_weight_group``); on the exporting rank."""
        ws = _require_weight_sync(self.weight_sync)
        self.group = join_weight_group(self.engines, master_address=ws.address(), master_port=ws.master_port,
                                       engine_world_sizes=ws.world_sizes(len(self.engines)),
                                       group_name=self.engines[0].group_name, backend=ws.backend)
        return self.group

    def announce_bucket(self, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> None:
        """``SGLangServerEngine.announce_bucket`` on every server, concurrently: each answers only once the
        bucket's broadcasts have landed, so they must all be waiting before the first broadcast."""
        self._on_all("announce_bucket", names, dtypes, shapes)

    def weight_transport(self, *, device=None):
        """One ``NcclBroadcastTransport`` over the group of every server (after ``connect_weight_sync``)."""
        from fipo_megatron.weights.nccl_transport import NcclBroadcastTransport

        if self.group is None:
            raise RuntimeError("call connect_weight_sync() before syncing weights to SGLang servers")
        return NcclBroadcastTransport(group=self.group, announce=self.announce_bucket,
                                      on_finish=self.finish_weight_update, device=device)


def _require_weight_sync(weight_sync):
    if weight_sync is None:
        raise ValueError("rollout.engine_kwargs.weight_sync is not set; an SGLang server needs master_port and "
                         "engine_world_size (its tp_size) to join the trainer's weight-sync group")
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
