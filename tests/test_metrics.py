"""Metrics: jsonl rows flushed per step, resume truncation, TensorBoard events, length quantiles, plot tool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fipo_megatron.metrics import MetricsLogger, read_metrics, response_length_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_response_length_metrics_against_numpy():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=37).tolist() + [100, 100]
    m = response_length_metrics(lengths, max_response_length=100)
    arr = np.array(lengths, dtype=np.float64)
    assert m["response_length/mean"] == pytest.approx(arr.sum() / len(arr))
    srt = np.sort(arr)
    # q25/median/q75 with linear interpolation, from the definition
    for key, q in (("q25", 0.25), ("median", 0.5), ("q75", 0.75)):
        pos = q * (len(srt) - 1)
        lo = int(np.floor(pos))
        want = srt[lo] + (pos - lo) * (srt[min(lo + 1, len(srt) - 1)] - srt[lo])
        assert m[f"response_length/{key}"] == pytest.approx(want)
    assert m["response_length/min"] == srt[0] and m["response_length/max"] == 100
    assert m["response_length/clip_ratio"] == pytest.approx(2 / 39)
    assert response_length_metrics([], max_response_length=5) == {}


def test_jsonl_flushed_each_step_and_resume(tmp_path):
    run = str(tmp_path / "run")
    log = MetricsLogger(run, tensorboard=True)
    for step in range(1, 5):
        log.log(step, {"reward/mean": step / 10, "actor/pg_loss": np.float32(0.5), "bad": float("nan")})
        # visible to another reader before close: a kill -9 loses nothing already logged
        rows = read_metrics(os.path.join(run, "metrics.jsonl"))
        assert len(rows) == step and rows[-1]["step"] == step
    log.close()
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert rows[0] == {"step": 1, "actor/pg_loss": 0.5, "bad": None, "reward/mean": 0.1}
    events = [f for f in os.listdir(os.path.join(run, "tensorboard")) if f.startswith("events.out.tfevents")]
    assert events
    # TensorBoard holds the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tensorboard"))
    acc.Reload()
    assert [round(e.value, 6) for e in acc.Scalars("reward/mean")] == [0.1, 0.2, 0.3, 0.4]
    # resuming from step 2: rows of steps 3, 4 (written after that checkpoint) go; a partial line too
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "rew')
    with MetricsLogger(run, resume_step=2) as log2:
        log2.log(3, {"reward/mean": 0.33})
    assert [(r["step"], r["reward/mean"]) for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == \
        [(1, 0.1), (2, 0.2), (3, 0.33)]
    # a fresh (not resumed) run in the same directory starts a new file; a disabled logger writes nothing
    with MetricsLogger(run) as log3:
        log3.log(1, {"x": 1})
    assert read_metrics(os.path.join(run, "metrics.jsonl")) == [{"step": 1, "x": 1}]
    MetricsLogger(str(tmp_path / "off"), enabled=False).log(1, {"x": 1})
    assert not os.path.exists(tmp_path / "off")


def test_plot_tool_writes_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for step in range(1, 8):
            f.write(json.dumps({"step": step, "reward/mean": step / 10, "rollout/acc": step / 20, "response_length/mean": 3 + step,
                                "response_length/q25": 2, "response_length/median": 3, "response_length/q75": 5,
                                "actor/influence_weights_mean": 1.0 + step / 100,
                                "actor/influence_weights_max": 1.2, "actor/influence_weights_min": 1.0}) + "\n")
    out = tmp_path / "plot.png"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000


def test_wandb_is_optional(tmp_path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="fipo_megatron\\[logging\\]"):
            MetricsLogger(str(tmp_path / "w"), wandb=True)
    else:  # pragma: no cover - wandb installed: nothing to check offline
        pytest.skip("wandb is installed; the missing-dependency message is not reachable")
