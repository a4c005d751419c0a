"""Contract checks of the vLLM engine path against vLLM's own classes (vllm 0.32.0).

Run by ``tests/test_contract_engines.py`` inside the isolated venv ``.engine_venvs/vllm`` (built by
``tools/setup_engine_venvs.sh``); prints one JSON object ``{check: "ok" | failure text}`` as its last line.

Only ``vllm.LLM`` (it needs a GPU) is replaced, by ``StandInLLM``; everything our engine hands to vLLM goes
through vLLM's real code:

- the ``LLM(...)`` keyword arguments through ``vllm.EngineArgs`` (what ``LLM.__init__`` builds from them);
- ``collective_rpc`` as the default multiprocess engine carries it (``vllm/v1/engine/core_client.py``,
  ``SyncMPClient.call_utility``): the utility message encoded by ``MsgpackEncoder`` in this process, decoded by
  an untyped ``MsgpackDecoder`` in a child process started with the environment this process had when the
  ``LLM`` was made (the engine core is spawned then, ``vllm/v1/engine/core.py`` ``process_input_sockets``),
  run there by ``vllm.v1.serial_utils.run_method`` on a worker class extended with the ``worker_extension_cls``
  that vLLM resolves (``resolve_obj_by_qualname``), whose model loads the bucket by name;
- sampling settings through ``vllm.SamplingParams`` and ``TokensPrompt``; outputs built as vLLM builds them
  (``CompletionOutput``, ``RequestOutput``, ``create_sample_logprobs`` / ``append_logprobs_for_next_position``,
  dict and flat log-prob containers), each request sampled with a generator seeded from its own seed, as
  vLLM's GPU sampler does.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
# vLLM's default: no pickle fallback in its msgpack codec. The engine under test must not need it.
os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)

import torch  # noqa: E402

HIDDEN, VOCAB = 4, 11


def _write_frames(path: str, frames) -> None:
    with open(path, "wb") as f:
        for frame in frames:
            data = bytes(frame)
            f.write(struct.pack("<Q", len(data)))
            f.write(data)


def _read_frames(path: str) -> list[bytes]:
    frames = []
    with open(path, "rb") as f:
        while header := f.read(8):
            frames.append(f.read(struct.unpack("<Q", header)[0]))
    return frames


def _raw_sha(tensor: torch.Tensor) -> str:
    flat = tensor.detach().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


class TinyModel(torch.nn.Module):
    """A model with HF-style parameter names. Its ``load_weights`` copies by name with a shape check, as
    vLLM's ``default_weight_loader`` does (``vllm/model_executor/model_loader/weight_utils.py``; that module
    does not import without vLLM's GPU-side packages, and a real model's loader needs a GPU anyway)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(VOCAB, HIDDEN)
        self.norm = torch.nn.Module()
        self.norm.weight = torch.nn.Parameter(torch.zeros(HIDDEN, dtype=torch.bfloat16))

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            param = params[name]
            assert param.shape == tensor.shape, (name, param.shape, tensor.shape)
            param.data.copy_(tensor)
            loaded.add(name)
        return loaded


def engine_core_main(request_path: str, answer_path: str, report_path: str) -> None:
    """The engine-core side of one ``collective_rpc`` (this process has the environment of the LLM's maker)."""
    from vllm.config import ParallelConfig  # noqa: F401 - the field below is vLLM's, read from the request
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder, UtilityResult, run_method

    client, call_id, method_name, (method, timeout, args, kwargs) = MsgpackDecoder().decode(_read_frames(request_path))
    assert method_name == "collective_rpc", method_name
    extension = resolve_obj_by_qualname(os.environ["CONTRACT_WORKER_EXTENSION_CLS"])

    class GPUWorkerStandIn:
        """What the extension may use of vLLM's GPU worker (``vllm/v1/worker/gpu_worker.py``): model_runner.model."""

        def __init__(self):
            self.model_runner = type("ModelRunner", (), {})()
            self.model_runner.model = TinyModel()

    # vLLM extends the worker class with the extension (WorkerWrapperBase.init_worker appends it to the bases).
    worker_cls = type("Worker", (GPUWorkerStandIn, extension), {})
    worker = worker_cls()
    result = run_method(worker, method, args, kwargs or {})
    loaded = {name: {"sha": _raw_sha(p), "dtype": str(p.dtype).removeprefix("torch."), "shape": list(p.shape)}
              for name, p in worker.model_runner.model.state_dict().items()}
    with open(report_path, "w") as f:
        json.dump(loaded, f)
    _write_frames(answer_path, MsgpackEncoder().encode(UtilityResult([result])))


