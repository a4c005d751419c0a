"""Rank-aware logging. The library never prints: it logs through ``get_logger``.

Only rank 0 logs at INFO by default; other ranks log WARNING and above, so a 64-rank job does not
print every line 64 times. ``FIPO_LOG_LEVEL`` overrides the level on every rank.
"""

from __future__ import annotations

import logging
import os

_CONFIGURED = False


def _rank() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover - torch missing or half-initialised
        pass
    return 0


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``fipo_megatron`` hierarchy, configured once per process."""
    global _CONFIGURED
    if not _CONFIGURED:
        rank = _rank()
        level = os.environ.get("FIPO_LOG_LEVEL", "INFO" if rank == 0 else "WARNING").upper()
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank} %(name)s] %(levelname)s %(message)s", "%H:%M:%S"))
        root = logging.getLogger("fipo_megatron")
        root.addHandler(handler)
        root.setLevel(level)
        root.propagate = False
        _CONFIGURED = True
    if not name.startswith("fipo_megatron"):
        name = f"fipo_megatron.{name}"
    return logging.getLogger(name)
