"""Run checkpoints: atomic, keep-last-K, resumable (model, optimizer, LR schedule, RNG, data position, step).

Layout under ``root`` (a filesystem every rank sees)::

    step_00000040/model/            the actor's own checkpoint (Megatron dist-checkpoint: weights,
                                    optimizer, LR schedule; layout-independent)
    step_00000040/rng/rank_00003.pt python / numpy / torch (/ cuda) RNG states of each rank
    step_00000040/trainer_state.json step, data-sampler position, anything else the trainer keeps
    latest                           "step_00000040", replaced atomically

Every rank writes into ``step_XXXXXXXX.tmp``; after a barrier rank 0 renames it to its final name and only
then rewrites ``latest``. A process killed at any point therefore leaves ``latest`` naming a complete
checkpoint (a stale ``.tmp`` directory is removed by the next save). Old checkpoints beyond ``keep_last``
are deleted after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Callable

import numpy as np
import torch

from fipo_megatron.checkpoint.fs import atomic_write, fsync_dir
from fipo_megatron.log import get_logger

logger = get_logger(__name__)

LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def capture_rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, and CUDA when initialised)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda tmp: _write_text(tmp, text))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _noop() -> None:
    pass


class CheckpointManager:
    """Saves and finds run checkpoints under ``root``; call ``save``/``load`` on every rank.

    ``barrier`` synchronises the ranks (``torch.distributed.barrier`` in a job; omitted in one process).
    """

    def __init__(self, *, root: str, keep_last: int = 2, rank: int = 0, barrier: Callable[[], None] | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.keep_last, self.rank = root, keep_last, rank
        self._barrier = barrier or _noop

    def step_dirs(self) -> list[str]:
        """Complete checkpoint directories, oldest first."""
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if _STEP_DIR.match(n))
        return [os.path.join(self.root, n) for n in names]

    def latest(self) -> str | None:
        """The checkpoint ``latest`` names, or None. A ``latest`` naming a missing directory is an error."""
        pointer = os.path.join(self.root, LATEST_FILE)
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(self.root, name)
        if not _STEP_DIR.match(name) or not os.path.isfile(os.path.join(path, "trainer_state.json")):
            raise ValueError(f"{pointer} names {name!r}, which is not a complete checkpoint")
        return path

    def save(self, *, step: int, trainer_state: dict, save_model: Callable[[str], None]) -> str:
        """Write checkpoint ``step``: ``save_model(dir)`` on every rank, RNG per rank, state by rank 0."""
        name = f"step_{step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, name + ".tmp")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for stale in os.listdir(self.root):  # left by a save that was killed
                if stale.endswith(".tmp") and _STEP_DIR.match(stale[:-4]):
                    shutil.rmtree(os.path.join(self.root, stale), ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"))
        self._barrier()
        save_model(os.path.join(tmp, "model"))
        torch.save(capture_rng_state(), os.path.join(tmp, "rng", f"rank_{self.rank:05d}.pt"))
        self._barrier()
        if self.rank == 0:
            _write_atomic(os.path.join(tmp, "trainer_state.json"), json.dumps({"step": step, **trainer_state}, indent=1))
            if os.path.exists(final):  # re-saving a step (a resumed run): move the old copy aside first
                shutil.rmtree(final + ".old", ignore_errors=True)
                os.rename(final, final + ".old")
            os.rename(tmp, final)
            fsync_dir(self.root)
            _write_atomic(os.path.join(self.root, LATEST_FILE), name + "\n")
            shutil.rmtree(final + ".old", ignore_errors=True)
            for old in self.step_dirs()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        self._barrier()
        return final

    def load(self, path: str, *, load_model: Callable[[str], None] | None = None, restore_rng: bool = True) -> dict:
        """Read checkpoint ``path``: ``load_model(path/model)``, this rank's RNG, and the trainer state."""
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if load_model is not None:
            load_model(os.path.join(path, "model"))
        if restore_rng:
            rng_file = os.path.join(path, "rng", f"rank_{self.rank:05d}.pt")
            if os.path.isfile(rng_file):
                restore_rng_state(torch.load(rng_file, weights_only=False))
            else:
                logger.warning("no RNG state for rank %d in %s (resumed with a different world size?)", self.rank, path)
        return state
