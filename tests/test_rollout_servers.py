"""SGLang / vLLM adapters without SGLang or vLLM: request payloads, response parsing, the HTTP client's
retries and backoff against a fake server on 127.0.0.1, and the disaggregated weight-sync protocol
(``/init_weights_update_group`` + ``/update_weights_from_distributed`` + broadcasts) with a fake server
process that receives over gloo exactly as SGLang's server receives over NCCL.

None of this proves compatibility with a real SGLang/vLLM; docs/rollout.md says what has never run.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from fipo_megatron.rollout import sglang_engine, vllm_engine
from fipo_megatron.rollout.base import SamplingParams, get_engine, resolve_engine_name, shard_seed
from fipo_megatron.rollout.http_client import (EngineRequestError, EngineUnavailableError, RetryPolicy,
                                               request_json)
from fipo_megatron.rollout.mismatch import rollout_mismatch_metrics
from fipo_megatron.rollout.sampling import request_seeds

SAMPLING = SamplingParams(temperature=0.8, top_p=0.95, top_k=20, max_new_tokens=7, n=2, stop_token_ids=[5], seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _FakeServer:
    """A scripted JSON server: ``script[route]`` is a list of (status, body) answers, the last repeats."""

    def __init__(self, script, handler=None):
        self.script = {k: list(v) for k, v in script.items()}
        self.requests: list[tuple[str, object]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.loads(body) if body else None
                outer.requests.append((self.path, payload))
                if handler is not None and self.path in handler:
                    status, answer = 200, handler[self.path](payload)
                else:
                    answers = outer.script[self.path]
                    status, answer = answers.pop(0) if len(answers) > 1 else answers[0]
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _sglang_item(tokens, logps, finish="stop"):
    return {"output_ids": tokens, "meta_info": {"finish_reason": {"type": finish, "matched": 5},
                                                 "output_token_logprobs": [[lp, t, None] for t, lp in zip(tokens, logps)]}}


def test_sglang_payload_and_parsing():
    payload = sglang_engine.generate_payload([[1, 2], [3]], SAMPLING)
    seeds = request_seeds(3, 4)
    assert payload == {"input_ids": [[1, 2], [1, 2], [3], [3]], "return_logprob": True,
                       "sampling_params": [{"temperature": 0.8, "top_p": 0.95, "top_k": 20, "max_new_tokens": 7,
                                            "skip_special_tokens": False, "no_stop_trim": True,
                                            "stop_token_ids": [5], "sampling_seed": s} for s in seeds]}
    json.dumps(payload)  # plain JSON, no tensors
    out = sglang_engine.parse_sglang_output(_sglang_item([9, 5], [-0.5, -1.25]), prompt_index=1)
    assert (out.token_ids, out.log_probs, out.finish_reason, out.prompt_index) == ([9, 5], [-0.5, -1.25], "stop", 1)
    with pytest.raises(RuntimeError, match="abort"):
        sglang_engine.parse_sglang_output(_sglang_item([9], [-0.5], finish="abort"), prompt_index=0)
    bad = _sglang_item([9, 5], [-0.5, -1.0])
    bad["output_ids"] = [9, 6]
    with pytest.raises(RuntimeError, match="disagree"):
        sglang_engine.parse_sglang_output(bad, prompt_index=0)
    cfg = sglang_engine.SGLangEngineConfig(model_path="/m", tp_size=4)
    assert cfg.engine_kwargs()["tp_size"] == 4 and cfg.engine_kwargs()["enable_memory_saver"]
    with pytest.raises(ValueError, match="mem_fraction_static"):
        sglang_engine.SGLangEngineConfig(model_path="/m", mem_fraction_static=1.5)


def test_vllm_kwargs_and_parsing():
    prompts, requests, index = vllm_engine.vllm_requests([[1, 2], [3]], SAMPLING)
    assert prompts == [[1, 2], [1, 2], [3], [3]] and index == [0, 0, 1, 1]
    assert [k["seed"] for k in requests] == request_seeds(3, 4)
    kwargs = requests[0]
    assert kwargs["logprobs"] == 0 and kwargs["max_tokens"] == 7 and kwargs["n"] == 1
    assert kwargs["stop_token_ids"] == [5] and kwargs["top_k"] == 20
    step = lambda tok, lp: {tok: SimpleNamespace(logprob=lp), 999: SimpleNamespace(logprob=-9.0)}  # noqa: E731
    ro = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[4, 5], logprobs=[step(4, -0.1), step(5, -2.0)],
                                                  finish_reason="length")])
    out = vllm_engine.parse_vllm_output(ro, prompt_index=2)
    assert (out.token_ids, out.log_probs, out.finish_reason) == ([4, 5], [-0.1, -2.0], "length")
    ro.outputs[0].logprobs = None
    with pytest.raises(RuntimeError, match="log-probs"):
        vllm_engine.parse_vllm_output(ro, prompt_index=0)
    assert vllm_engine.VLLMEngineConfig(model_path="/m").llm_kwargs()["logprobs_mode"] == "processed_logprobs"


def test_missing_engines_say_which_extra_and_auto_falls_back():
    try:
        import sglang  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install fipo_megatron\[sglang\]"):
            get_engine("sglang", model_path="/nonexistent")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install fipo_megatron\[vllm\]"):
            get_engine("vllm", model_path="/nonexistent")
    if not torch.cuda.is_available():
        assert resolve_engine_name("auto") == "embedded"


def test_http_retries_with_backoff_then_succeeds_or_fails():
    server = _FakeServer({"/generate": [(503, {"error": "busy"}), (500, "crash"), (200, {"ok": 1})],
                          "/bad": [(400, {"error": "bad input_ids"})]})
    delays: list[float] = []
    policy = RetryPolicy(max_retries=3, backoff_s=0.5, max_backoff_s=0.75, timeout_s=5)
    try:
        assert request_json(server.url + "/generate", {"x": [1, 2]}, policy=policy, sleep=delays.append) == {"ok": 1}
        assert delays == [0.5, 0.75]  # 0.5 * 2**k, capped
        assert server.requests == [("/generate", {"x": [1, 2]})] * 3
        with pytest.raises(EngineRequestError, match="HTTP 400.*bad input_ids"):
            request_json(server.url + "/bad", {}, policy=policy, sleep=delays.append)
        assert len(delays) == 2  # 4xx is not retried
    finally:
        server.close()
    delays.clear()
    dead = f"http://127.0.0.1:{_free_port()}/generate"
    with pytest.raises(EngineUnavailableError, match="after 4 attempts"):
        request_json(dead, {}, policy=RetryPolicy(max_retries=3, backoff_s=0.01, timeout_s=2), sleep=delays.append)
    assert delays == [0.01, 0.02, 0.04]
    with pytest.raises(TypeError, match="JSON"):
        request_json(dead, {"t": torch.zeros(2)}, policy=policy)


def test_sglang_server_engine_generate_over_http():
    answers = [_sglang_item([7, 5], [-0.3, -0.7]), _sglang_item([8, 8, 8], [-1.0, -1.5, -2.0], "length"),
               _sglang_item([5], [-0.1]), _sglang_item([6, 5], [-0.2, -0.4])]
    server = _FakeServer({"/generate": [(200, answers)], "/flush_cache": [(200, "Cache flushed.")],
                          "/release_memory_occupation": [(200, {"success": True})]})
    try:
        engine = sglang_engine.SGLangServerEngine(base_url=server.url + "/", retry=RetryPolicy(max_retries=0))
        outs = engine.generate([[1, 2], [3]], SAMPLING)
        assert server.requests[0] == ("/generate", sglang_engine.generate_payload([[1, 2], [3]], SAMPLING))
        assert [o.prompt_index for o in outs] == [0, 0, 1, 1]
        assert outs[1].finish_reason == "length" and outs[1].log_probs == [-1.0, -1.5, -2.0]
        engine.finish_weight_update()
        engine.release_memory()
        assert [r[0] for r in server.requests[1:]] == ["/flush_cache", "/release_memory_occupation"]
        with pytest.raises(NotImplementedError, match="weight_transport"):
            engine.update_weights([])
    finally:
        server.close()


def _fake_sglang_server_process(port_queue, result_queue):
    """A stand-in SGLang server: joins the weight group when asked and receives each bucket by broadcast."""
    from fipo_megatron.weights.nccl_transport import init_weight_update_group

    state = {}

    def init_group(p):
        state["group"] = init_weight_update_group(master_address=p["master_address"], master_port=p["master_port"],
                                                  rank=p["rank_offset"], world_size=p["world_size"],
                                                  group_name=p["group_name"], backend=p["backend"])
        return {"success": True, "message": "ok"}

    def update(p):
        import torch.distributed as dist

        received = {}
        for name, dtype, shape in zip(p["names"], p["dtypes"], p["shapes"]):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.broadcast(t, src=0, group=state["group"])
            received[name] = t
        state.setdefault("received", {}).update(received)
        return {"success": True, "message": "ok"}

    def flush(p):
        result_queue.put({k: v.clone() for k, v in state["received"].items()})
        return "Cache flushed."

    server = _FakeServer({}, handler={"/server_info": lambda p: {"tp_size": 1, "dp_size": 1, "pp_size": 1},
                                      "/init_weights_update_group": init_group,
                                      "/update_weights_from_distributed": update, "/flush_cache": flush})
    port_queue.put(server.url)
    threading.Event().wait(60)


def _buckets():
    g = torch.Generator().manual_seed(0)
    return [[("model.embed_tokens.weight", torch.randn(16, 8, generator=g))],
            [("model.norm.weight", torch.randn(8, generator=g)),
             ("model.layers.0.mlp.up_proj.weight", torch.randn(4, 8, generator=g).to(torch.bfloat16))]]


def _send_buckets_and_report(done_queue, make_transport):
    """Send ``_buckets()`` through ``make_transport()``; put "ok" or the error on ``done_queue`` (a failure
    is reported to the parent instead of hanging it)."""
    try:
        transport = make_transport()
        for bucket in _buckets():
            transport.send(bucket)
        transport.finish()
        done_queue.put("ok")
    except BaseException as e:
        done_queue.put(repr(e))


def _trainer_process(url, port, done_queue):
    """The trainer's exporting rank: joins the group, then sends two buckets through the transport."""
    def make_transport():
        engine = sglang_engine.SGLangServerEngine(base_url=url, retry=RetryPolicy(max_retries=0, timeout_s=30))
        engine.init_weight_sync(master_address="127.0.0.1", master_port=port, engine_world_size=1, backend="gloo")
        assert type(engine.weight_transport()).__name__ == "NcclBroadcastTransport"
        return engine.weight_transport(device="cpu")

    _send_buckets_and_report(done_queue, make_transport)


