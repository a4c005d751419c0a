"""Run checkpoints: atomic, integrity-checked, keep-last-K, resumable (model, optimizer, LR schedule, RNG,
data position, step).

Layout under ``root`` (a filesystem every rank sees)::

    step_00000040/model/            the actor's own checkpoint (Megatron dist-checkpoint: weights,
                                    optimizer, LR schedule; layout-independent)
    step_00000040/rng/rank_00003.pt python / numpy / torch (/ cuda / Megatron tracker) RNG states of each
                                    rank (tensors and numbers only: read with ``weights_only=True``)
    step_00000040/trainer_state.json step, data-sampler position, anything else the trainer keeps
    step_00000040/integrity.json    size and SHA-256 of every file above, and the checks the weights passed
    latest                           "step_00000040", replaced atomically

Every rank writes into ``step_XXXXXXXX.tmp``; after a barrier rank 0 renames it to its final name and only
then rewrites ``latest``. A process killed at any point therefore leaves ``latest`` naming a complete
checkpoint (a stale ``.tmp`` directory is removed by the next save).

Integrity: the ranks hash the files between them (file ``i`` on rank ``i % world_size``) and rank 0
writes ``integrity.json``. :meth:`CheckpointManager.load_latest_intact` verifies ``latest`` the same way
and, if a file is missing, truncated or altered, names it, moves that checkpoint aside
(``step_XXXXXXXX.corrupt``) and falls back to the next older intact one.

Rotation keeps the newest ``keep_last`` checkpoints that are *good* (complete on disk and saved with
``passed=True``, i.e. finite weights and no run of skipped steps), and deletes only checkpoints older
than all of those: the newest good checkpoint survives any number of later bad ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from typing import Any, Callable

import numpy as np
import torch

from fipo_megatron.checkpoint.fs import atomic_write, fsync_dir
from fipo_megatron.log import get_logger

logger = get_logger(__name__)

LATEST_FILE = "latest"
INTEGRITY_FILE = "integrity.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_HASH_CHUNK = 16 << 20


class CheckpointCorruptError(ValueError):
    """A checkpoint's files disagree with its integrity record (the message names the file)."""


def _megatron_rng_tracker():
    """Megatron's RNG-state tracker (``tensor_parallel.random``: the TP-rank and data-parallel streams it
    forks into for initialisation and dropout) when megatron-core has created one in this process, else
    None. Never imports megatron-core: a process without a model has no tracker to save."""
    module = sys.modules.get("megatron.core.tensor_parallel.random")
    if module is None or not getattr(module, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False):
        return None
    tracker = module.get_cuda_rng_tracker()
    return tracker if tracker.is_initialized() else None


