"""The SGLang and vLLM paths against the engines' real classes, in isolated venvs.

``bash tools/setup_engine_venvs.sh`` builds ``.engine_venvs/vllm`` and ``.engine_venvs/sglang`` (CPU torch, the
pinned engine installed without its GPU dependencies, and the light packages its Python layer imports). Each
venv runs one script of ``tests/contract/`` once per test run; the script replaces only the object that needs a
GPU (``vllm.LLM``, ``sglang.Engine``) and pushes our settings, requests, payloads and weight buckets through the
engine's own classes, reporting every check. A test here skips only when its venv was not built.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENVS = pathlib.Path(os.environ.get("FIPO_ENGINE_VENVS", ROOT / ".engine_venvs"))


def _run_contract(engine: str) -> dict:
    python = VENVS / engine / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} is missing: build it with bash tools/setup_engine_venvs.sh")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "SGLANG_", "PYTHON"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([str(python), str(ROOT / "tests" / "contract" / f"{engine}_contract.py")], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise AssertionError(f"{engine} contract script failed (rc {done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def vllm_results():
    return _run_contract("vllm")


@pytest.fixture(scope="module")
def sglang_results():
    return _run_contract("sglang")


def _ok(results: dict, check: str) -> None:
    assert check in results, f"{check} did not run; the script reported {sorted(results)}"
    assert results[check].startswith("ok"), f"{check}:\n{results[check]}"


# ------------------------------------------------------------------------------------------------ vLLM
@pytest.mark.slow
def test_vllm_version_is_the_pinned_one(vllm_results):
    assert vllm_results["version"] == "0.32.0"


@pytest.mark.slow
@pytest.mark.parametrize("check", ["check_llm_kwargs_accepted_by_engine_args",
                                   "check_worker_extension_has_no_clash_with_vllm_worker",
                                   "check_outputs_parsed_from_real_types"])
def test_vllm_contract(vllm_results, check):
    _ok(vllm_results, check)


@pytest.mark.slow
def test_vllm_weight_sync_crosses_the_engine_core_codec(vllm_results):
    _ok(vllm_results, "check_weight_sync_through_engine_core")


@pytest.mark.slow
def test_vllm_samples_of_a_prompt_get_distinct_reproducible_seeds(vllm_results):
    _ok(vllm_results, "check_per_request_seeds_distinct_and_reproducible")


@pytest.mark.slow
def test_vllm_failed_results_raise(vllm_results):
    _ok(vllm_results, "check_failed_results_raise")


# ---------------------------------------------------------------------------------------------- SGLang
@pytest.mark.slow
def test_sglang_version_is_the_pinned_one(sglang_results):
    assert sglang_results["version"] == "0.5.23"


@pytest.mark.slow
@pytest.mark.parametrize("check", ["check_engine_kwargs_accepted_by_server_args",
                                   "check_http_request_shapes",
                                   "check_buckets_through_multiprocessing_serializer"])
def test_sglang_contract(sglang_results, check):
    _ok(sglang_results, check)


@pytest.mark.slow
def test_sglang_samples_of_a_prompt_get_distinct_reproducible_seeds(sglang_results):
    _ok(sglang_results, "check_per_request_seeds_distinct_and_reproducible")


@pytest.mark.slow
def test_sglang_refused_weight_update_raises(sglang_results):
    _ok(sglang_results, "check_refused_weight_update_raises")


@pytest.mark.slow
def test_sglang_server_weight_sync_layout(sglang_results):
    _ok(sglang_results, "check_server_weight_sync_layout")


@pytest.mark.slow
def test_sglang_one_engine_per_process(sglang_results):
    _ok(sglang_results, "check_one_engine_per_process")
