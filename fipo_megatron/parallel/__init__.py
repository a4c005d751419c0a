"""Parallel topology, the CPU compatibility layer, and context-parallel helpers.

Public names: :class:`ParallelConfig`, :class:`ParallelGroups`, :func:`validate_layout`,
:func:`init_distributed`, :func:`initialize_parallel`, :func:`destroy_parallel`, :func:`apply_cpu_compat`,
:func:`cpu_compat_active`.
The submodules ``cp_layout`` (zig-zag CP layout) and ``cp_future_kl`` are imported by their full names.
"""

from fipo_megatron.parallel.cpu_compat import apply_cpu_compat, cpu_compat_active
from fipo_megatron.parallel.topology import (
    ParallelConfig,
    ParallelGroups,
    destroy_parallel,
    init_distributed,
    initialize_parallel,
    validate_layout,
)

__all__ = [
    "ParallelConfig",
    "ParallelGroups",
    "apply_cpu_compat",
    "cpu_compat_active",
    "destroy_parallel",
    "init_distributed",
    "initialize_parallel",
    "validate_layout",
]
