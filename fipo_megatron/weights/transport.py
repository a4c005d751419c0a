"""How exported buckets reach an engine: in-process, disk, CUDA IPC handles, NCCL broadcast.

A transport has ``send(bucket)`` (one bucket of HF-named full tensors, from ``weights.export``) and
``finish()`` (after the last bucket). ``sync_weights`` drives one full sync:

    sync_weights(actor.model_chunks, groups=groups, hf_config=cfg, transport=engine.weight_transport())

- ``InProcessTransport``: the engine lives in this process (embedded engine; SGLang's colocated
  ``Engine``, which moves tensors to its TP workers itself via CUDA IPC) -> ``engine.update_weights``.
- ``DiskTransport``: one safetensors file per bucket, each written atomically, plus an index written
  last: for engines in other jobs, debugging, and HF export. ``read_disk_buckets`` reads them back.
- ``CudaIpcTransport`` (GPU only): turns each CUDA tensor into a CUDA IPC handle and hands the handles to
  a callback (e.g. a request to an engine process on the same GPU); ``rebuild_from_ipc`` opens them.
- ``NcclBroadcastTransport`` lives in ``weights/nccl_transport.py`` (GPU only, disaggregated engines).
- ``FanOutTransport``: the same buckets through several transports in turn (engine data parallelism,
  ``rollout.multi.MultiEngine``).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator, Protocol

import torch

from fipo_megatron.checkpoint.fs import atomic_write

from fipo_megatron.log import get_logger
from fipo_megatron.parallel.topology import local_device

logger = get_logger(__name__)

NamedTensors = list[tuple[str, torch.Tensor]]


class WeightTransport(Protocol):
    """How one weight sync reaches an engine: ``send`` per bucket, then ``finish`` once."""

    def send(self, bucket: NamedTensors) -> None:
        """Deliver one bucket of HF-named full (unsharded) tensors."""
        ...

    def finish(self) -> None:
        """The last bucket was sent: the engine applies the update (caches flushed, weights post-processed)."""
        ...


class InProcessTransport:
    """Hand buckets to an engine object in this process (``RolloutEngine.update_weights``)."""

    def __init__(self, engine):
        self.engine = engine

    def send(self, bucket: NamedTensors) -> None:
        """``engine.update_weights(bucket)``."""
        self.engine.update_weights(bucket)

    def finish(self) -> None:
        """``engine.finish_weight_update()``."""
        self.engine.finish_weight_update()


class FanOutTransport:
    """Send each bucket through every transport in turn (one per engine replica), then finish them all.

    Sequential on purpose: broadcast transports drive collectives from this thread, and the buckets are
    read-only views of the export that every replica may copy from."""

    def __init__(self, transports: list):
        if not transports:
            raise ValueError("FanOutTransport needs at least one transport")
        self.transports = list(transports)

    def send(self, bucket: NamedTensors) -> None:
        """The bucket through each transport in turn."""
        for transport in self.transports:
            transport.send(bucket)

    def finish(self) -> None:
        """``finish`` on each transport in turn."""
        for transport in self.transports:
            transport.finish()


class DiskTransport:
    """Write ``bucket_{rank:03d}_{i:05d}.safetensors`` per bucket into ``directory`` (tmp file, fsync,
    rename: a reader never sees a half-written file), then ``index_{rank:03d}.json`` listing the files
    and tensor names. ``rank`` distinguishes stages exporting with ``destination="stage"``."""

    def __init__(self, directory: str, *, rank: int = 0):
        self.directory = directory
        self.rank = rank
        self._files: list[str] = []
        self._names: dict[str, str] = {}
        os.makedirs(directory, exist_ok=True)

    def send(self, bucket: NamedTensors) -> None:
        """Write the bucket as the next ``bucket_{rank}_{i}.safetensors`` (host copies, atomically)."""
        from safetensors.torch import save_file

        filename = f"bucket_{self.rank:03d}_{len(self._files):05d}.safetensors"
        # safetensors refuses tensors sharing storage (gate/up are views of one gathered fc1): copy.
        tensors = {name: t.detach().cpu().clone() for name, t in bucket}
        atomic_write(os.path.join(self.directory, filename), lambda path: save_file(tensors, path))
        self._files.append(filename)
        self._names.update({name: filename for name in tensors})

    def finish(self) -> None:
        """Write this rank's index last, so a reader that finds it finds every bucket it lists."""
        index = {"files": self._files, "weight_map": self._names}
        atomic_write(os.path.join(self.directory, f"index_{self.rank:03d}.json"),
                      lambda path: _write_json(path, index))


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def read_disk_buckets(directory: str) -> Iterator[NamedTensors]:
    """Buckets written by ``DiskTransport`` (every rank's index, in rank then bucket order)."""
    from safetensors.torch import load_file

    indexes = sorted(f for f in os.listdir(directory) if f.startswith("index_") and f.endswith(".json"))
    if not indexes:
        raise FileNotFoundError(f"no index_*.json in {directory}: the sync did not finish")
    for index_file in indexes:
        with open(os.path.join(directory, index_file)) as f:
            index = json.load(f)
        for filename in index["files"]:
            yield list(load_file(os.path.join(directory, filename)).items())