@pytest.mark.timeout(90)
def test_disaggregated_weight_sync_protocol_over_gloo():
    # Both sides run in forked processes: the parent never creates a process group (a group left in the
    # pytest process would be inherited, half-dead, by later run_distributed children).
    ctx = mp.get_context("fork")
    port_q, result_q, done_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    server = ctx.Process(target=_fake_sglang_server_process, args=(port_q, result_q), daemon=True)
    server.start()
    trainer = None
    try:
        url = port_q.get(timeout=30)
        trainer = ctx.Process(target=_trainer_process, args=(url, _free_port(), done_q), daemon=True)
        trainer.start()
        assert done_q.get(timeout=60) == "ok"
        received = result_q.get(timeout=30)
        sent = {n: t for b in _buckets() for n, t in b}
        assert set(received) == set(sent)
        for name, tensor in sent.items():
            assert received[name].dtype == tensor.dtype
            torch.testing.assert_close(received[name], tensor, rtol=0, atol=0)
    finally:
        for proc in (trainer, server):
            if proc is not None:
                proc.kill()
                proc.join()


def test_mismatch_metrics_against_float64_reference():
    actor = [torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([-0.1])]
    engine = [[-0.4, -1.3, -2.0], None, ]
    with pytest.raises(ValueError, match="responses"):
        rollout_mismatch_metrics(actor_log_probs=actor, rollout_log_probs=engine[:1])
    m = rollout_mismatch_metrics(actor_log_probs=actor, rollout_log_probs=engine)
    diffs = [(-0.5) - (-0.4), (-1.0) - (-1.3), 0.0]
    assert m["rollout/logprob_abs_diff_mean"] == pytest.approx(sum(abs(d) for d in diffs) / 3, abs=1e-7)
    assert m["rollout/logprob_abs_diff_max"] == pytest.approx(0.3, abs=1e-7)
    assert m["rollout/logprob_diff_mean"] == pytest.approx(sum(diffs) / 3, abs=1e-7)
    assert m["rollout/num_logprob_tokens"] == 3.0
    with pytest.raises(ValueError, match="response 0"):
        rollout_mismatch_metrics(actor_log_probs=actor[:1], rollout_log_probs=[[-0.1]])


