"""Contract checks of the SGLang engine paths against SGLang's own classes (sglang 0.5.23).

Run by ``tests/test_contract_engines.py`` inside the isolated venv ``.engine_venvs/sglang`` (built by
``tools/setup_engine_venvs.sh``); prints one JSON object ``{check: "ok" | failure text}`` as its last line.

Only ``sglang.Engine`` (it needs a GPU) is replaced, by ``StandInEngine``, which answers as the real Engine's
methods do (signatures checked against ``sglang/srt/entrypoints/engine.py``) and serialises every bucket with
SGLang's ``MultiprocessingSerializer`` once per TP rank, as ``Engine._serialize_tensors_per_rank`` does.
Everything else is SGLang's: ``ServerArgs`` (our engine keyword arguments; the ``/server_info`` answer is its
``resolved_dict()``), ``SamplingParams`` (our per-request sampling settings, normalised and verified as the
tokenizer manager does), the request structs of ``managers/io_struct.py`` (our HTTP bodies) where they import,
the deterministic sampler's ``multinomial_with_seed`` where it imports, and ``runtime_context.publish``.
Where a module does not import on CPU (``io_struct`` needs torchvision, ``engine.py`` the GPU stack), the
installed source file is parsed instead, so an upgrade that moves the contract fails here.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

VOCAB = 32


def _source(module: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(module)
    with open(spec.origin) as f:
        return f.read()


def _class_fields(module: str, class_name: str) -> dict[str, bool]:
    """Annotated fields of a class in SGLang's installed source: name -> has a default."""
    for node in ast.walk(ast.parse(_source(module))):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {s.target.id: s.value is not None for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise AssertionError(f"{class_name} not found in {module}")


def _method_params(module: str, class_name: str, method: str) -> list[str]:
    for node in ast.walk(ast.parse(_source(module))):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method:
                    return [a.arg for a in item.args.args]
    raise AssertionError(f"{class_name}.{method} not found in {module}")


def _server_args(**kwargs):
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(**kwargs)


class StandInEngine:
    """Replaces ``sglang.Engine`` only. ``params``: the model's parameters by name; a bucket naming another
    tensor or shape is refused with ``(False, message)``, as SGLang's scheduler answers
    (``ModelRunner.update_weights_from_tensor`` returns ``(False, ...)`` on a load error)."""

    made: list["StandInEngine"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.params = {"model.embed_tokens.weight": torch.zeros(VOCAB, 4), "model.norm.weight": torch.zeros(4)}
        self.received: dict[str, torch.Tensor] = {}
        self.generate_calls: list[dict] = []
        StandInEngine.made.append(self)

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        from sglang.srt.utils import MultiprocessingSerializer

        tp_size = self.kwargs.get("tp_size", 1)
        payloads = [MultiprocessingSerializer.serialize(named_tensors) for _ in range(tp_size)]
        for payload in payloads:  # each TP rank deserialises its own copy
            for name, tensor in MultiprocessingSerializer.deserialize(payload):
                if name not in self.params or self.params[name].shape != tensor.shape:
                    return False, f"Failed to update weights: unknown parameter or shape {name} {tuple(tensor.shape)}"
                self.received[name] = tensor.clone()
        return True, "Succeeded to update model weights."

    def flush_cache(self):
        return SimpleNamespace(success=True, message="")

    def release_memory_occupation(self, tags=None):
        return None

    def resume_memory_occupation(self, tags=None):
        return None

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False, **kwargs):
        self.generate_calls.append({"input_ids": input_ids, "sampling_params": sampling_params})
        return [{"output_ids": [1], "meta_info": {"finish_reason": {"type": "length"},
                                                   "output_token_logprobs": [[-0.5, 1, None]]}} for _ in input_ids]

    def shutdown(self):
        return None


def _install_stand_in():
    import sglang

    sglang.Engine = StandInEngine
    StandInEngine.made.clear()


def check_engine_kwargs_accepted_by_server_args():
    from sglang.srt.server_args import ServerArgs

    from fipo_megatron.rollout.sglang_engine import SGLangEngineConfig

    config = SGLangEngineConfig(model_path="/models/tiny", tp_size=4, enable_deterministic_inference=True)
    kwargs = config.engine_kwargs()
    # ServerArgs is assembled from its field namespaces (srt/arg_groups/fields/); its constructor lists them.
    fields = set(inspect.signature(ServerArgs).parameters)
    unknown = sorted(set(kwargs) - fields)
    assert not unknown, f"not ServerArgs fields: {unknown}"
    args = ServerArgs(**kwargs)
    assert args.tp_size == 4 and args.enable_deterministic_inference and args.enable_memory_saver
    # The colocated Engine's signatures we call (sglang/srt/entrypoints/engine.py).
    engine = "sglang.srt.entrypoints.engine"
    assert _method_params(engine, "Engine", "update_weights_from_tensor")[:4] == [
        "self", "named_tensors", "load_format", "flush_cache"]
    assert _method_params(engine, "Engine", "flush_cache") == ["self"]
    for name in ("release_memory_occupation", "resume_memory_occupation"):
        assert _method_params(engine, "Engine", name)[:1] == ["self"]
    assert {"input_ids", "sampling_params", "return_logprob"} <= set(_method_params(engine, "Engine", "generate"))


def check_per_request_seeds_distinct_and_reproducible():
    """Defect: all n samples of a prompt carried the step's one sampling_seed."""
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSampling

    from fipo_megatron.rollout.base import SamplingParams
    from fipo_megatron.rollout.sglang_engine import generate_payload

    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, n=4, seed=99)
    payload = generate_payload([[1, 2], [3]], sampling)
    assert payload == generate_payload([[1, 2], [3]], sampling), "not reproducible"
    per_request = payload["sampling_params"]
    assert isinstance(per_request, list) and len(per_request) == len(payload["input_ids"]) == 8
    seeds = []
    for params in per_request:
        sp = SGLangSampling(**params)
        sp.normalize(None)
        sp.verify(VOCAB)
        seeds.append(sp.sampling_seed)
    assert len(set(seeds)) == 8, f"requests share seeds: {seeds}"
    # What SGLang's deterministic sampler draws from those seeds (sglang/srt/layers/sampler.py).
    try:
        from sglang.srt.layers.sampler import multinomial_with_seed
    except Exception as e:  # noqa: BLE001 - the sampler module may need GPU kernels
        return f"ok (seeds checked; sampler does not import here: {type(e).__name__})"
    logprobs = torch.log_softmax(torch.linspace(0.0, 2.0, VOCAB), -1).repeat(8, 1)
    draws = []
    for step in range(6):
        positions = torch.full((8,), 2 + step, dtype=torch.int64)
        draws.append(multinomial_with_seed(logprobs, torch.tensor(seeds, dtype=torch.int64), positions).view(-1))
    responses = [tuple(int(d[i]) for d in draws) for i in range(8)]
    for p in range(2):
        group = responses[4 * p:4 * p + 4]
        assert len(set(group)) > 1, f"prompt {p}: the 4 samples are one response {group[0]}"


