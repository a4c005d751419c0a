"""The README's CPU demo, exactly as a user runs it: examples/run_tiny_cpu.sh (torchrun, 2 ranks, tp=2).

Checks its promises: it finishes, writes every artefact, the accuracy of sampled responses rises by at
least 0.3 from the first steps, and FutureKL is active (influence weights move away from 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.distributed
def test_run_tiny_cpu_script(tmp_path):
    run_dir = tmp_path / "demo"
    env = {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "run_tiny_cpu.sh"), "trainer.total_training_steps=30",
                           "logging.progress_bar=false"], cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("config.yaml", "metrics.jsonl", "plot.png", "tensorboard", "checkpoints/latest", "hf_init/config.json"):
        assert (run_dir / name).exists(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "rollout/acc" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    first = sum(r["rollout/acc"] for r in train[:3]) / 3
    last = sum(r["rollout/acc"] for r in train[-3:]) / 3
    assert last - first >= 0.3, (first, last)
    updated = [r for r in train if "actor/raw_influence_weights_max" in r]
    assert all(r["actor/num_mini_batches"] >= 1 for r in updated)
    assert max(r["actor/raw_influence_weights_max"] for r in updated) > 1.05
    assert min(r["actor/influence_weights_mean"] for r in updated) != 1.0
    assert "accuracy of sampled responses" in proc.stdout
