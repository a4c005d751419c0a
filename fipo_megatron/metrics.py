"""Per-step metrics: ``metrics.jsonl`` always, TensorBoard and wandb when configured.

One JSON object per step (``{"step": 3, "reward/mean": ..., "actor/pg_loss": ..., "timing/rollout": ...}``),
flushed and fsynced as it is written, so a crash or ``kill -9`` loses nothing already logged. On resume
from step k, lines of steps > k (written after that checkpoint by the killed run) are dropped first, so
the file reads as one uninterrupted run. Only rank 0 writes; other ranks' ``log`` is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from fipo_megatron.log import get_logger

logger = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"


class PhaseTimer:
    """Wall-clock seconds of one step's named phases, summed over repeats: ``with timer("rollout"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """``timing/<phase>`` for every phase timed so far."""
        return {f"timing/{k}": v for k, v in self.seconds.items()}


def response_length_metrics(lengths: list[int], *, max_response_length: int) -> dict[str, float]:
    """``response_length/{mean,median,min,max,q25,q75,clip_ratio}`` (clip: responses at the length cap)."""
    if not lengths:
        return {}
    arr = np.asarray(lengths, dtype=np.float64)
    q25, median, q75 = np.quantile(arr, [0.25, 0.5, 0.75])
    return {"response_length/mean": float(arr.mean()), "response_length/median": float(median),
            "response_length/min": float(arr.min()), "response_length/max": float(arr.max()),
            "response_length/q25": float(q25), "response_length/q75": float(q75),
            "response_length/clip_ratio": float(np.mean(arr >= max_response_length))}


def _clean(value: Any) -> Any:
    """JSON-safe scalars: numpy/torch numbers -> python; NaN/inf -> None (JSON has neither)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_after_step(path: str, step: int) -> int:
    """Drop lines of steps > ``step`` from a metrics file (atomically); return how many were dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                dropped += 1
                continue
            if int(row.get("step", 0)) > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        from fipo_megatron.checkpoint.fs import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.writelines(kept)

        atomic_write(path, write)
    return dropped


def read_metrics(path: str) -> list[dict]:
    """All rows of a metrics.jsonl file (ignores a trailing partial line)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


class MetricsLogger:
    """Writes one row per step to jsonl (+ TensorBoard, + wandb). Use as a context manager or ``close()``."""

    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "fipo_megatron", wandb_run_name: str | None = None,
                 config: dict | None = None, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._file = self._tb = self._wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None:
            dropped = truncate_after_step(self.path, resume_step)
            if dropped:
                logger.info("metrics: dropped %d rows logged after the resumed step %d", dropped, resume_step)
        elif os.path.exists(self.path):
            truncate_after_step(self.path, -1)  # a fresh run in an old directory starts a fresh file
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("logging.tensorboard needs tensorboard: pip install 'fipo_megatron[logging]'") from exc
            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"), purge_step=resume_step)
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError as exc:
                raise ImportError("logging.wandb needs wandb: pip install 'fipo_megatron[logging]'") from exc
            self._wandb = wandb_mod.init(project=wandb_project, name=wandb_run_name, config=config or {},
                                         dir=run_dir, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` for ``step`` everywhere configured; flushed to disk before returning."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _clean(v) for k, v in sorted(metrics.items())}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Close metrics.jsonl and the TensorBoard/wandb writers (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