def check_refused_weight_update_raises():
    """Defect: update_weights_from_tensor's (False, message) was dropped."""
    from fipo_megatron.rollout.sglang_engine import SGLangEngine
    from fipo_megatron.weights.transport import WeightSyncError

    _install_stand_in()
    engine = SGLangEngine(model_path="/models/tiny", tp_size=2)
    try:
        engine.update_weights([("model.norm.weight", torch.ones(4))])
        try:
            engine.update_weights([("model.layers.0.mlp.missing.weight", torch.ones(3))])
        except WeightSyncError as e:
            assert "unknown parameter" in str(e)
        else:
            raise AssertionError("a bucket the model refused passed silently")
        engine.finish_weight_update()
    finally:
        engine.shutdown()


def check_buckets_through_multiprocessing_serializer():
    from fipo_megatron.rollout.sglang_engine import SGLangEngine

    _install_stand_in()
    engine = SGLangEngine(model_path="/models/tiny", tp_size=2)
    try:
        g = torch.Generator().manual_seed(0)
        bucket = [("model.embed_tokens.weight", torch.randn(VOCAB, 4, generator=g)),
                  ("model.norm.weight", torch.randn(4, generator=g))]
        engine.update_weights(bucket)
        received = StandInEngine.made[-1].received
        for name, tensor in bucket:
            assert torch.equal(received[name], tensor), name
    finally:
        engine.shutdown()