class CudaIpcTransport:
    """Send CUDA IPC handles of each bucket's tensors to ``send_handles(list[(name, handle)])``.

    The receiving process (same node, any GPU the handle's device is visible on) calls
    ``rebuild_from_ipc``. The sender must keep the tensors alive until the receiver has copied them, so
    this transport holds the last bucket until the next ``send``/``finish`` (the callback is synchronous).
    """

    def __init__(self, send_handles: Callable[[list], None]):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaIpcTransport needs CUDA; use InProcessTransport or DiskTransport on CPU")
        self.send_handles = send_handles
        self._alive: NamedTensors = []

    def send(self, bucket: NamedTensors) -> None:
        """Hand the IPC handles of the bucket's tensors (moved to this GPU, contiguous) to ``send_handles``;
        the previous bucket's tensors are released only now."""
        from torch.multiprocessing.reductions import reduce_tensor

        self._alive = [(n, t.detach().cuda().contiguous()) for n, t in bucket]
        torch.cuda.current_stream().synchronize()  # the receiver reads on its own stream
        self.send_handles([(name, reduce_tensor(t)) for name, t in self._alive])

    def finish(self) -> None:
        """Release the last bucket's tensors (the receiver has copied them: the callback is synchronous)."""
        self._alive = []


def rebuild_from_ipc(handles: list) -> NamedTensors:
    """Open ``(name, reduce_tensor(...) result)`` pairs from ``CudaIpcTransport`` in the receiving process."""
    return [(name, rebuild(*args)) for name, (rebuild, args) in handles]


class WeightSyncError(RuntimeError):
    """A weight sync failed on some rank (engine down, refused a bucket, ...). Raised on *every* rank, after
    the export's collectives completed, so the whole job can checkpoint and stop together."""


def sync_weights(model_chunks, *, groups, transport: WeightTransport | None, hf_config=None, mapping=None,
                 bucket_bytes: int = 512 << 20, destination: str = "rank0", dtype: torch.dtype | None = None,
                 device=None, fp8: bool = False, exporting_replica: bool | None = None,
                 route=None) -> dict[str, float]:
    """Export the actor's weights bucket by bucket through ``transport``; every rank must call this.

    ``transport`` may be None on ranks that receive nothing. ``fp8``: send decoder projection weights
    block-FP8 quantised (``weights/fp8.py``) for an engine loading a block-FP8 checkpoint.
    ``exporting_replica``: see ``export_hf_buckets``. ``route``: a ``weights.export.StageRoute``: every
    receiver of the route gets the whole model (``broadcast_hf_buckets``; engines on every node), and
    ``destination``/``exporting_replica``/``device`` do not apply. Returns counts for logging
    (``weights/num_buckets``, ``weights/num_bytes``) as seen by this rank.

    Failure handling: if the transport raises, this rank stops delivering but keeps draining the export
    (other ranks are inside its collectives and would otherwise hang), then all ranks agree on the outcome
    with one all-reduce and every rank raises :class:`WeightSyncError`. The actor's weights are untouched.
    """
    import torch.distributed as dist

    from fipo_megatron.weights.export import broadcast_hf_buckets, export_hf_buckets
    from fipo_megatron.weights.fp8 import to_fp8_named_tensors

    if route is not None:
        buckets = broadcast_hf_buckets(model_chunks, route=route, groups=groups, hf_config=hf_config,
                                       mapping=mapping, bucket_bytes=bucket_bytes, dtype=dtype)
    else:
        buckets = export_hf_buckets(model_chunks, groups=groups, hf_config=hf_config, mapping=mapping,
                                    bucket_bytes=bucket_bytes, destination=destination, dtype=dtype, device=device,
                                    exporting_replica=exporting_replica)
    num_buckets = num_bytes = 0
    error: BaseException | None = None
    try:
        for bucket in buckets:
            num_buckets += 1
            if error is not None:
                continue  # drain: keep the collectives going, deliver nothing more
            try:
                if transport is None:
                    raise ValueError(f"rank {groups.rank} received a weight bucket but has no transport")
                if fp8:
                    bucket = list(to_fp8_named_tensors(bucket))
                transport.send(bucket)
                num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                error = e
            del bucket  # freed before the export builds the next one
    except ValueError as e:
        if route is None:
            raise
        error = error or e  # a receiver's check: broadcast_hf_buckets raises after its last collective
    if error is None and transport is not None and num_buckets:
        try:
            transport.finish()
        except Exception as e:  # noqa: BLE001
            error = e
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32,
                        device=local_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()):
        if error is not None:
            logger.error("weight sync failed on rank %d: %r", groups.rank, error)
            raise WeightSyncError(f"weight sync failed on rank {groups.rank}: {error!r}") from error
        raise WeightSyncError("weight sync failed on another rank (see its log)")
    return {"weights/num_buckets": float(num_buckets), "weights/num_bytes": float(num_bytes)}
