"""Faults injected into the real tiny run through the command line (one process, tp=1), reusing one run
directory: SIGTERM mid-run saves at the next step boundary and exits 143; the newest checkpoint then gets
64 bytes of garbage in a ``.distcp`` file, so the resume (``--resume key=value``) names that file, falls
back to the previous checkpoint and logs the config change; a fresh run in that directory is refused;
``trainer.overwrite=true`` with a learning rate of 1e30 stops with exit code 3 after
``trainer.max_consecutive_skipped_steps`` skipped steps, before saving again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")
SMALL = ["data.train_batch_size=4", "data.gen_batch_size=4", "rollout.n=4", "actor.ppo_mini_batch_size=2",
         "data.max_response_length=4", "reward.overlong_buffer.len=1", "checkpoint.save_interval=1",
         "checkpoint.keep_last=2", "trainer.val_interval=0", "trainer.val_before_train=false",
         "logging.tensorboard=false", "logging.progress_bar=false", "algorithm.filter_groups.enable=false",
         "parallel.tp=1", "reward.num_workers=1", "trainer.sigterm_grace_s=120"]


def _cli(run_dir, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None), env.pop("RANK", None)
    return subprocess.Popen([sys.executable, "-m", "fipo_megatron", "--config", CONFIG, *SMALL,
                             f"trainer.run_dir={run_dir}", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _steps(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    return [json.loads(line)["step"] for line in open(path).read().splitlines() if line.strip()]


@pytest.mark.slow
def test_sigterm_corrupt_checkpoint_divergence_and_fresh_run(tmp_path):
    run_dir = str(tmp_path / "run")
    ckpts = os.path.join(run_dir, "checkpoints")
    proc = _cli(run_dir, "trainer.total_training_steps=200")
    deadline = time.monotonic() + 300
    while max(_steps(run_dir), default=0) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 143, err[-3000:]
    assert time.monotonic() - sent < 120
    last = _steps(run_dir)[-1]
    assert last >= 2 and f"stopped by SIGTERM after step {last}" in err
    assert open(os.path.join(ckpts, "latest")).read().strip() == f"step_{last:08d}"  # saved at the safe point

    # 64 bytes of garbage inside the newest checkpoint's weights
    newest = os.path.join(ckpts, f"step_{last:08d}")
    distcp = sorted(f for f in os.listdir(os.path.join(newest, "model")) if f.endswith(".distcp"))[0]
    bad = os.path.join(newest, "model", distcp)
    with open(bad, "r+b") as f:
        f.seek(os.path.getsize(bad) // 2)
        f.write(os.urandom(64))
    proc = _cli(run_dir, "--resume", f"trainer.total_training_steps={last + 1}")  # an override after --resume
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"{bad} does not match the checksum" in err
    assert f"resumed from {os.path.join(ckpts, f'step_{last - 1:08d}')} at step {last - 1}" in err
    assert f"trainer.total_training_steps: 200 -> {last + 1}" in err  # the resume says what changed
    assert os.path.isdir(newest + ".corrupt") and _steps(run_dir)[-2:] == [last, last + 1]

    # a fresh run in this directory is refused before anything starts
    proc = _cli(run_dir, "--no-resume", "trainer.total_training_steps=1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "holds an earlier run" in err and "trainer.overwrite" in err
    # overwrite starts over; a learning rate of 1e30 makes the weights blow up after the first update, so
    # every later optimizer step is skipped: the run stops (exit 3) instead of saving on and rotating
    proc = _cli(run_dir, "--no-resume", "trainer.overwrite=true", "actor.lr=1e30",
                "trainer.max_consecutive_skipped_steps=2", "trainer.total_training_steps=50")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "step 3: 2 consecutive steps made no progress" in err and "optimizer steps skipped" in err
    assert _steps(run_dir) == [1, 2, 3] and not os.path.isdir(newest + ".corrupt")
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000001", "step_00000002"]  # nothing saved at step 3
    records = [json.load(open(os.path.join(ckpts, n, "integrity.json"))) for n in ("step_00000001", "step_00000002")]
    # Step 1's weights are finite but near 1e30 after the one update: their norm grew far past
    # trainer.max_weight_norm_growth, so step 1 fails too (step 2 also lies inside the streak of skips).
    assert [r["passed"] for r in records] == [False, False]
    assert records[0]["checks"]["weight_norm_growth"] > 1e20 and records[0]["checks"]["consecutive_skipped_steps"] == 0
    assert "step 1: the weights' norm grew" in err and "marked as not passing" in err


def _nan_weights_worker(rank, world_size, run_dir):
    import torch

    from fipo_megatron.config import load_config
    from fipo_megatron.guards import DivergenceError
    from fipo_megatron.trainer import Trainer

    trainer = Trainer(load_config(CONFIG, overrides=SMALL + ["parallel.tp=2", f"trainer.run_dir={run_dir}"]))
    try:
        trainer.step = 1
        trainer.save()  # finite: saved
        if rank == 1:  # a NaN on one rank only: every rank must refuse together
            with torch.no_grad():
                next(trainer.actor.model_chunks[0].parameters())[0].fill_(float("nan"))
        trainer.step = 2
        try:
            trainer.save()
        except DivergenceError as exc:
            return str(exc)
        return "saved"
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.distributed
def test_non_finite_weights_are_never_saved(tmp_path):
    from fipo_megatron.testing.distributed import run_distributed

    run_dir = str(tmp_path / "run")
    out = run_distributed(_nan_weights_worker, 2, args=(run_dir,), timeout=300)
    assert out[0] == out[1] and "step 2: the weights are not finite (rank 1: " in out[0], out
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["latest", "step_00000001"]