def _multi_trainer_process(urls, port, done_queue):
    """The exporting rank with two servers: the config's factory, connect_weight_sync, one group for both."""
    from fipo_megatron.weights.nccl_transport import NcclBroadcastTransport
    def make_transport():
        engine = get_engine("sglang_server", base_urls=urls, retry=RetryPolicy(max_retries=0, timeout_s=30),
                            weight_sync={"master_port": port, "engine_world_size": 1, "master_address": "127.0.0.1",
                                         "backend": "gloo"})
        assert isinstance(engine, sglang_engine.SGLangServerPool) and len(engine) == 2
        group = engine.connect_weight_sync()  # what build.build_engine does on the engine's rank
        assert group.size() == 3  # trainer + one worker per server: one broadcast reaches both
        transport = engine.weight_transport()
        assert isinstance(transport, NcclBroadcastTransport)
        return transport

    _send_buckets_and_report(done_queue, make_transport)


@pytest.mark.timeout(120)
def test_two_servers_get_every_bucket_over_one_group():
    ctx = mp.get_context("fork")
    port_qs, result_qs, done_q = [ctx.Queue(), ctx.Queue()], [ctx.Queue(), ctx.Queue()], ctx.Queue()
    servers = [ctx.Process(target=_fake_sglang_server_process, args=(pq, rq), daemon=True)
               for pq, rq in zip(port_qs, result_qs)]
    for s in servers:
        s.start()
    trainer = None
    try:
        urls = [q.get(timeout=30) for q in port_qs]
        trainer = ctx.Process(target=_multi_trainer_process, args=(urls, _free_port(), done_q), daemon=True)
        trainer.start()
        assert done_q.get(timeout=90) == "ok"
        sent = {n: t for b in _buckets() for n, t in b}
        for rq in result_qs:
            received = rq.get(timeout=30)
            assert set(received) == set(sent)
            for name, tensor in sent.items():
                assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
    finally:
        for proc in [trainer, *servers]:
            if proc is not None:
                proc.kill()
                proc.join()


