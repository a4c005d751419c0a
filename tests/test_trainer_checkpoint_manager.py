"""Run checkpoint manager: atomic saves (a kill mid-write leaves the previous checkpoint loadable),
keep-last-K, the ``latest`` pointer, RNG round trip."""

from __future__ import annotations

import multiprocessing as mp
import os
import random

import numpy as np
import pytest
import torch

from fipo_megatron.checkpoint.manager import CheckpointManager


def _save_model(value):
    def save(d):
        os.makedirs(d)
        torch.save({"w": torch.full((4,), float(value))}, os.path.join(d, "weights.pt"))
    return save


def _load_into(box):
    def load(d):
        box["w"] = torch.load(os.path.join(d, "weights.pt"))["w"]
    return load


def _killed_save(root):
    mgr = CheckpointManager(root=root, keep_last=2)

    def dying_save(d):
        os.makedirs(d)
        with open(os.path.join(d, "weights.pt"), "wb") as f:
            f.write(b"half a tensor")
            f.flush()
        os._exit(9)  # a kill -9 in the middle of writing

    mgr.save(step=3, trainer_state={"data": {"epoch": 0, "index": 99}}, save_model=dying_save)


def test_kill_during_save_keeps_previous(tmp_path):
    root = str(tmp_path / "ckpt")
    mgr = CheckpointManager(root=root, keep_last=2)
    assert mgr.latest() is None
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    mgr.save(step=2, trainer_state={"data": {"epoch": 0, "index": 8}}, save_model=_save_model(2.0))
    expect = (random.random(), np.random.rand(), torch.rand(1).item())

    proc = mp.get_context("fork").Process(target=_killed_save, args=(root,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    assert os.path.isdir(os.path.join(root, "step_00000003.tmp"))  # the half-written one is there ...
    path = CheckpointManager(root=root).latest()                     # ... but latest still names step 2
    assert path.endswith("step_00000002")
    box: dict = {}
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    state = CheckpointManager(root=root).load(path, load_model=_load_into(box))
    assert state == {"step": 2, "data": {"epoch": 0, "index": 8}}
    assert torch.equal(box["w"], torch.full((4,), 2.0))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect  # RNG restored

    # the next save cleans the stale temp dir; keep_last=2 prunes the oldest
    for step in (3, 4, 5):
        mgr.save(step=step, trainer_state={}, save_model=_save_model(step))
    assert sorted(os.listdir(root)) == ["latest", "step_00000004", "step_00000005"]
    assert mgr.latest().endswith("step_00000005")
    # re-saving an existing step (a resumed run) replaces it in place
    mgr.save(step=5, trainer_state={"again": True}, save_model=_save_model(55))
    box = {}
    assert mgr.load(mgr.latest(), load_model=_load_into(box))["again"] is True and box["w"][0] == 55


def test_bad_latest_pointer(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "latest").write_text("step_00000009\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        CheckpointManager(root=str(root)).latest()
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(root=str(root), keep_last=0)
