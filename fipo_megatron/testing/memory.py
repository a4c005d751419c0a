"""Peak memory of a span of code in this process, for tests and benchmarks (Linux, CPU or CUDA).

    meter = PeakRss()            # or PeakCudaAllocated()
    meter.start()
    run_something()
    extra = meter.stop()         # peak bytes over the span minus the bytes at start()
"""

from __future__ import annotations

import ctypes
import os
import threading

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def pin_mmap_threshold(nbytes: int = 128 << 10) -> bool:
    """Serve every allocation of at least ``nbytes`` from its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold after each large free (up to 32 MiB), so later tensors below it come
    from the heap, which keeps freed memory resident: RSS then exceeds the live bytes by what fragmentation
    leaves behind. Pinning the threshold (as ``MALLOC_MMAP_THRESHOLD_`` does at start-up) makes RSS track
    the live tensor bytes. Affects allocations made after the call; False where glibc is not found."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


class PeakRss:
    """Peak resident bytes of this process over a span, minus the resident bytes at its start.

    ``start`` first hands freed heap back to the OS (``malloc_trim``), reads the baseline from
    ``/proc/self/statm`` and resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``);
    ``stop`` reads ``VmHWM`` from ``/proc/self/status``. The kernel updates the mark before any unmap, so it
    is the exact peak. Where ``clear_refs`` cannot be written (or with ``sample=True``) a thread reads
    ``statm`` every millisecond instead, which can miss a peak shorter than that. RSS counts touched pages:
    a buffer from ``torch.empty`` costs nothing until written."""

    def __init__(self, *, sample: bool = False):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._libc = _libc()
        self._hwm = not sample and self._reset_hwm()
        self.method = "VmHWM" if self._hwm else "statm sampled every 1 ms"

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        """Take the baseline and start tracking the peak."""
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self._base = self._rss()
        if self._hwm:
            self._reset_hwm()
            return
        self._peak, self._stop = self._base, threading.Event()

        def sample():
            while not self._stop.wait(0.001):
                self._peak = max(self._peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Peak resident bytes since ``start`` minus the baseline."""
        if self._hwm:
            with open("/proc/self/status") as f:
                hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            return hwm_kb * 1024 - self._base
        self._stop.set()
        self._thread.join()
        return max(self._peak, self._rss()) - self._base


class PeakCudaAllocated:
    """Peak bytes allocated by torch on the current CUDA device over a span, minus those at its start
    (tensor bytes: the caching allocator's reserve and NCCL's own buffers are not counted)."""

    method = "torch.cuda.max_memory_allocated"

    def start(self) -> None:
        """Take the baseline and reset the peak."""
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._base = torch.cuda.memory_allocated()

    def stop(self) -> int:
        """Peak allocated bytes since ``start`` minus the baseline."""
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self._base