def test_two_servers_split_generation_and_config_errors():
    a = _FakeServer({"/generate": [(200, [_sglang_item([7, 5], [-0.3, -0.7]), _sglang_item([8], [-1.0], "length"),
                                           _sglang_item([5], [-0.1]), _sglang_item([6, 5], [-0.2, -0.4])])]})
    b = _FakeServer({"/generate": [(200, [_sglang_item([9], [-0.5]), _sglang_item([9, 9], [-0.6, -0.8], "length")])]})
    try:
        engine = get_engine("sglang_server", base_urls=[a.url, b.url], retry=RetryPolicy(max_retries=0))
        outs = engine.generate([[1, 2], [3], [4, 4]], SAMPLING)  # n=2: prompts 0, 1 -> a; prompt 2 -> b
        second_seed = dataclasses.replace(SAMPLING, seed=shard_seed(3, "engine", 1))
        assert a.requests[0] == ("/generate", sglang_engine.generate_payload([[1, 2], [3]], SAMPLING))
        assert b.requests[0] == ("/generate", sglang_engine.generate_payload([[4, 4]], second_seed))
        assert [o.prompt_index for o in outs] == [0, 0, 1, 1, 2, 2]
        assert [o.token_ids for o in outs[4:]] == [[9], [9, 9]]
        with pytest.raises(ValueError, match="weight_sync is not set"):
            engine.connect_weight_sync()
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError, match="exactly one of base_url"):
        get_engine("sglang_server", base_url="http://x", base_urls=["http://y"])
    with pytest.raises(ValueError, match="exactly one of base_url"):
        get_engine("sglang_server")
    with pytest.raises(ValueError, match=r"does not take \['mem_fraction_static', 'tp_size'\]"):
        get_engine("sglang_server", base_url="http://x", tp_size=8, mem_fraction_static=0.5)
    with pytest.raises(ValueError, match="engine_world_size"):
        get_engine("sglang_server", base_url="http://x", weight_sync={"master_port": 1234, "engine_world_size": 0})
    with pytest.raises(ValueError, match="lists 3 sizes for 2 servers"):
        get_engine("sglang_server", base_urls=["http://x", "http://y"],
                   weight_sync={"master_port": 1234, "engine_world_size": [1, 2, 4]})
    with pytest.raises(ValueError, match=r"unknown config key\(s\): rollout\.engine_kwargs\.weight_sync\.port;"):
        get_engine("sglang_server", base_url="http://x", weight_sync={"port": 1234, "engine_world_size": 1})
    with pytest.raises(ValueError, match=r"rollout\.engine_kwargs\.weight_sync: .*missing .*'engine_world_size'"):
        get_engine("sglang_server", base_url="http://x", weight_sync={"master_port": 1234})
    with pytest.raises(ValueError, match=r"rollout\.engine_kwargs\.weight_sync\.master_port: expected an int"):
        get_engine("sglang_server", base_url="http://x", weight_sync={"master_port": "29600", "engine_world_size": 1})
    sizes = sglang_engine.WeightSyncConfig(master_port=1234, engine_world_size=[2, 4]).world_sizes(2)
    assert sizes == [2, 4]