class StandInLLM:
    """Replaces ``vllm.LLM`` only: validates its arguments with ``EngineArgs`` and carries ``collective_rpc``
    over vLLM's codec to a child process, as the multiprocess engine core does."""

    instances: list["StandInLLM"] = []

    def __init__(self, **kwargs):
        from vllm import EngineArgs

        self.engine_args = EngineArgs(**kwargs)  # what LLM.__init__ does with its keyword arguments
        self.core_env = dict(os.environ)  # the engine core is spawned now and inherits this
        self.generated: list[tuple[list, list]] = []
        self.reset_answer, self.wake_answer = True, True
        self.last_report: dict | None = None
        StandInLLM.instances.append(self)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder, UtilityResult

        frames = MsgpackEncoder().encode((0, 1, "collective_rpc", (method, timeout, args, kwargs)))
        with tempfile.TemporaryDirectory() as tmp:
            request, answer, report = (os.path.join(tmp, n) for n in ("request", "answer", "report.json"))
            _write_frames(request, frames)
            env = dict(self.core_env, CONTRACT_WORKER_EXTENSION_CLS=self.engine_args.worker_extension_cls,
                       PYTHONPATH=ROOT)
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--engine-core", request, answer,
                                   report], env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"engine core failed: {done.stderr[-3000:]}")
            with open(report) as f:
                self.last_report = json.load(f)
            return MsgpackDecoder(UtilityResult).decode(_read_frames(answer)).result

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, **kwargs):
        from vllm import SamplingParams
        from vllm.logprobs import append_logprobs_for_next_position, create_sample_logprobs
        from vllm.outputs import CompletionOutput, RequestOutput

        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts) and all(isinstance(p, SamplingParams) for p in params)
        self.generated.append((prompts, params))
        outputs = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            # vLLM's sampler draws a seeded request from its own torch.Generator seeded with sp.seed.
            generator = torch.Generator()
            if sp.seed is not None:
                generator.manual_seed(sp.seed)
            else:
                generator.seed()
            logits = torch.linspace(0.0, 1.0, VOCAB)
            probs = torch.softmax(logits / sp.temperature, -1)
            tokens = torch.multinomial(probs, sp.max_tokens, replacement=True, generator=generator).tolist()
            logprobs = create_sample_logprobs(sp.flat_logprobs)
            for tok in tokens:
                append_logprobs_for_next_position(logprobs, [tok], [float(torch.log(probs[tok]))], [None],
                                                  rank=1, num_logprobs=sp.logprobs)
            completion = CompletionOutput(index=0, text="", token_ids=tokens, cumulative_logprob=None,
                                          logprobs=logprobs, finish_reason="length")
            outputs.append(RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=prompt["prompt_token_ids"],
                                         prompt_logprobs=None, outputs=[completion], finished=True))
        return outputs

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False) -> bool:
        return self.reset_answer

    def sleep(self, level=1, mode="abort"):
        return None

    def wake_up(self, tags=None) -> bool:
        return self.wake_answer


def _engine():
    import vllm

    from fipo_megatron.rollout import vllm_engine

    vllm.LLM = StandInLLM
    return vllm_engine.VLLMEngine(model_path="/models/tiny", tensor_parallel_size=1)


def check_llm_kwargs_accepted_by_engine_args():
    from vllm import EngineArgs

    from fipo_megatron.rollout.vllm_engine import VLLMEngineConfig

    kwargs = VLLMEngineConfig(model_path="/models/tiny", tensor_parallel_size=2).llm_kwargs()
    args = EngineArgs(**kwargs)
    assert args.logprobs_mode == "processed_logprobs" and args.enable_sleep_mode and args.skip_tokenizer_init


def check_weight_sync_through_engine_core():
    """Defect: a pickled function and reduce_tensor tuples cannot cross vLLM's codec without
    VLLM_ALLOW_INSECURE_SERIALIZATION in both processes."""
    engine = _engine()
    llm = StandInLLM.instances[-1]
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in llm.core_env
    g = torch.Generator().manual_seed(0)
    bucket = [("embed_tokens.weight", torch.randn(VOCAB, HIDDEN, generator=g)),
              ("norm.weight", torch.randn(HIDDEN, generator=g).to(torch.bfloat16))]
    engine.update_weights(bucket)
    got = llm.last_report
    for name, tensor in bucket:
        assert got[name]["sha"] == _raw_sha(tensor), f"{name} arrived changed"
        assert got[name]["dtype"] == str(tensor.dtype).removeprefix("torch."), name
        assert got[name]["shape"] == list(tensor.shape), name
    engine.finish_weight_update()


