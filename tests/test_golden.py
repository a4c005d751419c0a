"""The golden run: the tiny CPU demo (examples/configs/tiny_cpu.yaml) for 3 steps at a fixed seed, at tp=1
(one process) and tp=2 (two gloo processes), must reproduce the numbers stored in
tests/golden/tiny_cpu_3steps.json exactly: every logged metric that is not a time (rewards, accuracies,
losses, grad norms, influence weights, FutureKL, mismatch), every mini-batch's metrics, and a SHA-256 of
the final weights.

A refactor keeps these bit-identical. A change that is meant to change the numerics regenerates the file,
in a commit of its own that says why:

    FIPO_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py

Floats are compared as stored (JSON writes ``repr``, which round-trips a float64 exactly), not within a
tolerance. The numbers belong to one torch build. So that they do not also belong to one CPU, the run
happens in a fresh interpreter whose kernels are held to code paths every x86-64 CPU executes alike
(``PINNED_KERNELS``): torch's own kernels at their baseline instruction set instead of the AVX2/AVX-512
variant the host would pick, MKL in its conditional-numerical-reproducibility mode ``COMPATIBLE`` (the
same results on every Intel or AMD processor), oneDNN limited to SSE4.1. Without them the same build
gives different bits on an AMD EPYC (AVX-512) and on the machine that first wrote the file. These
variables are read when torch first dispatches a kernel, which is why a fresh process is needed: the test
process has long since picked its paths.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")
GOLDEN = os.path.join(REPO, "tests", "golden", "tiny_cpu_3steps.json")
REGEN = os.environ.get("FIPO_REGEN_GOLDEN") == "1"
STEPS = 3
# The demo's own config, shortened: no validation, no checkpoints, nothing but metrics.jsonl written.
OVERRIDES = [f"trainer.total_training_steps={STEPS}", "trainer.val_interval=0", "trainer.val_before_train=false",
             "checkpoint.save_interval=0", "checkpoint.save_at_end=false", "logging.tensorboard=false",
             "logging.progress_bar=false", "data.train_batch_size=8", "data.gen_batch_size=8",
             "actor.ppo_mini_batch_size=2"]
# Wall-clock quantities differ run to run; everything else is a function of the seed.
VOLATILE = ("timing/", "perf/", "actor/timing/", "rollout/tokens_per_s")
# Kernel paths that round the same on every x86-64 host (see the module docstring).
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "DNNL_MAX_CPU_ISA": "SSE41",
                  "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _golden_run(rank, world_size, run_dir, tp):
    import torch

    from fipo_megatron.config import load_config
    from fipo_megatron.metrics import read_metrics
    from fipo_megatron.models.sharding import gather_full_state_dict
    from fipo_megatron.trainer import Trainer

    cfg = load_config(CONFIG, overrides=OVERRIDES + [f"parallel.tp={tp}", f"trainer.run_dir={run_dir}"])
    trainer = Trainer(cfg)
    train_step, mini_batches = trainer.train_step, []

    def recording_step():
        out = train_step()
        mini_batches.append([dict(m) for m in trainer.actor.last_mini_batch_metrics])
        return out

    trainer.train_step = recording_step
    try:
        trainer.fit()
    finally:
        trainer.close()
    full = gather_full_state_dict(trainer.actor.model_chunks, groups=trainer.actor.groups)
    if rank != 0:
        return None
    digest = hashlib.sha256()
    for name in sorted(full):
        digest.update(name.encode())
        digest.update(full[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    steps = [{k: v for k, v in row.items() if not k.startswith(VOLATILE)}
             for row in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]
    return {"steps": steps, "mini_batches": mini_batches, "weights_sha256": digest.hexdigest()}


def _run_here(tp: int, run_dir: str) -> dict:
    from fipo_megatron.testing.distributed import run_distributed

    # Import the heavy modules once here: the forked ranks inherit them.
    import fipo_megatron.actor.actor  # noqa: F401
    import fipo_megatron.trainer  # noqa: F401

    out = run_distributed(_golden_run, tp, args=(run_dir, tp), timeout=300)[0]
    # Through JSON and back: what is compared is exactly what the file stores (NaN would not round-trip).
    return json.loads(json.dumps(out, allow_nan=False))


def _run(tp: int, run_dir: str) -> dict:
    """The golden run in a fresh interpreter with ``PINNED_KERNELS`` set (this file run as a script)."""
    os.makedirs(run_dir, exist_ok=True)
    out_file = os.path.join(run_dir, "golden_out.json")
    env = {**os.environ, **PINNED_KERNELS, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tp), run_dir, out_file], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"golden run at tp={tp} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    with open(out_file) as f:
        return json.load(f)


def _environment() -> dict:
    import torch

    return {"torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version(),
            "kernels": PINNED_KERNELS}


def _differences(want, got, path="") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}/{k}: missing" for k in want if k not in got]
        out += [f"{path}/{k}: not in the golden file" for k in got if k not in want]
        for k in want:
            if k in got:
                out += _differences(want[k], got[k], f"{path}/{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: {len(got)} entries, golden {len(want)}"]
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in _differences(a, b, f"{path}[{i}]")]
    # bool is an int in Python; a metric that turned from 1 to True still counts as changed
    if type(want) is not type(got) or want != got:
        return [f"{path}: {got!r} != golden {want!r}"]
    return []


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_golden_run_is_bit_identical(tmp_path, tp):
    got = _run(tp, str(tmp_path / f"tp{tp}"))
    assert len(got["steps"]) == STEPS and all(got["mini_batches"]), "the run must train on every step"
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for row in got["steps"] for k, v in row.items()
               if k != "step")
    key = f"tp{tp}"
    if REGEN:
        golden = json.load(open(GOLDEN)) if os.path.isfile(GOLDEN) else {}
        golden["_header"] = {
            "what": "tests/test_golden.py: examples/configs/tiny_cpu.yaml for 3 steps at its fixed seed, "
                    "at tp=1 (1 process) and tp=2 (2 gloo processes); metrics.jsonl rows without "
                    f"{list(VOLATILE)}, actor.last_mini_batch_metrics per step, SHA-256 of the final weights",
            "overrides": OVERRIDES,
            "regenerate": "FIPO_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py",
            "environment": _environment(),
        }
        golden[key] = got
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1, sort_keys=True)
            f.write("\n")
        return
    with open(GOLDEN) as f:
        golden = json.load(f)
    diffs = _differences(golden[key], got)
    env, stored = _environment(), golden["_header"]["environment"]
    hint = "" if env == stored else f" (stored on {stored}, running on {env}: another build/CPU may round differently)"
    assert not diffs, (f"{len(diffs)} difference(s) from the golden run{hint}; if the numerics were meant to change, "
                       f"regenerate in a commit of its own:\n  " + "\n  ".join(diffs[:40]))


if __name__ == "__main__":
    # Called by ``_run``: ``python tests/test_golden.py TP RUN_DIR OUT_JSON`` under PINNED_KERNELS.
    _tp, _run_dir, _out_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open(_out_file, "w") as _f:
        json.dump(_run_here(_tp, _run_dir), _f)
