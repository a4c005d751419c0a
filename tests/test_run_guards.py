"""Run guards without a model: integrity records and fallback, rotation that keeps the newest good
checkpoint, RNG files that cannot run code, the skip limit, SIGTERM with its grace period, the fresh-run
refusal, the config diff, command-line parsing and layout errors raised before anything heavy starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fipo_megatron.checkpoint.manager import CheckpointCorruptError, CheckpointManager
from fipo_megatron.guards import (DivergenceError, PreemptionHandler, SkipGuard, config_changes, prepare_run_dir,
                                  skip_reason)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")


def _save_model(value):
    def save(d):
        os.makedirs(d)
        torch.save({"w": torch.full((16,), float(value))}, os.path.join(d, "weights.pt"))
    return save


def _loader(box):
    def load(d):
        box["w"] = torch.load(os.path.join(d, "weights.pt"), weights_only=True)["w"]
    return load


def test_corrupt_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    root = str(tmp_path / "ckpt")
    mgr = CheckpointManager(root=root, keep_last=3)
    for step in (1, 2, 3):
        mgr.save(step=step, trainer_state={"data": step}, save_model=_save_model(step))
    # 64 bytes of garbage in the newest checkpoint's weights (same size: only the checksum can tell)
    bad = os.path.join(root, "step_00000003", "model", "weights.pt")
    with open(bad, "r+b") as f:
        f.seek(os.path.getsize(bad) - 80)
        f.write(os.urandom(64))
    with pytest.raises(CheckpointCorruptError, match="weights.pt does not match the checksum"):
        mgr.load(os.path.join(root, "step_00000003"))
    # and step 2 loses a file's tail (a truncated write)
    trunc = os.path.join(root, "step_00000002", "trainer_state.json")
    with open(trunc, "r+b") as f:
        f.truncate(3)
    box: dict = {}
    with caplog.at_level("ERROR"):
        path, state = mgr.load_latest_intact(load_model=_loader(box))
    assert path.endswith("step_00000001") and state["data"] == 1 and box["w"][0] == 1.0
    assert f"{bad} does not match the checksum" in caplog.text and f"{trunc} has 3 bytes" in caplog.text
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000002.corrupt", "step_00000003.corrupt"]
    # the next save continues from the intact one; the damaged copies stay out of the rotation
    mgr.save(step=2, trainer_state={"data": 22}, save_model=_save_model(22))
    assert mgr.latest().endswith("step_00000002")


def test_rotation_never_deletes_the_newest_good_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    mgr = CheckpointManager(root=root, keep_last=2)
    mgr.save(step=1, trainer_state={}, save_model=_save_model(1))
    mgr.save(step=2, trainer_state={}, save_model=_save_model(2))
    for step in (3, 4, 5):  # saved during a run of skipped steps: not passing their checks
        mgr.save(step=step, trainer_state={}, save_model=_save_model(step), passed=False,
                 checks={"consecutive_skipped_steps": step - 2})
    assert sorted(os.listdir(root)) == ["latest"] + [f"step_0000000{i}" for i in (1, 2, 3, 4, 5)]
    record = json.load(open(os.path.join(root, "step_00000005", "integrity.json")))
    assert record["passed"] is False and record["checks"] == {"consecutive_skipped_steps": 3}
    mgr.save(step=6, trainer_state={}, save_model=_save_model(6))  # good again: 2 good kept, older ones go
    assert sorted(os.listdir(root)) == ["latest"] + [f"step_0000000{i}" for i in (2, 3, 4, 5, 6)]


def test_rng_files_are_read_without_unpickling_objects(tmp_path):
    root = str(tmp_path / "ckpt")
    mgr = CheckpointManager(root=root)
    path = mgr.save(step=1, trainer_state={}, save_model=_save_model(1))
    rng = os.path.join(path, "rng", "rank_00000.pt")
    state = torch.load(rng, weights_only=True)  # tensors and numbers only
    assert isinstance(state["numpy"][1], torch.Tensor)

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    torch.save({"python": Payload()}, rng)
    record_path = os.path.join(path, "integrity.json")
    record = json.load(open(record_path))  # a doctored checkpoint comes with a matching record
    from fipo_megatron.checkpoint.manager import file_digest

    record["files"]["rng/rank_00000.pt"] = {"size": os.path.getsize(rng), "sha256": file_digest(rng)}
    json.dump(record, open(record_path, "w"))
    mgr.load(path)
    assert not (tmp_path / "ran").exists()


def test_skip_limit_and_reasons():
    assert skip_reason({}, updated=False).startswith("no update")
    assert "optimizer steps skipped" in skip_reason({"actor/num_mini_batches": 4.0, "actor/num_skipped_steps": 4.0},
                                                    updated=True)
    assert skip_reason({"actor/num_mini_batches": 4.0, "actor/num_skipped_steps": 1.0}, updated=True) is None
    assert "reward/mean is nan" in skip_reason({"reward/mean": float("nan")}, updated=True)
    guard = SkipGuard(max_consecutive=3)
    guard.observe(1, "x"), guard.observe(2, "x"), guard.observe(3, None), guard.observe(4, "x"), guard.observe(5, "x")
    with pytest.raises(DivergenceError, match="step 6: 3 consecutive steps") as info:
        guard.observe(6, "all 4 optimizer steps skipped")
    assert info.value.exit_code == 3
    SkipGuard(max_consecutive=0).observe(1, "x")  # 0: no limit


_GRACE_CHILD = """
import os, signal, time
from fipo_megatron.guards import PreemptionHandler
with PreemptionHandler(grace_s=1.0) as pre:
    os.kill(os.getpid(), signal.SIGTERM)
    assert pre.requested and pre.agreed()
    print("flagged", flush=True)
    time.sleep(30)  # a step far longer than the grace period