def check_server_weight_sync_layout():
    """Defect: engine_world_size = tp x dp was documented; SGLang supports dp_size == 1 and pp_size == 1."""
    from fipo_megatron.rollout.sglang_engine import check_weight_sync_layout

    ok = _server_args(model_path="/models/tiny", tp_size=4).resolved_dict()
    check_weight_sync_layout(ok, base_url="http://gen-0:30000", engine_world_size=4)
    for kwargs, needle in [({"tp_size": 2, "dp_size": 2}, "dp_size=2"), ({"tp_size": 2, "pp_size": 2}, "pp_size=2"),
                           ({"tp_size": 2}, "engine_world_size=4")]:
        info = _server_args(model_path="/models/tiny", **kwargs).resolved_dict()
        try:
            check_weight_sync_layout(info, base_url="http://gen-0:30000", engine_world_size=4)
        except ValueError as e:
            assert needle in str(e), str(e)
        else:
            raise AssertionError(f"{kwargs} accepted")
    # The upstream facts the check rests on, in the installed source.
    mixin = _source("sglang.srt.managers.tokenizer_control_mixin")
    start = mixin.index("async def init_weights_update_group")
    assert "dp_size == 1" in mixin[start:start + 600]
    assert "rank = rank_offset + self.tp_rank" in _source(
        "sglang.srt.model_executor.model_runner_components.weight_updater")


def check_one_engine_per_process():
    """Defect: num_engines: 2 put two sglang.Engine in one process."""
    from sglang.srt import runtime_context

    from fipo_megatron.rollout.base import get_engine
    from fipo_megatron.rollout.sglang_engine import SGLangEngine

    # What makes two Engines in one process unsafe, in the installed source (publishing a record resolves
    # it, and resolution needs torchvision, which has no build for this torch): Engine launch publishes its
    # ServerArgs into the module's one RuntimeContext, last publish wins, and an Engine built on a thread
    # takes that thread's event loop.
    engine_source = _source("sglang.srt.entrypoints.engine")
    assert 'publish(server_args, role="tokenizer")' in engine_source
    assert "last-publish-wins" in inspect.getdoc(runtime_context.publish)
    assert isinstance(runtime_context._CONTEXT, runtime_context.RuntimeContext)
    loop_fn = engine_source[engine_source.index("def _ensure_event_loop"):]
    assert "get_event_loop()" in loop_fn[:600]
    _install_stand_in()
    try:
        get_engine("sglang", model_path="/models/tiny", tp_size=4, num_engines=2)
    except ValueError as e:
        assert "num_engines" in str(e) and "per_node" in str(e), str(e)
    else:
        raise AssertionError("two sglang.Engine in one process accepted")
    assert StandInEngine.made == [], "an engine started before the refusal"
    engine = SGLangEngine(model_path="/models/tiny")
    try:
        SGLangEngine(model_path="/models/tiny", base_gpu_id=4)
    except RuntimeError as e:
        assert "one process" in str(e)
    else:
        raise AssertionError("a second live engine accepted")
    finally:
        engine.shutdown()


def check_http_request_shapes():
    """Our HTTP bodies against the request structs the routes parse (managers/io_struct.py)."""
    from fipo_megatron.rollout.base import SamplingParams
    from fipo_megatron.rollout.sglang_engine import generate_payload

    bodies = {
        "GenerateReqInput": generate_payload([[1, 2]], SamplingParams(n=2, seed=1)),
        "InitWeightsUpdateGroupReqInput": {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1,
                                           "world_size": 5, "group_name": "fipo_weight_sync", "backend": "nccl"},
        "UpdateWeightsFromDistributedReqInput": {"names": ["w"], "dtypes": ["bfloat16"], "shapes": [[2, 2]],
                                                 "group_name": "fipo_weight_sync", "flush_cache": False},
    }
    try:
        from sglang.srt.managers import io_struct
    except Exception as e:  # noqa: BLE001 - io_struct needs torchvision, which has no build for this torch
        io_struct, how = None, f"parsed from source ({type(e).__name__} on import)"
    else:
        how = "constructed"
    for name, body in bodies.items():
        fields = _class_fields("sglang.srt.managers.io_struct", name)
        unknown = sorted(set(body) - set(fields))
        missing = sorted(f for f, has_default in fields.items() if not has_default and f not in body)
        if name == "GenerateReqInput":
            missing = []  # every field has a default or is one of text/input_ids/input_embeds
        assert not unknown and not missing, f"{name}: unknown {unknown}, missing {missing}"
        if io_struct is not None:
            getattr(io_struct, name)(**body)
    generate = _source("sglang.srt.managers.io_struct")
    start = generate.index("class GenerateReqInput")
    block = generate[start:generate.index("\nclass ", start + 10)]
    line = block[block.index("    sampling_params:"):].splitlines()[0]
    assert "List[Dict" in line, f"GenerateReqInput.sampling_params no longer takes one dict per request: {line}"
    return f"ok ({how})"


def main() -> None:
    import sglang
    from contract_report import run_checks  # this script's folder is on sys.path when it runs

    run_checks(globals(), version=sglang.__version__)


if __name__ == "__main__":
    main()