# ---------------------------------------------------------------- engine calls that report failure by value
class _RecordingSGLangEngine:
    """Stands in for ``sglang.Engine`` only (the GPU object); answers as sglang 0.5.23's Engine does."""

    def __init__(self, answers=None, **kwargs):
        self.kwargs, self.answers, self.calls = kwargs, dict(answers or {}), []

    def _answer(self, name, default):
        self.calls.append(name)
        return self.answers.get(name, default)

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        return self._answer("update_weights_from_tensor", (True, "Succeeded to update model weights."))

    def flush_cache(self):
        return self._answer("flush_cache", SimpleNamespace(success=True, message=""))

    def release_memory_occupation(self, tags=None):
        return self._answer("release_memory_occupation", None)

    def resume_memory_occupation(self, tags=None):
        return self._answer("resume_memory_occupation", None)

    def shutdown(self):
        self.calls.append("shutdown")


def _colocated_sglang(monkeypatch, answers):
    made = []

    def engine(**kwargs):
        made.append(_RecordingSGLangEngine(answers, **kwargs))
        return made[-1]

    monkeypatch.setattr(sglang_engine, "_import_sglang", lambda: SimpleNamespace(Engine=engine))
    return made


def test_sglang_colocated_refused_weight_update_raises(monkeypatch):
    from fipo_megatron.weights.transport import WeightSyncError

    _colocated_sglang(monkeypatch, {"update_weights_from_tensor": (False, "Unknown weight name model.x.weight")})
    engine = sglang_engine.SGLangEngine(model_path="/m")
    try:
        with pytest.raises(WeightSyncError, match="Unknown weight name model.x.weight"):
            engine.update_weights([("model.x.weight", torch.zeros(2))])
    finally:
        engine.shutdown()
    _colocated_sglang(monkeypatch, {"flush_cache": SimpleNamespace(success=False, message="requests running")})
    engine = sglang_engine.SGLangEngine(model_path="/m")
    try:
        engine.update_weights([("model.x.weight", torch.zeros(2))])  # (True, ...) passes
        with pytest.raises(WeightSyncError, match="flush_cache.*requests running"):
            engine.finish_weight_update()
        engine.release_memory()  # None is success for the memory calls
        engine.resume_memory()
    finally:
        engine.shutdown()


def test_sglang_server_refusals_raise_weight_sync_error():
    from fipo_megatron.weights.transport import WeightSyncError

    refused = {"success": False, "message": "Failed to update weights: shape mismatch"}
    server = _FakeServer({"/update_weights_from_distributed": [(400, refused)],
                          "/flush_cache": [(400, "Flush cache failed.")],
                          "/release_memory_occupation": [(200, {"success": False, "message": "no memory saver"})]})
    try:
        engine = sglang_engine.SGLangServerEngine(base_url=server.url, retry=RetryPolicy(max_retries=0))
        with pytest.raises(WeightSyncError, match="shape mismatch"):
            engine.announce_bucket(["w"], ["float32"], [[2]])
        with pytest.raises(WeightSyncError, match="Flush cache failed"):
            engine.finish_weight_update()
        with pytest.raises(RuntimeError, match="no memory saver"):
            engine.release_memory()
    finally:
        server.close()


