"""Run guards: stop a run that diverged, never checkpoint broken weights, and stop cleanly when pre-empted.

    skips = SkipGuard(max_consecutive=cfg.trainer.max_consecutive_skipped_steps)
    skips.observe(step, reason=skip_reason(metrics))      # DivergenceError after N skipped steps in a row
    bad = first_non_finite_parameter(model_chunks)        # before every save (collective)
    with PreemptionHandler(grace_s=cfg.trainer.sigterm_grace_s) as pre:
        ... if pre.agreed(): save at this safe point, then raise pre.error(step)

Every stop raises a ``RunStopped`` subclass carrying the process exit code; the command line logs its
message and exits with that code (non-zero), so a scheduler sees a failed job, not a finished one.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
from typing import Iterable

import torch
import torch.distributed as dist

from fipo_megatron.log import get_logger

logger = get_logger(__name__)

EXIT_DIVERGED = 3
EXIT_PREEMPTED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class RunStopped(RuntimeError):
    """The run stopped on purpose; ``exit_code`` is what the process should exit with."""

    exit_code = 1


class DivergenceError(RunStopped):
    """Too many consecutive steps without a successful update, or weights that are not finite."""

    exit_code = EXIT_DIVERGED


class PreemptedError(RunStopped):
    """SIGTERM arrived; the run saved at the next safe point (if it could) and stops."""

    exit_code = EXIT_PREEMPTED


def skip_reason(metrics: dict[str, float], *, updated: bool) -> str | None:
    """Why a step made no progress, or None: no update at all (``updated`` False), every optimizer step
    skipped for a non-finite loss or gradient, or a non-finite reward mean."""
    if not updated:
        return "no update (no group with mixed rewards, or no batch)"
    num_mini = metrics.get("actor/num_mini_batches", 0.0)
    skipped = metrics.get("actor/num_skipped_steps", 0.0)
    if num_mini and skipped >= num_mini:
        return f"all {int(num_mini)} optimizer steps skipped (non-finite loss or gradient)"
    for key in ("reward/mean", "actor/pg_loss"):
        value = metrics.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} is {value}"
    return None


class SkipGuard:
    """Counts consecutive steps without progress; ``DivergenceError`` once ``max_consecutive`` is reached
    (0 disables the limit). Every rank sees the same metrics decisions, so every rank raises together."""

    def __init__(self, *, max_consecutive: int):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.streak = 0

    def observe(self, step: int, reason: str | None) -> None:
        """Record step ``step``'s outcome (``reason`` None: it made progress)."""
        if reason is None:
            self.streak = 0
            return
        self.streak += 1
        logger.warning("step %d made no progress (%s); %d in a row", step, reason, self.streak)
        if self.max_consecutive and self.streak >= self.max_consecutive:
            raise DivergenceError(
                f"step {step}: {self.streak} consecutive steps made no progress (last: {reason}); stopping "
                f"(trainer.max_consecutive_skipped_steps={self.max_consecutive}). The run has diverged or its "
                "rewards carry no signal: lower actor.lr, check the reward function and rollout.temperature, "
                "and resume from the last checkpoint saved before the streak")


def first_non_finite_parameter(model_chunks: Iterable[torch.nn.Module], *, group=None) -> str | None:
    """The name of the first parameter holding NaN/Inf on any rank (every rank gets the same answer), or None.

    Collective over ``group`` (the world by default) when torch.distributed is initialised.
    """
    bad = None
    for i, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            if not bool(torch.isfinite(param.detach()).all()):
                bad = f"{name}" if i == 0 else f"chunk {i}: {name}"
                break
        if bad is not None:
            break
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        found: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(found, (dist.get_rank(), bad), group=group)
        named = [f"rank {r}: {b}" for r, b in found if b is not None]
        return named[0] if named else None
    return bad


_NORM_CHUNK = 1 << 24  # elements per float64 slice: at most 128 MiB of temporary per slice


def parameter_norm(model_chunks: Iterable[torch.nn.Module], *, group=None) -> float:
    """L2 norm of the parameters every rank of ``group`` (the world by default) holds, the same on every rank.

    A parameter held by several ranks (data-parallel replicas, TP-duplicated norms) counts once per holder.
    That weighting is fixed for a run's layout, so the ratio of two calls measures how much the weights
    grew; it is not the model's own norm. The squares are summed in float64, slice by slice: a float32 norm
    overflows for weights near 1e20 and above (exactly the blown-up weights this is for), and a float64
    copy of a whole embedding shard would be a large temporary on the GPU. Collective over ``group`` when
    torch.distributed is initialised.
    """
    total = 0.0
    for chunk in model_chunks:
        for param in chunk.parameters():
            flat = param.detach().reshape(-1)
            for start in range(0, flat.numel(), _NORM_CHUNK):
                piece = flat[start:start + _NORM_CHUNK]
                total += float(torch.linalg.vector_norm(piece, dtype=torch.float64)) ** 2
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        from fipo_megatron.parallel.topology import collective_device

        t = torch.tensor([total], dtype=torch.float64, device=collective_device(group))
        dist.all_reduce(t, group=group)
        total = float(t.item())
    return math.sqrt(total)