def check_worker_extension_has_no_clash_with_vllm_worker():
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from fipo_megatron.rollout.vllm_engine import VLLMEngineConfig

    qualname = VLLMEngineConfig(model_path="/m").llm_kwargs()["worker_extension_cls"]
    extension = resolve_obj_by_qualname(qualname)
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except Exception as e:  # noqa: BLE001 - the GPU worker may not import without CUDA libraries
        return f"ok (vLLM's GPU worker does not import here: {type(e).__name__})"
    clashes = [a for a in dir(extension) if not a.startswith("__") and hasattr(Worker, a)]
    assert not clashes, f"worker_extension_cls attributes clash with vLLM's Worker: {clashes}"


def check_per_request_seeds_distinct_and_reproducible():
    """Defect: the n samples of a prompt shared one seed, so vLLM's per-request generators drew n copies."""
    from fipo_megatron.rollout.base import SamplingParams

    engine = _engine()
    llm = StandInLLM.instances[-1]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, n=4, seed=1234)
    first = engine.generate([[1, 2, 3], [4, 5]], sampling)
    again = engine.generate([[1, 2, 3], [4, 5]], sampling)
    assert [o.token_ids for o in first] == [o.token_ids for o in again], "not reproducible"
    for p in range(2):
        group = [tuple(o.token_ids) for o in first if o.prompt_index == p]
        assert len(group) == 4 and len(set(group)) == 4, f"prompt {p}: the 4 samples are {group}"
    seeds = [sp.seed for sp in llm.generated[0][1]]
    assert len(set(seeds)) == len(seeds), f"requests share seeds: {seeds}"


def check_outputs_parsed_from_real_types():
    from fipo_megatron.rollout.base import SamplingParams

    engine = _engine()
    sampling = SamplingParams(temperature=0.7, max_new_tokens=5, n=2, seed=3, stop_token_ids=[9])
    outs = engine.generate([[1]], sampling)
    prompts, params = StandInLLM.instances[-1].generated[-1]
    assert all(p["prompt_token_ids"] == [1] for p in prompts)
    assert all(sp.logprobs == 0 and sp.n == 1 and sp.stop_token_ids == [9] and sp.max_tokens == 5 for sp in params)
    probs = torch.softmax(torch.linspace(0.0, 1.0, VOCAB) / 0.7, -1)
    for out in outs:
        assert len(out.token_ids) == 5 and out.finish_reason == "length"
        expected = [float(torch.log(probs[t])) for t in out.token_ids]
        assert out.log_probs == expected
    # vLLM's flat log-prob container (SamplingParams.flat_logprobs) parses the same.
    import copy

    from fipo_megatron.rollout.vllm_engine import parse_vllm_output

    flat_params = []
    for sp in params:
        flat_sp = copy.deepcopy(sp)
        flat_sp.flat_logprobs = True
        flat_params.append(flat_sp)
    flat = StandInLLM.instances[-1].generate(prompts, flat_params)
    assert type(flat[0].outputs[0].logprobs).__name__ == "FlatLogprobs"
    for o, ref in zip(flat, outs):
        assert parse_vllm_output(o, prompt_index=0).log_probs == ref.log_probs


def check_failed_results_raise():
    """Defect: reset_prefix_cache() -> False and wake_up() -> False were ignored."""
    import inspect

    import vllm

    from fipo_megatron.weights.transport import WeightSyncError

    for name in ("reset_prefix_cache", "wake_up"):
        annotation = inspect.signature(getattr(vllm.LLM, name)).return_annotation
        assert annotation in (bool, "bool"), f"vllm.LLM.{name} returns {annotation}"
    engine = _engine()
    llm = StandInLLM.instances[-1]
    llm.reset_answer, llm.wake_answer = False, False
    try:
        engine.finish_weight_update()
        raise AssertionError("reset_prefix_cache() -> False passed silently")
    except WeightSyncError:
        pass
    try:
        engine.resume_memory()
        raise AssertionError("wake_up() -> False passed silently")
    except RuntimeError:
        pass


def main() -> None:
    import vllm
    from contract_report import run_checks  # this script's folder is on sys.path when it runs

    run_checks(globals(), version=vllm.__version__)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--engine-core":
        engine_core_main(*sys.argv[2:5])
    else:
        main()
