"""Run a function on N real gloo processes on CPU (or NCCL ones, one GPU each) and collect what each rank returns.

    from fipo_megatron.testing.distributed import run_distributed
    results = run_distributed(my_fn, world_size=4, args=(x,))   # list indexed by rank

``my_fn(rank, world_size, *args)`` runs in a forked child with ``torch.distributed`` already initialised
(gloo, a FileStore rendezvous, so no TCP port can collide) and ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
set. Its return value (anything picklable: tensors, dicts, floats) comes back to the parent. An
exception on any rank is re-raised in the parent with that rank's traceback; a hang is killed after
``timeout`` seconds. Children run single-threaded, so N ranks do not oversubscribe a small machine's cores.

Fork (not spawn) keeps start-up cheap: megatron-core takes ~4 s to import, and a forked child inherits
the parent's imports. Where a GPU is visible the children are spawned instead (CUDA does not survive a
fork), so ``fn`` must then be importable: a module-level function. ``FIPO_MP_START_METHOD=fork|spawn``
overrides the choice. The parent must not have initialised
torch.distributed itself.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from typing import Any, Callable


def _worker(fn, rank, world_size, init_file, args, kwargs, queue, extra_env, backend, ranks_per_node):
    try:
        os.environ.update(extra_env)
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                           "LOCAL_RANK": str(rank % ranks_per_node), "LOCAL_WORLD_SIZE": str(ranks_per_node)})
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        kwargs_init = {}
        if backend == "nccl":
            torch.cuda.set_device(rank % ranks_per_node)
            kwargs_init["device_id"] = torch.device("cuda", rank % ranks_per_node)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                **kwargs_init)
        try:
            result = fn(rank, world_size, *args, **kwargs)
        finally:
            try:
                _teardown_megatron()
                dist.barrier()
                dist.destroy_process_group()
            except Exception:
                pass
        queue.put((rank, True, _dumps(result)))
    except BaseException:  # report everything, including SystemExit/KeyboardInterrupt from the worker
        queue.put((rank, False, traceback.format_exc()))


def _dumps(obj) -> bytes:
    # torch registers fd-sharing reducers with multiprocessing's pickler; those break once the child
    # exits, so results travel as plain torch.save bytes.
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _teardown_megatron() -> None:
    import sys

    # A worker that never touched Megatron must not pay for importing it (~4 s) just to tear nothing down.
    if "megatron.core.parallel_state" in sys.modules:
        from fipo_megatron.parallel.topology import destroy_parallel

        destroy_parallel()


def _start_method(backend: str, requested: str | None = None) -> str:
    """Fork where CUDA is out of the picture (CPU machines, CI); spawn where it is visible: a process that
    has asked CUDA anything (even ``torch.cuda.is_available()``) cannot fork children that use it.
    ``requested`` (the caller's ``start_method``) wins over both and over ``$FIPO_MP_START_METHOD``."""
    forced = requested or os.environ.get("FIPO_MP_START_METHOD")
    if forced:
        if forced not in ("fork", "spawn"):
            raise ValueError(f"start_method (or $FIPO_MP_START_METHOD) must be 'fork' or 'spawn', got {forced!r}")
        return forced
    import torch

    return "spawn" if backend == "nccl" or torch.cuda.is_available() else "fork"


def run_distributed(fn: Callable[..., Any], world_size: int, *, args: tuple = (), kwargs: dict | None = None,
                    timeout: float = 300.0, env: dict[str, str] | None = None, backend: str = "gloo",
                    ranks_per_node: int | None = None, start_method: str | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return results by rank.

    ``start_method="spawn"`` gives each rank a fresh interpreter (a few seconds of imports) where a forked
    rank would inherit the parent's state: memory measurements need it, since a forked rank inherits the
    parent's heap, and in a long test session its freed buffers were seen to stay resident.

    ``backend="nccl"`` (GPU benchmarks) puts rank r on ``cuda:r``; it needs ``world_size`` GPUs, since NCCL
    refuses two ranks on one device. ``ranks_per_node``: pretend the ranks sit on nodes of this many
    (``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` as torchrun would set them); default one node."""
    import torch.distributed as dist

    ranks_per_node = ranks_per_node or world_size
    if world_size % ranks_per_node:
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must divide world_size ({world_size})")

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        import torch

        if torch.cuda.device_count() < world_size:
            raise ValueError(f"backend='nccl' needs one GPU per rank: {world_size} ranks, "
                             f"{torch.cuda.device_count()} GPU(s) visible")

    if dist.is_available() and dist.is_initialized():
        # Forked children would inherit the parent's process group and hang in its teardown.
        raise RuntimeError("run_distributed needs a parent process without a torch.distributed process group; "
                           "a test left one initialised (destroy it, or run that test in run_distributed too)")
    import threading

    # Threads alive in the parent at fork time are the usual cause of a hung child (a lock they held is
    # copied locked); name them in the timeout message.
    parent_threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    ctx = mp.get_context(_start_method(backend, start_method))
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="fipo_dist_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, init_file, args, kwargs or {}, queue, env or {},
                                                          backend, ranks_per_node),
                             daemon=False) for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        import queue as queue_mod
        import time

        deadline = time.monotonic() + timeout
        try:
            while len(results) + len(errors) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"distributed run of {fn.__name__} on {world_size} ranks exceeded {timeout:.0f} s; "
                                       f"finished ranks: {sorted(results)}, failed: {sorted(errors)}; threads in the parent "
                                       f"at fork: {parent_threads or 'none'}")
                try:
                    rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                            and r not in results and r not in errors]
                    if dead:
                        raise RuntimeError(f"rank(s) {dead} of {fn.__name__} died with exit codes "
                                           f"{[procs[r].exitcode for r in dead]} before reporting")
                    continue
                (results if ok else errors)[rank] = payload
                if errors:  # one rank failed: the others would hang in a collective
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            rank = min(errors)
            raise RuntimeError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{errors[rank]}")
    return [_loads(results[r]) for r in range(world_size)]
