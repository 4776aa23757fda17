"""The machine: memory bandwidth, process memory, and a description to print next to every figure."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from types import TracebackType
from typing import Any

import psutil
import torch


def measure_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of ``repeats`` sums over an ``n_bytes`` float32 tensor.

    Decoding is memory-bound (every step reads the weights and the KV cache), so this is the speed limit the
    benchmark compares against.
    """
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    del x
    return n_bytes / best


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, str | int]:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count() or 0,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
    }


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def release_free_memory() -> None:
    """Return freed heap memory to the system before a measurement starts (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _high_water_mark() -> int | None:
    """The kernel's peak resident set size of this process (VmHWM), in bytes; None where it is not available."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return _high_water_mark() is not None


class PeakRSS:
    """The highest resident memory of this process while the block runs (model weights included).

    On Linux the kernel keeps the peak itself: the block resets it on entry and reads it on exit, so measuring
    costs nothing while the block runs (a timed decode is not disturbed). Elsewhere a thread samples RSS every
    ``interval`` seconds. Freed heap memory is handed back to the system first (``malloc_trim``) so that the
    figure follows live memory. ``peak - start`` is what the block added.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self.kernel = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.start = self.peak = rss()
        self.kernel = _reset_high_water_mark()
        if not self.kernel:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        hwm = _high_water_mark() if self.kernel else None
        self.peak = max(self.peak, rss(), hwm or 0)

    @property
    def added(self) -> int:
        return self.peak - self.start