class WeightGrowthGuard:
    """Finite weights can still be ruined: one update at a learning rate of 1e30 leaves every weight near
    1e30, and such a checkpoint would pass the finite check and push the last good one out of rotation.

    This guard compares the weights' norm (:func:`parameter_norm`) at each save with the norm at the last
    save that passed (at first: the weights the run started or resumed from). Growth beyond
    ``max_growth``-fold fails the check; the checkpoint is still written (its state may be worth a look)
    but marked as not passing, so rotation keeps the older good one. RL fine-tuning moves a model's norm
    by well under a percent per step, so the default of 10x only fires on a run that has blown up.
    ``max_growth`` 0 turns the check off.
    """

    def __init__(self, *, max_growth: float):
        if max_growth < 0:
            raise ValueError(f"max_growth must be >= 0, got {max_growth}")
        self.max_growth = max_growth
        self.reference: float | None = None

    def start(self, norm: float) -> None:
        """The norm of the weights the run starts (or resumes) from."""
        self.reference = norm

    def check(self, norm: float) -> tuple[bool, float | None]:
        """``(ok, growth)`` for weights of this ``norm``: growth is ``norm / reference`` (None without a
        reference). A passing checkpoint then becomes the reference through :meth:`passed`."""
        if self.reference is None or self.reference <= 0:
            return True, None
        growth = norm / self.reference
        return (self.max_growth == 0 or growth <= self.max_growth), growth

    def passed(self, norm: float) -> None:
        """Record that a checkpoint with weights of this norm passed every check."""
        self.reference = norm


class PreemptionHandler:
    """SIGTERM (what SLURM and Kubernetes send before killing a job) sets a flag instead of killing the
    process; the trainer saves at its next safe point and stops. If the process is still alive ``grace_s``
    seconds after the signal (a step longer than the grace period), it exits with ``EXIT_PREEMPTED`` at
    once: the last checkpoint on disk stays intact because saves are atomic.

    Install on the main thread (signal handlers can only be set there); elsewhere it is inert.
    """

    def __init__(self, *, grace_s: float):
        if not grace_s > 0:
            raise ValueError(f"grace_s must be > 0, got {grace_s}")
        self.grace_s = grace_s
        self.received_at: float | None = None
        self._previous = None
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_sigterm(self, signum, frame) -> None:
        if self.received_at is not None:
            return
        self.received_at = time.monotonic()
        logger.warning("SIGTERM received: saving at the next safe point, exiting within %.0f s", self.grace_s)
        self._timer = threading.Timer(self.grace_s, self._hard_exit)
        self._timer.daemon = True
        self._timer.start()

    def _hard_exit(self) -> None:
        logger.error("SIGTERM grace period (%.0f s) is over before a safe point; exiting now without saving "
                     "(the last checkpoint on disk is intact)", self.grace_s)
        os._exit(EXIT_PREEMPTED)

    @property
    def requested(self) -> bool:
        """Whether this process received SIGTERM."""
        return self.received_at is not None

    def agreed(self) -> bool:
        """Whether any rank received SIGTERM (collective when distributed: call it at the same point on
        every rank), so that all ranks stop at the same step."""
        flag = self.requested
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from fipo_megatron.parallel.topology import collective_device

            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def error(self, step: int, *, saved: str | None) -> PreemptedError:
        """The exception that ends the run after the safe point at ``step``."""
        where = f"saved {saved}" if saved else "nothing new to save"
        return PreemptedError(f"stopped by SIGTERM after step {step} ({where}); resume with --resume")


# What a run writes into its run_dir (trainer, metrics, tiny model); an earlier run is recognised by these.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "token_records.jsonl", "config.yaml", "tensorboard", "wandb", "hf_init")


def has_checkpoint(run_dir: str) -> bool:
    """Whether ``run_dir/checkpoints`` holds a checkpoint (or a ``latest`` pointer) to resume from."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return False
    return any(n == "latest" or (n.startswith("step_") and "." not in n) for n in os.listdir(root))


def prepare_run_dir(run_dir: str, *, resume: str, resume_requested: bool, overwrite: bool, remove: bool) -> bool:
    """Refuse to start a fresh run on top of an earlier run's files; return whether the run resumes.

    A run resumes when ``resume`` is a path, or "auto" and ``run_dir`` holds a checkpoint. Otherwise it is
    fresh, and a ``run_dir`` holding an earlier run's outputs (``RUN_OUTPUTS``) is an error (ValueError
    naming them): its checkpoints' higher step numbers would outrank the new run's in rotation and
    ``latest``, and its metrics would be overwritten. ``resume_requested`` (``--resume`` with nothing to
    resume) accepts the directory as it is; ``overwrite`` removes those outputs first (when ``remove``:
    only one process of the job should).
    """
    if resume not in ("auto", "never"):
        return True
    if resume == "auto" and has_checkpoint(run_dir):
        return True
    earlier = sorted(n for n in RUN_OUTPUTS if os.path.exists(os.path.join(run_dir, n)))
    if not earlier or resume_requested:
        return False
    if not overwrite:
        why = "checkpoint.resume=never" if resume == "never" else "it holds no checkpoint to resume"
        raise ValueError(f"trainer.run_dir {run_dir!r} holds an earlier run ({', '.join(earlier)}) and this run starts "
                         f"fresh ({why}); choose a new trainer.run_dir, pass --resume, or set trainer.overwrite=true "
                         "to delete the earlier run's files")
    if remove:
        logger.warning("trainer.overwrite: removing the earlier run's %s from %s", ", ".join(earlier), run_dir)
        for name in earlier:
            path = os.path.join(run_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    return False


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two YAML-layout configs."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            fmt = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            lines.append(f"{key}: {fmt(va)} -> {fmt(vb)}")
    return lines
