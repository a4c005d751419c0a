"""Broadcast buckets to a disaggregated engine over a process group shared with it (NCCL on GPUs).

The trainer's exporting rank is rank 0 of a *separate* group whose other members are the engine's
workers (SGLang's ``init_weights_update_group``, ``rollout.sglang_engine.join_weight_group``). The group is built the
way SGLang builds its side (``sglang/srt/utils``: ``init_custom_process_group``: a TCP rendezvous at
``master_address:master_port``, a ``PrefixStore(group_name)``, then torch's ``_new_process_group_helper``),
so both sides meet in the same store keys without touching either side's default process group.

Per bucket the engine is told the names/dtypes/shapes (an HTTP request answered only after the
broadcasts land), then every tensor is broadcast from rank 0 in that order.
"""

from __future__ import annotations

import inspect
import threading
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from fipo_megatron.log import get_logger
from fipo_megatron.parallel.topology import local_device

logger = get_logger(__name__)

NamedTensors = list[tuple[str, torch.Tensor]]


def init_weight_update_group(*, master_address: str, master_port: int, rank: int, world_size: int,
                             group_name: str, backend: str = "nccl", timeout_s: float = 600.0):
    """Join (create) a process group outside torch's default group; returns the group handle."""
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                   timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    # The options argument was renamed pg_options -> backend_options in torch 2.6; read the signature.
    params = inspect.signature(c10d._new_process_group_helper).parameters
    options_kw = {"backend_options": None} if "backend_options" in params else {"pg_options": None}
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                              group_name=group_name, timeout=timeout, **options_kw)
    # Collectives translate ``src``/``dst`` through this map (``get_group_rank`` in torch's
    # distributed_c10d.py raises "Group ... is not registered" without it); the group's own ranks stand in
    # for global ones, as SGLang's side does.
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def torch_dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling SGLang's update_weights_from_distributed expects."""
    return str(dtype).removeprefix("torch.")


class NcclBroadcastTransport:
    """Send each bucket by ``announce(names, dtypes, shapes)`` (run in a thread: the engine answers after
    receiving) plus one broadcast per tensor from rank 0 of ``group``; ``on_finish`` after the last bucket.

    ``announce`` and ``on_finish`` come from the engine client (``SGLangServerEngine.weight_transport``:
    its ``announce_bucket`` and ``finish_weight_update``).
    """

    def __init__(self, *, group, announce: Callable[[list[str], list[str], list[list[int]]], None],
                 on_finish: Callable[[], None] | None = None, device: str | torch.device | None = None):
        self.group = group
        self.announce = announce
        self.on_finish = on_finish
        self.device = torch.device(device) if device is not None else local_device()

    def send(self, bucket: NamedTensors) -> None:
        """Announce the bucket in a thread while this thread broadcasts its tensors in order (the engine
        answers the announcement only after receiving them); re-raise the announcement's failure."""
        names = [n for n, _ in bucket]
        dtypes = [torch_dtype_name(t.dtype) for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]
        errors: list[BaseException] = []

        def run():
            try:
                self.announce(names, dtypes, shapes)
            except BaseException as e:  # re-raised in the caller's thread below
                errors.append(e)

        thread = threading.Thread(target=run, name="weight-announce", daemon=True)
        thread.start()
        for _, tensor in bucket:
            dist.broadcast(tensor.detach().to(self.device).contiguous(), src=0, group=self.group)
        thread.join()
        if errors:
            raise errors[0]

    def finish(self) -> None:
        """``on_finish()`` after the last bucket (e.g. the server's cache flush)."""
        if self.on_finish is not None:
            self.on_finish()