"""


def test_sigterm_sets_a_flag_and_the_grace_period_bounds_the_exit():
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _GRACE_CHILD], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 143 and "flagged" in proc.stdout, proc.stderr
    assert time.monotonic() - t0 < 20  # exited after the 1 s grace, not after the 30 s "step"
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler(grace_s=5.0) as pre:
        assert not pre.requested
    assert signal.getsignal(signal.SIGTERM) is before


def test_fresh_run_refuses_an_earlier_run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000009").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine")
    kw = dict(resume_requested=False, remove=True)
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoints, metrics.jsonl\).*trainer.overwrite"):
        prepare_run_dir(str(run), resume="never", overwrite=False, **kw)
    assert prepare_run_dir(str(run), resume="auto", overwrite=False, **kw) is True  # resumes instead
    assert prepare_run_dir(str(run), resume="never", overwrite=True, **kw) is False
    assert sorted(os.listdir(run)) == ["notes.txt"]  # only the run's own outputs were removed
    assert prepare_run_dir(str(tmp_path / "new"), resume="auto", overwrite=False, **kw) is False
    (run / "metrics.jsonl").write_text("{}\n")  # an earlier run that died before its first checkpoint
    with pytest.raises(ValueError, match="it holds no checkpoint to resume"):
        prepare_run_dir(str(run), resume="auto", overwrite=False, **kw)
    assert prepare_run_dir(str(run), resume="auto", overwrite=False, resume_requested=True, remove=True) is False


def test_config_changes_are_listed():
    old = {"actor": {"lr": 1e-6, "clip": 1.0}, "trainer": {"seed": 1}}
    new = {"actor": {"lr": 2e-6, "clip": 1.0}, "trainer": {"seed": 1, "overwrite": False}}
    assert config_changes(old, new) == ["actor.lr: 1e-06 -> 2e-06", "trainer.overwrite: (absent) -> False"]


def test_cli_parsing_and_early_errors(tmp_path, monkeypatch, caplog):
    from fipo_megatron import cli
    from fipo_megatron.parallel import topology

    assert cli.parse_args(["--config", "c", "--resume", "actor.lr=1"])[1] == ["actor.lr=1", "checkpoint.resume=auto"]
    assert cli.parse_args(["--config", "c", "a=1", "--no-resume", "b.c=2"])[1] == ["a=1", "b.c=2",
                                                                                    "checkpoint.resume=never"]
    ckpt = "/r/step_00000002"
    assert cli.parse_args(["--config", "c", "--resume", ckpt])[1] == [f"checkpoint.resume={ckpt}"]

    def no_heavy_work():
        raise AssertionError("the process group started before the error")

    monkeypatch.setattr(topology, "init_distributed", no_heavy_work)
    run = f"trainer.run_dir={tmp_path / 'run'}"
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"world size 3 is not divisible by tp\*pp\*cp = 2"):
        cli.main(["--config", CONFIG, run])
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tp = 8"):
        cli.main(["--config", CONFIG, run, "parallel.tp=8"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="num_layers 3 is not divisible by pp"):
        cli.main(["--config", CONFIG, run, "parallel.tp=1", "parallel.pp=2",
                  "model.tiny_overrides.num_hidden_layers=3"])
    with pytest.raises(ValueError, match="rollout.temperature=0 with rollout.n=8"):
        cli.main(["--config", CONFIG, run, "rollout.temperature=0"])
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text("actor: {lr: 0.5}\n")
    with pytest.raises(ValueError, match="holds an earlier run"):
        cli.main(["--config", CONFIG, run, "--no-resume"])
    os.makedirs(tmp_path / "run" / "checkpoints" / "step_00000002")
    with caplog.at_level("WARNING"), pytest.raises(AssertionError, match="process group started"):
        cli.main(["--config", CONFIG, run, "--resume"])  # resumes: the layout is fine, the config diff is logged
    assert "actor.lr: 0.5 -> 0.002" in caplog.text


def _norm_worker(rank, world_size):
    from fipo_megatron.guards import parameter_norm

    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3, bias=False)).to(torch.bfloat16)
    if rank == 1:
        with torch.no_grad():
            model[1].weight.mul_(1e30)  # finite, but its float32 norm would overflow
    own = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    return parameter_norm([model]), own


@pytest.mark.distributed
def test_parameter_norm_sums_every_rank_and_the_growth_guard_marks_blown_up_weights():
    from fipo_megatron.guards import WeightGrowthGuard
    from fipo_megatron.testing.distributed import run_distributed

    results = run_distributed(_norm_worker, 2)
    want = float(torch.linalg.vector_norm(torch.cat([own for _, own in results])))  # float64 over both ranks
    for got, _ in results:
        assert got == pytest.approx(want, rel=1e-12)  # one rank's norm alone would be off by about sqrt(2)

    guard = WeightGrowthGuard(max_growth=10.0)
    assert guard.check(5.0) == (True, None)  # no reference yet: nothing to compare with
    guard.start(2.0)
    assert guard.check(19.0) == (True, 9.5)
    assert guard.check(1e30)[0] is False  # one update at lr=1e30
    guard.passed(19.0)  # the reference moves only with passing checkpoints
    assert guard.check(20.0) == (True, pytest.approx(20.0 / 19.0))
    assert WeightGrowthGuard(max_growth=0).check(1e30) == (True, None)
    off = WeightGrowthGuard(max_growth=0)
    off.start(1.0)
    assert off.check(1e30) == (True, 1e30)
    with pytest.raises(ValueError, match="max_growth"):
        WeightGrowthGuard(max_growth=-1)