def capture_rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, CUDA when initialised, and Megatron's tracker
    when there is one), as tensors and numbers only, so that ``torch.load(weights_only=True)`` reads them
    back without unpickling objects. The one place a run's RNG state is saved: the actor's own checkpoint
    holds none."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_rng_tracker()
    if tracker is not None:
        streams = tracker.get_states()
        # A CUDA-graph-safe tracker keeps generator objects, which weights_only cannot read: not saved.
        if all(isinstance(t, torch.Tensor) for t in streams.values()):
            state["megatron_tracker"] = {name: t.clone() for name, t in streams.items()}
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`. Megatron's tracker is restored when the state holds one and this
    process has a tracker (build the model first)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tracker = _megatron_rng_tracker() if "megatron_tracker" in state else None
    if tracker is not None:
        tracker.set_states({name: t.clone() for name, t in state["megatron_tracker"].items()})


def _load_rng_file(path: str) -> dict | None:
    """Read an RNG file with ``weights_only=True``; None (with a warning) for a file in an older layout."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - e.g. an older layout that pickled numpy arrays
        logger.warning("RNG state %s is not readable as tensors (%s); this rank keeps its current RNG", path,
                       str(exc).splitlines()[0])
        return None
    if not isinstance(state.get("python"), list):
        logger.warning("RNG state %s is in an older layout; this rank keeps its current RNG", path)
        return None
    return state


def file_digest(path: str) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _list_files(path: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), path)
            if rel != INTEGRITY_FILE:
                out.append(rel)
    return sorted(out)


def _write_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda tmp: _write_text(tmp, text))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _noop() -> None:
    pass


def _gather_one(obj: Any) -> list[Any]:
    return [obj]


def read_integrity(path: str) -> dict | None:
    """The integrity record of checkpoint ``path``, or None for a checkpoint written without one."""
    record = os.path.join(path, INTEGRITY_FILE)
    if not os.path.isfile(record):
        return None
    try:
        with open(record) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"{record} is not readable ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointCorruptError(f"{record} is not an integrity record")
    return data


def check_files(path: str, files: dict[str, dict], names: list[str]) -> str | None:
    """The first problem with ``names`` (relative paths) of checkpoint ``path`` against ``files``, or None."""
    for rel in names:
        full = os.path.join(path, rel)
        want = files[rel]
        if not os.path.isfile(full):
            return f"{full} is missing"
        size = os.path.getsize(full)
        if size != want["size"]:
            return f"{full} has {size} bytes, {want['size']} were written"
        if file_digest(full) != want["sha256"]:
            return f"{full} does not match the checksum written with it"
    return None


class CheckpointManager:
    """Saves and finds run checkpoints under ``root``; call ``save``/``load`` on every rank.

    ``barrier`` synchronises the ranks and ``all_gather`` returns one object from every rank
    (``torch.distributed.barrier`` / ``all_gather_object`` in a job; omitted in one process, where this
    process hashes every file itself).
    """

    def __init__(self, *, root: str, keep_last: int = 2, rank: int = 0, barrier: Callable[[], None] | None = None,
                 world_size: int = 1, all_gather: Callable[[Any], list[Any]] | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if world_size > 1 and all_gather is None:
            raise ValueError("CheckpointManager with world_size > 1 needs all_gather")
        self.root, self.keep_last, self.rank, self.world_size = root, keep_last, rank, world_size
        self._barrier = barrier or _noop
        self._all_gather = all_gather or _gather_one

    def step_dirs(self) -> list[str]:
        """Checkpoint directories (complete or not), oldest first."""
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

    # ------------------------------------------------------------------ save
    def save(self, *, step: int, trainer_state: dict, save_model: Callable[[str], None],
             passed: bool = True, checks: dict | None = None) -> str:
        """Write checkpoint ``step``: ``save_model(dir)`` on every rank, RNG per rank, state by rank 0.

        ``passed``: the weights passed the caller's checks (``checks`` records which); rotation never
        deletes the newest checkpoint saved with ``passed=True``.
        """
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
            _write_atomic(os.path.join(tmp, "trainer_state.json"),
                          json.dumps({"step": step, **trainer_state}, indent=1))
        self._barrier()
        files = self._hash_share(tmp)
        if self.rank == 0:
            record = {"files": dict(sorted(files.items())), "passed": bool(passed), "checks": checks or {}}
            _write_atomic(os.path.join(tmp, INTEGRITY_FILE), json.dumps(record, indent=1))
            if os.path.exists(final):  # re-saving a step (a resumed run): move the old copy aside first
                shutil.rmtree(final + ".old", ignore_errors=True)
                os.rename(final, final + ".old")
            os.rename(tmp, final)
            fsync_dir(self.root)
            _write_atomic(os.path.join(self.root, LATEST_FILE), name + "\n")
            shutil.rmtree(final + ".old", ignore_errors=True)
            self._rotate()
            logger.info("saved checkpoint %s%s", final, "" if passed else " (marked as not passing its checks)")
        self._barrier()
        return final

    def _hash_share(self, path: str) -> dict[str, dict]:
        """Size and digest of every file under ``path``, the work spread over the ranks (all ranks get all)."""
        names = _list_files(path)
        mine = {rel: {"size": os.path.getsize(os.path.join(path, rel)),
                      "sha256": file_digest(os.path.join(path, rel))}
                for i, rel in enumerate(names) if i % self.world_size == self.rank}
        merged: dict[str, dict] = {}
        for part in self._all_gather(mine):
            merged.update(part)
        return merged

    def is_good(self, path: str) -> bool:
        """Cheap test used by rotation: complete on disk (files present at their recorded sizes) and saved
        with ``passed=True``. A checkpoint written without a record counts as good when it is complete."""
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            return False
        try:
            record = read_integrity(path)
        except CheckpointCorruptError:
            return False
        if record is None:
            return True
        for rel, want in record["files"].items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full) or os.path.getsize(full) != want["size"]:
                return False
        return bool(record.get("passed", True))

    def _rotate(self) -> None:
        dirs = self.step_dirs()
        good = [d for d in dirs if self.is_good(d)]
        if not good:
            return
        keep = good[-self.keep_last:]
        for old in dirs:
            if old < keep[0]:  # zero-padded step numbers: name order is step order
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def verify(self, path: str) -> str | None:
        """The first problem found in checkpoint ``path`` (a message naming the file), or None if intact.

        Collective when ``world_size > 1`` (the ranks share the hashing). A checkpoint written without an
        integrity record is only checked for completeness.
        """
        problem = None
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            problem = f"{os.path.join(path, 'trainer_state.json')} is missing"
        record = None
        if problem is None:
            try:
                record = read_integrity(path)
            except CheckpointCorruptError as exc:
                problem = str(exc)
        mine = None
        if record is not None:
            names = sorted(record["files"])
            mine = check_files(path, record["files"], [n for i, n in enumerate(names)
                                                       if i % self.world_size == self.rank])
        found = [p for p in self._all_gather(problem or mine) if p]
        return found[0] if found else None

    def _candidates(self) -> list[str]:
        """``latest`` (or the newest checkpoint if the pointer is missing or broken), then older ones."""
        dirs = self.step_dirs()
        try:
            first = self.latest()
        except ValueError as exc:
            logger.error("%s; looking for the newest intact checkpoint instead", exc)
            first = None
        if first is None:
            return dirs[::-1]
        return [first] + [d for d in dirs[::-1] if d < first]

    def load_latest_intact(self, *, load_model: Callable[[str], None] | None = None,
                           restore_rng: bool = True) -> tuple[str, dict] | None:
        """Load the newest checkpoint that passes :meth:`verify`, starting from ``latest``; None if there is none.

        A checkpoint that fails is named with its bad file, renamed to ``step_XXXXXXXX.corrupt`` (kept for
        inspection, ignored by rotation) and the next older one is tried.
        """
        for path in self._candidates():
            problem = self.verify(path)
            if problem is None:
                return path, self.load(path, load_model=load_model, restore_rng=restore_rng, verified=True)
            logger.error("checkpoint %s is damaged: %s; falling back to the previous checkpoint", path, problem)
            self._barrier()
            if self.rank == 0:
                self._quarantine(path)
            self._barrier()
        return None

    def _quarantine(self, path: str) -> None:
        target, i = path + ".corrupt", 1
        while os.path.exists(target):
            target, i = f"{path}.corrupt{i}", i + 1
        os.rename(path, target)
        pointer = os.path.join(self.root, LATEST_FILE)
        if os.path.isfile(pointer):
            with open(pointer) as f:
                if f.read().strip() == os.path.basename(path):
                    os.remove(pointer)  # the next save writes a new one; until then resume searches the dirs
        fsync_dir(self.root)

    def load(self, path: str, *, load_model: Callable[[str], None] | None = None, restore_rng: bool = True,
             verified: bool = False) -> dict:
        """Read checkpoint ``path``: ``load_model(path/model)``, this rank's RNG, and the trainer state.

        Unless ``verified``, the files are first checked against the integrity record
        (``CheckpointCorruptError`` naming the bad file).
        """
        if not verified:
            problem = self.verify(path)
            if problem is not None:
                raise CheckpointCorruptError(f"checkpoint {path} is damaged: {problem}")
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if load_model is not None:
            load_model(os.path.join(path, "model"))
        if restore_rng:
            rng_file = os.path.join(path, "rng", f"rank_{self.rank:05d}.pt")
            if os.path.isfile(rng_file):
                rng = _load_rng_file(rng_file)
                if rng is not None:
                    restore_rng_state(rng)
            else:
                logger.warning("no RNG state for rank %d in %s (resumed with a different world size?)", self.rank, path)
        return state