def test_sglang_server_layout_checked_before_the_rendezvous():
    # dp_size > 1 (SGLang asserts dp_size == 1) and pp_size > 1 (workers join at rank_offset + tp_rank) are
    # refused naming the setting, before this rank waits in a rendezvous a worker short.
    for info, match in [({"tp_size": 4, "dp_size": 2, "pp_size": 1}, "dp_size=2"),
                        ({"tp_size": 4, "dp_size": 1, "pp_size": 2}, "pp_size=2"),
                        ({"tp_size": 4, "dp_size": 1, "pp_size": 1}, r"engine_world_size=8 .* tp_size is 4")]:
        server = _FakeServer({"/server_info": [(200, info)], "/init_weights_update_group": [(200, {"success": True})]})
        try:
            engine = get_engine("sglang_server", base_url=server.url, retry=RetryPolicy(max_retries=0),
                                weight_sync={"master_port": _free_port(), "engine_world_size": 8,
                                             "master_address": "127.0.0.1", "backend": "gloo"})
            with pytest.raises(ValueError, match=match):
                engine.connect_weight_sync()
            assert [r[0] for r in server.requests] == ["/server_info"]  # never asked to join
        finally:
            server.close()


def test_two_colocated_sglang_engines_in_one_process_refused(monkeypatch):
    made = _colocated_sglang(monkeypatch, {})
    with pytest.raises(ValueError, match="num_engines > 1 .*placement=per_node"):
        get_engine("sglang", model_path="/m", tp_size=4, num_engines=2)
    assert made == []  # refused before any engine started
    first = sglang_engine.SGLangEngine(model_path="/m")
    try:
        with pytest.raises(RuntimeError, match="second sglang.Engine in one process"):
            sglang_engine.SGLangEngine(model_path="/m", base_gpu_id=4)
        assert len(made) == 1
    finally:
        first.shutdown()
    sglang_engine.SGLangEngine(model_path="/m").shutdown()  # after shutdown a new one may start
    with pytest.raises(ValueError, match="dp_size=2"):
        sglang_engine.SGLangEngineConfig(model_path="/m", extra={"dp_size": 2})


def test_request_seeds_reproducible_and_distinct_per_sample():
    seeds = request_seeds(7, 64)
    assert seeds == request_seeds(7, 64) and len(set(seeds)) == 64
    assert all(0 <= s < 2**62 for s in seeds)
    assert seeds[1] - seeds[0] == 1 or seeds[1] == 0  # consecutive, like vLLM's seed + i fan-out
    assert not set(seeds) & set(request_seeds(8, 64))  # the next generation batch's seeds do not overlap
    assert request_seeds(None, 3) == [None, None, None]
    payload = sglang_engine.generate_payload([[1], [2]], dataclasses.replace(SAMPLING, n=4))
    assert len({p["sampling_seed"] for p in payload["sampling_params"]}) == 8


def _open_ipc_bucket_child(entries, result_queue):
    torch.cuda.set_device(0)
    named = vllm_engine.open_bucket(entries)
    result_queue.put([(n, t.float().sum().item(), str(t.dtype), list(t.shape)) for n, t in named])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vllm_ipc_entries_open_in_another_process():
    # The CUDA IPC entries the vLLM worker extension receives: plain fields, opened in a second process.
    ctx = mp.get_context("spawn")
    bucket = [("w", torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)),
              ("b", torch.ones(5, dtype=torch.bfloat16, device="cuda"))]
    entries = [vllm_engine.ipc_handle(n, t) for n, t in bucket]
    assert all(isinstance(v, (str, int, bool, bytes, list, type(None))) for e in entries for v in e.values())
    queue = ctx.Queue()
    child = ctx.Process(target=_open_ipc_bucket_child, args=(entries, queue))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert got == [(n, t.float().sum().item(), str(t.dtype), list(t.shape)) for n, t in bucket]
